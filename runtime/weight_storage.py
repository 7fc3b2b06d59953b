"""How each tensor of a model sits on its device, and the bytes that takes: one answer, shared by the
loader (workers/model_runner.py) and the planner, so the plan counts what loading allocates.

- "quant": the GGUF block bytes as the file holds them (a kernels.quant.tensor.QuantTensor);
- "dense": decoded to the compute dtype (bf16 on GPUs): float files, types without a kernel yet, and the
  MLA up-projections (attn_kv_b / attn_k_b / attn_v_b: the absorbed W_UK / W_UV run as einsums; about
  1% of a V3 layer);
- "fp32": 1-D tensors (norms) and the router with its bias (routing is a discrete choice: keep it exact).

A model whose weights are dequantized on load (the oracle path, `dequantize=True`) has no "quant"
tensors. Routed gate and up projections are stacked into one gate|up tensor per expert, which needs them
in one type, and the quantized fused MoE reads both of its stacks as blocks: a layer where gate and up
differ in type, or one of the three is dense, keeps all three dense.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from gguf import GGMLQuantizationType

Q = GGMLQuantizationType
FP32 = 4

FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})
FP32_SUFFIXES = (".moe.router", ".moe.router_bias")
DENSE_SUFFIXES = (".attn.wkv_b", ".attn.wk_b", ".attn.wv_b")


def kernel_types() -> frozenset:
    """GGML types the quantized kernels read (kernels/quant's decoder table)."""
    from mlapipe.kernels.quant.types import QUANT_TYPES  # a table: imports neither torch nor triton

    return frozenset(Q(row.code) for row in QUANT_TYPES.values() if row.has_kernel) - FLOAT_TYPES


def storage_forms(tensors: Mapping, dequantize: bool = False) -> dict[str, str]:
    """Our tensor name -> "quant" | "dense" | "fp32", for an index of TensorInfo (shape, qtype)."""
    have_kernel = set() if dequantize else kernel_types()
    forms = {}
    for name, info in tensors.items():
        if len(info.shape) == 1 or name.endswith(FP32_SUFFIXES):
            forms[name] = "fp32"
        elif info.qtype in FLOAT_TYPES or name.endswith(DENSE_SUFFIXES) or info.qtype not in have_kernel:
            forms[name] = "dense"
        else:
            forms[name] = "quant"
    for name in list(forms):
        if name.endswith(".moe.w_gate"):
            experts = [name[: -len("w_gate")] + n for n in ("w_gate", "w_up", "w_down")]
            gate_up_differ = tensors[experts[0]].qtype != tensors[experts[1]].qtype
            if gate_up_differ or any(forms[n] != "quant" for n in experts):
                forms |= dict.fromkeys(experts, "dense")
    return forms


def device_bytes(info, form: str, element_size: int) -> int:
    if form == "quant":
        return int(info.num_bytes)
    return math.prod(info.shape) * (FP32 if form == "fp32" else element_size)


def fallback_tensors(tensors: Mapping) -> list[str]:
    """Quantized tensors that load dense (no kernel for their type, or an expert triple that cannot stay
    in blocks together): what inspect reports."""
    forms = storage_forms(tensors)
    return [
        name
        for name, info in tensors.items()
        if forms[name] == "dense" and info.qtype not in FLOAT_TYPES and not name.endswith(DENSE_SUFFIXES)
    ]


def bytes_by_type(tensors: Mapping, names, element_size: int, dequantize: bool = False) -> dict[str, int]:
    """Device bytes of `names` by the form they load in: the GGML type name for block bytes,
    "bf16"/"f32"-style names for decoded ones."""
    forms = storage_forms(tensors, dequantize)
    dense_name = {2: "BF16", 4: "F32"}.get(element_size, f"{8 * element_size}-bit")
    table: dict[str, int] = {}
    for name in names:
        info = tensors[name]
        form = forms[name]
        key = info.qtype.name if form == "quant" else ("F32" if form == "fp32" else dense_name)
        table[key] = table.get(key, 0) + device_bytes(info, form, element_size)
    return table
