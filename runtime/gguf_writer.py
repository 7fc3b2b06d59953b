"""Writes an HF-style DeepSeek-V2/V3 checkpoint (config dict + state dict) as a deepseek2 GGUF file.

The layout follows the real converters for deepseek2 (llama.cpp's convert_hf_to_gguf.py, older and
current, and ik_llama.cpp's), so our reader is checked against the same conventions real files use:
rope dims stay in DeepSeek's interleaved-pair order, norms and the router stay F32, MLA is written in
any of the three layouts of runtime/gguf_layouts.py with each converter's metadata, and a model can be
written as gguf-split shards.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from mlapipe.runtime.gguf_layouts import MLA_LAYOUTS
from mlapipe.runtime.gguf_shards import shard_path

ARCH = "deepseek2"
WEIGHT_TYPES = {
    "F32": gguf.GGMLQuantizationType.F32,
    "BF16": gguf.GGMLQuantizationType.BF16,
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
}

# HF name (after "model.layers.N.") -> GGUF name (after "blk.N.")
HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
KEEP_F32 = ("_norm.weight", "ffn_gate_inp.weight", "exp_probs_b.bias")


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]  # "left right"
    bos_token_id: int
    eos_token_id: int
    pre: str = "deepseek-v3"
    add_bos: bool = True
    chat_template: str | None = None


def metadata_items(cfg: Mapping[str, Any], layout: str) -> list[tuple[str, str, Any]]:
    """(kind, key, value) for every deepseek2 key, from an HF config dict, as the converter that writes
    `layout` writes them:
    - "kv_b": llama.cpp's convert_hf_to_gguf.py before the MLA split; V2 files from before V3 support
      lack expert_gating_func and expert_weights_norm (llama.cpp then defaults to softmax, no norm);
    - "ik": ik_llama.cpp's converter: head_count_kv = n_head, per-head key/value lengths, gating and
      norm always written, never expert_group_count (ik does not group-limit deepseek2 routing);
    - "mainline": llama.cpp's converter since the MLA split (conversion/deepseek.py + base.py):
      head_count_kv = 1, absorbed key/value lengths plus the *_mla keys, norm only when true, groups
      and the yarn betas whenever the HF config has them.
    Neither older converter writes expert group counts: a V3 model with groups only round-trips exactly
    through "mainline"."""
    heads = cfg["num_attention_heads"]
    nope, rope, v, c = (
        cfg["qk_nope_head_dim"],
        cfg["qk_rope_head_dim"],
        cfg["v_head_dim"],
        cfg["kv_lora_rank"],
    )
    sigmoid = cfg.get("scoring_func") == "sigmoid" or cfg.get("topk_method") == "noaux_tc"
    gating = 2 if sigmoid else 1  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE
    # HF's DeepseekV2 router never renormalises; V3's follows norm_topk_prob
    norm = bool(sigmoid and cfg.get("norm_topk_prob"))
    rope_params = cfg["rope_parameters"]
    items: list[tuple[str, str, Any]] = [
        ("u32", "block_count", cfg["num_hidden_layers"]),
        ("u32", "context_length", cfg["max_position_embeddings"]),
        ("u32", "embedding_length", cfg["hidden_size"]),
        ("u32", "feed_forward_length", cfg["intermediate_size"]),
        ("u32", "attention.head_count", heads),
        (
            "u32",
            "attention.head_count_kv",
            1 if layout == "mainline" else cfg.get("num_key_value_heads", heads),
        ),
        ("f32", "rope.freq_base", rope_params["rope_theta"]),
        ("f32", "attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"]),
        ("u32", "expert_used_count", cfg["num_experts_per_tok"]),
        ("u32", "leading_dense_block_count", cfg["first_k_dense_replace"]),
        ("u32", "vocab_size", cfg["vocab_size"]),
    ]
    if cfg.get("q_lora_rank"):
        items.append(("u32", "attention.q_lora_rank", cfg["q_lora_rank"]))
    items.append(("u32", "attention.kv_lora_rank", c))
    if layout == "mainline":  # the absorbed form's lengths, the per-head ones under *_mla
        items += [
            ("u32", "attention.key_length", c + rope),
            ("u32", "attention.value_length", c),
            ("u32", "attention.key_length_mla", nope + rope),
            ("u32", "attention.value_length_mla", v),
        ]
    else:
        items += [("u32", "attention.key_length", nope + rope), ("u32", "attention.value_length", v)]
    items += [
        ("u32", "expert_feed_forward_length", cfg["moe_intermediate_size"]),
        ("u32", "expert_count", cfg["n_routed_experts"]),
        ("u32", "expert_shared_count", cfg["n_shared_experts"]),
        ("f32", "expert_weights_scale", cfg["routed_scaling_factor"]),
    ]
    if layout == "ik" or (layout == "kv_b" and sigmoid) or (layout == "mainline" and norm):
        items.append(("bool", "expert_weights_norm", norm))
    if layout != "kv_b" or sigmoid:
        items.append(("u32", "expert_gating_func", gating))
    if layout == "mainline" and cfg.get("n_group") is not None:
        items.append(("u32", "expert_group_count", cfg["n_group"]))
        if cfg.get("topk_group") is not None:
            items.append(("u32", "expert_group_used_count", cfg["topk_group"]))
    items.append(("u32", "rope.dimension_count", rope))
    if rope_params.get("rope_type") == "yarn":
        items += [
            ("str", "rope.scaling.type", "yarn"),
            ("f32", "rope.scaling.factor", rope_params["factor"]),
            ("u32", "rope.scaling.original_context_length", rope_params["original_max_position_embeddings"]),
        ]
        if layout == "mainline":
            for name in ("beta_fast", "beta_slow"):
                if rope_params.get(name) is not None:
                    items.append(("f32", f"rope.scaling.yarn_{name}", float(rope_params[name])))
        # every converter's convention: mscale = 1 + yarn_log_multiplier * ln(factor)
        items.append(
            ("f32", "rope.scaling.yarn_log_multiplier", 0.1 * rope_params.get("mscale_all_dim", 0.0))
        )
    return items


def gguf_tensors(cfg: Mapping[str, Any], state_dict: Mapping[str, Any], layout: str) -> dict[str, np.ndarray]:
    """HF state dict (tensors or arrays) -> GGUF-named float32 arrays in torch order, in the converters'
    order (embedding, layers, output norm, output)."""
    if layout not in MLA_LAYOUTS:
        raise ValueError(f"mla layout must be one of {MLA_LAYOUTS}, got {layout!r}")
    arrays = {k: _as_f32(v) for k, v in state_dict.items()}
    out = {"token_embd.weight": arrays.pop("model.embed_tokens.weight")}
    tail = {
        "output_norm.weight": arrays.pop("model.norm.weight"),
        "output.weight": arrays.pop("lm_head.weight"),
    }
    heads, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    inter = cfg["moe_intermediate_size"]
    for name, array in arrays.items():
        _, _, layer, rest = name.split(".", 3)
        prefix = f"blk.{layer}."
        if rest == "self_attn.kv_b_proj.weight":
            c = array.shape[-1]
            kv_b = array.reshape(heads, nope + v, c)
            k_b = kv_b[:, :nope].transpose(0, 2, 1)  # (H, C, N), as both converters transpose it
            v_b = kv_b[:, nope:]  # (H, V, C)
            if layout in ("kv_b", "ik"):
                out[prefix + "attn_kv_b.weight"] = array
            if layout == "ik":  # ik's converter flattens the heads into the rows
                out[prefix + "attn_k_b.weight"] = np.ascontiguousarray(k_b.reshape(heads * c, nope))
                out[prefix + "attn_v_b.weight"] = np.ascontiguousarray(v_b.reshape(heads * v, c))
            elif layout == "mainline":
                out[prefix + "attn_k_b.weight"] = np.ascontiguousarray(k_b)
                out[prefix + "attn_v_b.weight"] = np.ascontiguousarray(v_b)
        elif rest == "mlp.experts.gate_up_proj":
            out[prefix + "ffn_gate_exps.weight"] = np.ascontiguousarray(array[:, :inter])
            out[prefix + "ffn_up_exps.weight"] = np.ascontiguousarray(array[:, inter:])
        elif rest in HF_LAYER_NAMES:
            out[prefix + HF_LAYER_NAMES[rest]] = array
        else:
            raise ValueError(f"no GGUF name for HF tensor {name!r}")
    return out | tail


def write_gguf(
    path: str | os.PathLike,
    cfg: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    vocab: Vocab,
    weight_type: str = "F32",
    layout: str = "kv_b",
    shards: int = 1,
) -> str:
    """Writes the model and returns the path to open. With shards > 1 it writes gguf-split's shards
    (through gguf-py's own splitting writer, as convert_hf_to_gguf.py --split-max-tensors does):
    PATH-00001-of-0000N.gguf ... with the split.* keys, returning the first shard's path. Files appear
    atomically: written under temporary names, then renamed."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight type must be one of {sorted(WEIGHT_TYPES)}, got {weight_type!r}")
    tensors = gguf_tensors(cfg, state_dict, layout)
    if not 1 <= shards <= len(tensors):
        raise ValueError(f"shards must be 1..{len(tensors)} (one tensor at least each), got {shards}")
    path = os.fspath(path)
    stem = path[: -len(".gguf")] if path.endswith(".gguf") else path
    tmp_stem = os.path.join(os.path.dirname(stem), f".tmp{os.getpid()}-{os.path.basename(stem)}")
    per_shard = -(-len(tensors) // shards)
    writer = gguf.GGUFWriter(f"{tmp_stem}.gguf", ARCH, split_max_tensors=per_shard if shards > 1 else 0)
    add_metadata(writer, cfg, vocab, layout)
    qtype = WEIGHT_TYPES[weight_type]
    for name, array in tensors.items():
        if qtype == gguf.GGMLQuantizationType.F32 or array.ndim == 1 or name.endswith(KEEP_F32):
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    written = len(writer.tensors)
    if written != shards:
        raise ValueError(f"{len(tensors)} tensors do not split into {shards} shards (got {written})")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if shards == 1:
        os.replace(f"{tmp_stem}.gguf", path)
        return path
    for i in range(shards):
        os.replace(shard_path(tmp_stem, i, shards), shard_path(stem, i, shards))
    return shard_path(stem, 0, shards)


def add_metadata(writer: gguf.GGUFWriter, cfg: Mapping[str, Any], vocab: Vocab, layout: str) -> None:
    """Every key/value of the model (the architecture is the writer's own), as `layout`'s converter
    writes them."""
    writer.add_name(cfg.get("name", "tiny deepseek2"))
    adders = {
        "u32": writer.add_uint32,
        "f32": writer.add_float32,
        "bool": writer.add_bool,
        "str": writer.add_string,
    }
    for kind, key, value in metadata_items(cfg, layout):
        adders[kind](f"{ARCH}.{key}", value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_token_id)
    writer.add_eos_token_id(vocab.eos_token_id)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _as_f32(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch stays optional for this module
        value = value.detach().float().cpu().numpy()
    return np.ascontiguousarray(value, dtype=np.float32)
