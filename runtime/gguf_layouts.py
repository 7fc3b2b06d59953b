"""Which tensors a deepseek2 GGUF holds, under which names and shapes, in each of the three MLA layouts.

One explicit name table maps GGUF tensor names to ours. The MLA up-projection of the latent comes in
three layouts, told apart by which tensors a layer has and their ranks (shapes in torch/numpy order,
H heads, C kv_lora_rank, N qk_nope, V v_head):

- "kv_b": `attn_kv_b` [H*(N+V), C] alone: llama.cpp files from before the MLA split (and most
  DeepSeek-V2-Lite files on the hubs).
- "ik": ik_llama.cpp's converter: `attn_kv_b` AND 2-D `attn_k_b` [H*C, N] + `attn_v_b` [H*V, C]
  (the same weights twice; head_count_kv = n_head, per-head key_length, no *_mla keys).
- "mainline": llama.cpp's converter since the MLA split: 3-D `attn_k_b` [H, C, N] + `attn_v_b` [H, V, C],
  no `attn_kv_b` (head_count_kv = 1, absorbed key_length, *_mla keys).

Where a file has both forms (ik's files) the weights are read from `attn_kv_b` alone, consistently in
every layer: its rows run along C, the axis both canonical up-projections keep, so quantized blocks
stay whole; the split tensors are checked for shape and never read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlapipe.runtime.config import ModelConfig

# GGUF name -> our name. Layer tensors are "blk.{L}.<name>" in GGUF, "layers.{L}.<ours>" here.
GLOBAL_NAMES = {
    "token_embd.weight": "embed",
    "output_norm.weight": "norm",
    "output.weight": "head",
}
LAYER_NAMES = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "attn.wq",  # no q-LoRA (V2-Lite)
    "attn_q_a.weight": "attn.wq_a",
    "attn_q_a_norm.weight": "attn.q_norm",
    "attn_q_b.weight": "attn.wq_b",
    "attn_kv_a_mqa.weight": "attn.wkv_a",
    "attn_kv_a_norm.weight": "attn.kv_norm",
    "attn_kv_b.weight": "attn.wkv_b",
    "attn_k_b.weight": "attn.wk_b",
    "attn_v_b.weight": "attn.wv_b",
    "attn_output.weight": "attn.wo",
    "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "mlp.w_gate",
    "ffn_up.weight": "mlp.w_up",
    "ffn_down.weight": "mlp.w_down",
    "ffn_gate_inp.weight": "moe.router",
    "exp_probs_b.bias": "moe.router_bias",
    "ffn_gate_exps.weight": "moe.w_gate",
    "ffn_up_exps.weight": "moe.w_up",
    "ffn_down_exps.weight": "moe.w_down",
    "ffn_gate_shexp.weight": "shared.w_gate",
    "ffn_up_shexp.weight": "shared.w_up",
    "ffn_down_shexp.weight": "shared.w_down",
}
OUR_TO_GGUF_LAYER = {ours: gguf for gguf, ours in LAYER_NAMES.items()}
_LAYER_PATTERN = re.compile(r"^blk\.(\d+)\.(.+)$")

MLA_LAYOUTS = ("kv_b", "ik", "mainline")
LAYOUT_DESCRIPTIONS = {
    "kv_b": "attn_kv_b alone (llama.cpp before the MLA split)",
    "ik": "attn_kv_b + 2-D attn_k_b/attn_v_b (ik_llama.cpp)",
    "mainline": "3-D attn_k_b/attn_v_b (llama.cpp since the MLA split)",
}


@dataclass(frozen=True)
class MLAForm:
    """A file's MLA layout and which of its tensors the model's up-projections are read from."""

    layout: str  # one of MLA_LAYOUTS
    has_kv_b: bool
    split_rank: int  # 0: no attn_k_b/attn_v_b, 2: ik's 2-D ones, 3: mainline's 3-D ones

    @property
    def source(self) -> str:
        return "attn_kv_b" if self.has_kv_b else "attn_k_b + attn_v_b"

    def describe(self) -> str:
        return f"{self.layout}: {LAYOUT_DESCRIPTIONS[self.layout]}; weights read from {self.source}"


FORMS = {
    "kv_b": MLAForm("kv_b", has_kv_b=True, split_rank=0),
    "ik": MLAForm("ik", has_kv_b=True, split_rank=2),
    "mainline": MLAForm("mainline", has_kv_b=False, split_rank=3),
}


def gguf_name(ours: str) -> str:
    """Our tensor name -> the GGUF one ('layers.3.attn.wo' -> 'blk.3.attn_output.weight')."""
    for gguf, mine in GLOBAL_NAMES.items():
        if mine == ours:
            return gguf
    _, layer, rest = ours.split(".", 2)
    return f"blk.{layer}.{OUR_TO_GGUF_LAYER[rest]}"


def our_name(gguf: str) -> str | None:
    if gguf in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf]
    match = _LAYER_PATTERN.match(gguf)
    if match and match.group(2) in LAYER_NAMES:
        return f"layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}"
    return None


def detect_form(layer_shapes: dict[str, tuple[int, ...]]) -> MLAForm | None:
    """The MLA form of one layer from its tensors (our names without the layer prefix -> shapes);
    None when the layer has no recognisable set (the shape check then names what is missing)."""
    has_kv_b = "attn.wkv_b" in layer_shapes
    k_b = layer_shapes.get("attn.wk_b")
    rank = len(k_b) if k_b is not None else 0
    if has_kv_b and rank in (0, 2):
        return FORMS["kv_b" if rank == 0 else "ik"]
    if rank == 3:  # a kv_b beside 3-D split tensors is read in preference, as in ik's files
        return MLAForm("mainline", has_kv_b=has_kv_b, split_rank=3)
    if rank == 2:  # ik's split tensors without the kv_b copy
        return MLAForm("ik", has_kv_b=False, split_rank=2)
    return None


def expected_shapes(cfg: ModelConfig, layer: int, form: MLAForm | str = "kv_b") -> dict[str, tuple[int, ...]]:
    """Torch-order shapes of every tensor layer `layer` must have (and no others)."""
    if isinstance(form, str):
        form = FORMS[form]
    H, Hd = cfg.num_heads, cfg.hidden_size
    N, R, V, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    shapes: dict[str, tuple[int, ...]] = {
        "attn_norm": (Hd,),
        "attn.wkv_a": (C + R, Hd),
        "attn.kv_norm": (C,),
        "attn.wo": (Hd, H * V),
        "ffn_norm": (Hd,),
    }
    if cfg.q_lora_rank:
        shapes |= {"attn.wq_a": (cfg.q_lora_rank, Hd), "attn.q_norm": (cfg.q_lora_rank,)}
        shapes["attn.wq_b"] = (H * (N + R), cfg.q_lora_rank)
    else:
        shapes["attn.wq"] = (H * (N + R), Hd)
    if form.has_kv_b:
        shapes["attn.wkv_b"] = (H * (N + V), C)
    if form.split_rank == 2:
        shapes |= {"attn.wk_b": (H * C, N), "attn.wv_b": (H * V, C)}
    elif form.split_rank == 3:
        shapes |= {"attn.wk_b": (H, C, N), "attn.wv_b": (H, V, C)}
    if cfg.is_moe_layer(layer):
        E, I = cfg.num_experts, cfg.expert_intermediate_size
        shapes |= {
            "moe.router": (E, Hd),
            "moe.w_gate": (E, I, Hd),
            "moe.w_up": (E, I, Hd),
            "moe.w_down": (E, Hd, I),
        }
        if cfg.gating == "sigmoid":
            shapes["moe.router_bias"] = (E,)
        if cfg.num_shared_experts:
            Is = I * cfg.num_shared_experts
            shapes |= {"shared.w_gate": (Is, Hd), "shared.w_up": (Is, Hd), "shared.w_down": (Hd, Is)}
    else:
        I = cfg.intermediate_size
        shapes |= {"mlp.w_gate": (I, Hd), "mlp.w_up": (I, Hd), "mlp.w_down": (Hd, I)}
    return {f"layers.{layer}.{name}": shape for name, shape in shapes.items()}


def model_shapes(cfg: ModelConfig, form: MLAForm | str = "kv_b") -> dict[str, tuple[int, ...]]:
    """Every tensor of the model, in file order."""
    shapes = {"embed": (cfg.vocab_size, cfg.hidden_size)}
    for layer in range(cfg.num_layers):
        shapes |= expected_shapes(cfg, layer, form)
    return shapes | {"norm": (cfg.hidden_size,), "head": (cfg.vocab_size, cfg.hidden_size)}


def unused_tensors(form: MLAForm) -> tuple[str, ...]:
    """Layer tensors (ours, without the prefix) that the file holds but the model never reads."""
    return ("attn.wk_b", "attn.wv_b") if form.has_kv_b and form.split_rank else ()
