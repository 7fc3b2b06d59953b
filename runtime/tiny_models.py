"""Small DeepSeek models with seeded random weights: the test models and the CLI demo.

Configs are HF-style dicts (what transformers' DeepseekV2Config / DeepseekV3Config take), weights are
an HF-named state dict, so the same weights load into HF transformers (the reference) and, through
runtime.gguf_writer, into a GGUF file (what we run). The vocabulary is a real byte-level BPE trained
with `tokenizers` on a small built-in text.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from mlapipe.runtime.gguf_writer import Vocab, write_gguf

SPECIAL_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
CORPUS = """\
DeepSeek models compress the keys and values of every token into a small latent vector.
Multi-head latent attention caches 576 numbers per token per layer, not thousands.
The mixture of experts routes each token to a few experts; shared experts see every token.
Pipeline parallelism splits the layers across GPUs, and micro-batches keep every stage busy.
def attention(query, key, value): return softmax(query @ key.T / sqrt(d)) @ value
for i in range(10): print(i, i * i, 2 ** i)  # 0 1 2 3 4 5 6 7 8 9 10 100 1000 2048 4096
The quick brown fox jumps over the lazy dog. Hello, world! What is the capital of France?
Paris is the capital of France; Berlin is the capital of Germany; Tokyo is in Japan.
深度求索 日本語のテキスト カタカナ
"""


def build_vocab(vocab_size: int = 384, pre: str = "deepseek-v3") -> Vocab:
    """Trains a byte-level BPE on CORPUS; special tokens take ids 0..3 (bos 0, eos 1)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from mlapipe.runtime.tokenizer import TOKEN_TYPE_CONTROL, deepseek_pre_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = deepseek_pre_tokenizer(pre)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    types = [TOKEN_TYPE_CONTROL if t in SPECIAL_TOKENS else 1 for t in tokens]
    return Vocab(tokens, types, merges, bos_token_id=0, eos_token_id=1, pre=pre, chat_template=CHAT_TEMPLATE)


def tiny_config(kind: str, vocab_size: int, **overrides: Any) -> dict[str, Any]:
    """HF config dict. "v2": V2-Lite-like (no q-LoRA, softmax, greedy top-k); "v3": q-LoRA, sigmoid with
    bias, 4 groups keep 2, renormalised, scale 2.5. Dims are multiples of 32 so Q8_0 applies everywhere."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    )
    if kind == "v2":
        cfg = common | dict(
            q_lora_rank=None,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=2,
            topk_method="greedy",
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            n_group=None,
            topk_group=None,
        )
    elif kind == "v3":
        cfg = common | dict(
            q_lora_rank=32,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            n_group=4,
            topk_group=2,
        )
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}: choose v2 or v3")
    cfg = cfg | overrides
    # DeepSeek's configs give every head its own "kv head" (converters write it as head_count_kv)
    cfg["num_key_value_heads"] = overrides.get("num_key_value_heads", cfg["num_attention_heads"])
    return cfg


def random_state_dict(cfg: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Seeded weights under HF names, scaled so activations stay O(1) through the layers and the logits
    have clear margins (so greedy choices are not decided by rounding)."""
    rng = np.random.default_rng(seed)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v, c = (
        cfg["qk_nope_head_dim"],
        cfg["qk_rope_head_dim"],
        cfg["v_head_dim"],
        cfg["kv_lora_rank"],
    )

    def linear(out_dim: int, in_dim: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) * gain / np.sqrt(in_dim)).astype(np.float32)

    def norm(dim: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32)

    sd: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((cfg["vocab_size"], hidden)).astype(np.float32),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(hidden)
        sd[p + "post_attention_layernorm.weight"] = norm(hidden)
        if cfg.get("q_lora_rank"):
            sd[p + "self_attn.q_a_proj.weight"] = linear(cfg["q_lora_rank"], hidden)
            sd[p + "self_attn.q_a_layernorm.weight"] = norm(cfg["q_lora_rank"])
            sd[p + "self_attn.q_b_proj.weight"] = linear(heads * (nope + rope), cfg["q_lora_rank"], 2.0)
        else:
            sd[p + "self_attn.q_proj.weight"] = linear(heads * (nope + rope), hidden, 2.0)
        sd[p + "self_attn.kv_a_proj_with_mqa.weight"] = linear(c + rope, hidden, 2.0)
        sd[p + "self_attn.kv_a_layernorm.weight"] = norm(c)
        sd[p + "self_attn.kv_b_proj.weight"] = linear(heads * (nope + v), c, 2.0)
        sd[p + "self_attn.o_proj.weight"] = linear(hidden, heads * v, 0.5)
        if i < cfg["first_k_dense_replace"]:
            sd[p + "mlp.gate_proj.weight"] = linear(cfg["intermediate_size"], hidden)
            sd[p + "mlp.up_proj.weight"] = linear(cfg["intermediate_size"], hidden)
            sd[p + "mlp.down_proj.weight"] = linear(hidden, cfg["intermediate_size"], 0.5)
            continue
        experts, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        sd[p + "mlp.gate.weight"] = linear(experts, hidden, 2.0)
        if cfg.get("topk_method") == "noaux_tc":
            sd[p + "mlp.gate.e_score_correction_bias"] = (0.1 * rng.standard_normal(experts)).astype(
                np.float32
            )
        sd[p + "mlp.experts.gate_up_proj"] = np.stack([linear(2 * inter, hidden) for _ in range(experts)])
        sd[p + "mlp.experts.down_proj"] = np.stack([linear(hidden, inter, 0.5) for _ in range(experts)])
        shared = inter * cfg["n_shared_experts"]
        if shared:
            sd[p + "mlp.shared_experts.gate_proj.weight"] = linear(shared, hidden)
            sd[p + "mlp.shared_experts.up_proj.weight"] = linear(shared, hidden)
            sd[p + "mlp.shared_experts.down_proj.weight"] = linear(hidden, shared, 0.5)
    sd["model.norm.weight"] = norm(hidden)
    sd["lm_head.weight"] = linear(cfg["vocab_size"], hidden, 4.0)
    return sd


def write_tiny_model(
    path: str | os.PathLike,
    kind: str = "v3",
    seed: int = 0,
    weight_type: str = "F32",
    layout: str = "kv_b",
    pre: str = "deepseek-v3",  # tokenizer.ggml.pre: "deepseek-llm" for V2 / V2-Lite files
    shards: int = 1,
    **overrides: Any,
) -> str:
    vocab = build_vocab(pre=pre)
    cfg = tiny_config(kind, len(vocab.tokens), **overrides)
    return write_gguf(path, cfg, random_state_dict(cfg, seed), vocab, weight_type, layout, shards)


def demo_model_path() -> str:
    """The demo model, built once and cached (MLAPIPE_CACHE, else ~/.cache/mlapipe)."""
    cache = pathlib.Path(os.environ.get("MLAPIPE_CACHE", pathlib.Path.home() / ".cache" / "mlapipe"))
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "demo-deepseek-v3-tiny-v1.gguf"
    if not path.exists():
        write_tiny_model(path, "v3", seed=0, num_hidden_layers=4)
    return str(path)
