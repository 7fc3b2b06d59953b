"""Reads a deepseek2 GGUF file: metadata -> ModelConfig, a checked tensor index, dequantized weights.

One explicit name table maps GGUF tensor names to ours; every tensor in the file must be in it and have
the shape the config implies, so a bad file fails at open time with its path and the problem named,
not deep inside a matmul. Both MLA layouts are accepted: `attn_kv_b` alone (older files) or `attn_k_b`
+ `attn_v_b` (newer llama.cpp files); either way the model gets `attn.w_uk` (H, N, C) and
`attn.w_uv` (H, V, C), the per-head up-projections of the latent.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from mlapipe.runtime.config import ConfigError, ModelConfig
from mlapipe.runtime.gguf_check import check_gguf_file

GGUF_MAGIC = b"GGUF"

# Types we dequantize, all through gguf's own quants module.
SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in (
        ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
    )
)

# GGUF name -> our name. "{L}" is the layer index.
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


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the file and the problem."""


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


def expected_shapes(cfg: ModelConfig, layer: int, mla_layout: str) -> dict[str, tuple[int, ...]]:
    """Torch-order shapes of every tensor layer `layer` must have (and no others)."""
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
    if mla_layout == "kv_b":
        shapes["attn.wkv_b"] = (H * (N + V), C)
    else:
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


@dataclass(frozen=True)
class TensorInfo:
    gguf_name: str
    shape: tuple[int, ...]  # torch order (outermost first)
    qtype: GGMLQuantizationType
    num_bytes: int


class GGUFModel:
    """An open, validated deepseek2 GGUF file. Cheap to open: tensor data stays memory-mapped until read."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._reader = _open_reader(self.path)
        self.metadata = _decode_metadata(self._reader)
        try:
            self.config = ModelConfig.from_gguf_metadata(self.metadata)
        except ConfigError as e:
            raise ModelFileError(f"{self.path}: {e}") from None
        self.tensors = self._index_tensors()
        self.on_layer_read = None  # callable(layer index) after each read_layer: the engine's loading bar

    # index and validation -----------------------------------------------------------------------
    def _index_tensors(self) -> dict[str, TensorInfo]:
        index: dict[str, TensorInfo] = {}
        file_size = os.path.getsize(self.path)
        for t in self._reader.tensors:
            name = our_name(t.name)
            if name is None:
                raise ModelFileError(f"{self.path}: unknown tensor {t.name!r} for a deepseek2 model")
            if t.data_offset + t.n_bytes > file_size:
                raise ModelFileError(f"{self.path}: truncated file: tensor {t.name!r} runs past the end")
            if t.tensor_type not in SUPPORTED_TYPES:
                raise ModelFileError(
                    f"{self.path}: tensor {t.name!r} has unsupported quant type {t.tensor_type.name} "
                    f"(supported: {', '.join(sorted(q.name for q in SUPPORTED_TYPES))})"
                )
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            index[name] = TensorInfo(t.name, shape, GGMLQuantizationType(t.tensor_type), int(t.n_bytes))
        self._check_shapes(index)
        return index

    @cached_property
    def mla_layout(self) -> str:
        """'kv_b' (attn_kv_b) or 'k_b_v_b' (attn_k_b + attn_v_b), judged from layer 0."""
        return "k_b_v_b" if "layers.0.attn.wk_b" in self.tensors else "kv_b"

    def _check_shapes(self, index: dict[str, TensorInfo]) -> None:
        cfg = self.config
        self.tensors = index  # mla_layout reads it
        want = {"embed": (cfg.vocab_size, cfg.hidden_size), "norm": (cfg.hidden_size,)}
        want["head"] = (cfg.vocab_size, cfg.hidden_size)
        for layer in range(cfg.num_layers):
            want |= expected_shapes(cfg, layer, self.mla_layout)
        for name, shape in want.items():
            if name not in index:
                raise ModelFileError(f"{self.path}: missing tensor {gguf_name(name)!r}")
            if index[name].shape != shape:
                raise ModelFileError(
                    f"{self.path}: tensor {index[name].gguf_name!r} has shape {list(index[name].shape)}, "
                    f"expected {list(shape)} from the model's metadata"
                )
        for name, info in index.items():
            if name not in want:
                raise ModelFileError(f"{self.path}: unexpected tensor {info.gguf_name!r} for this config")

    # reading --------------------------------------------------------------------------------------
    def read(self, name: str) -> np.ndarray:
        """One tensor of ours, dequantized to float32, in torch order."""
        info = self.tensors[name]
        raw = self._reader.tensors[self._tensor_positions[info.gguf_name]].data
        values = gguf_quants.dequantize(np.asarray(raw), info.qtype)
        # a copy: F32 data would otherwise stay a read-only view of the memory-mapped file
        return np.array(values, dtype=np.float32, copy=True).reshape(info.shape)

    @cached_property
    def _tensor_positions(self) -> dict[str, int]:
        return {t.name: i for i, t in enumerate(self._reader.tensors)}

    def layer_tensor_names(self, layer: int) -> list[str]:
        prefix = f"layers.{layer}."
        return [name for name in self.tensors if name.startswith(prefix)]

    def read_layer(self, layer: int) -> dict[str, np.ndarray]:
        """Layer weights under our names, with the MLA up-projection in canonical form:
        attn.w_uk (H, N, C) and attn.w_uv (H, V, C) whichever layout the file uses."""
        cfg = self.config
        H, N, V = cfg.num_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        prefix = f"layers.{layer}."
        weights = {name[len(prefix) :]: self.read(name) for name in self.layer_tensor_names(layer)}
        if self.on_layer_read is not None:
            self.on_layer_read(layer)
        if "attn.wkv_b" in weights:
            kv_b = weights.pop("attn.wkv_b").reshape(H, N + V, cfg.kv_lora_rank)
            weights["attn.w_uk"], weights["attn.w_uv"] = kv_b[:, :N], kv_b[:, N:]
        else:
            weights["attn.w_uk"] = weights.pop("attn.wk_b").transpose(0, 2, 1)
            weights["attn.w_uv"] = weights.pop("attn.wv_b")
        return {k: np.ascontiguousarray(v) for k, v in weights.items()}

    # summaries ----------------------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors.values())

    def type_summary(self) -> dict[str, tuple[int, int]]:
        """quant type -> (tensor count, bytes)."""
        summary: dict[str, tuple[int, int]] = {}
        for t in self.tensors.values():
            count, size = summary.get(t.qtype.name, (0, 0))
            summary[t.qtype.name] = (count + 1, size + t.num_bytes)
        return summary


def _open_reader(path: str) -> GGUFReader:
    check_gguf_file(path, ModelFileError)  # the whole file's structure, before gguf's reader trusts it
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # gguf's parser raises bare ValueError/IndexError on damaged headers
        raise ModelFileError(f"{path}: truncated or corrupt GGUF header ({type(e).__name__}: {e})") from None


def _decode_metadata(reader: GGUFReader) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.contents()
        meta[name] = value
    return meta
