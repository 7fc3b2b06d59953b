"""Stacking loaded weights into the forms the kernels take (gate|up, q|latent, shared experts as
experts), for plain tensors and QuantTensors alike.

A QuantTensor row is a run of whole blocks along K, so stacking rows (more output features) is a byte
concatenation of rows of the same type; splitting columns (K) is possible only at block boundaries.
Where a stack is impossible (two types, a split inside a block) the helpers return None and the caller
keeps the parts apart.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mlapipe.kernels.quant.tensor import QuantTensor

Weight = torch.Tensor | QuantTensor


def block_elems(w: QuantTensor) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType(w.qtype)][0]


def cat_rows(parts: list[Weight]) -> Weight | None:
    """Concatenates along the row (output-feature) dimension, dim -2; None if the parts cannot share one
    tensor (a QuantTensor beside a plain one, or two types)."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts, dim=-2)
    if not all(isinstance(p, QuantTensor) for p in parts) or len({p.qtype for p in parts}) > 1:
        return None
    data = torch.cat([p.data for p in parts], dim=-2)
    rows = sum(p.shape[-2] for p in parts)
    return QuantTensor(data, parts[0].qtype, (*parts[0].shape[:-2], rows, parts[0].shape[-1]))


def cat_experts(parts: list[Weight]) -> Weight | None:
    """Concatenates expert stacks (E_i, rows, cols) along the expert dimension; None as cat_rows."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts, dim=0)
    if not all(isinstance(p, QuantTensor) for p in parts) or len({p.qtype for p in parts}) > 1:
        return None
    data = torch.cat([p.data for p in parts], dim=0)
    return QuantTensor(data, parts[0].qtype, (data.shape[0], *parts[0].shape[1:]))


def rows_as_experts(w: Weight, n: int) -> Weight:
    """(n*I, cols) -> (n, I, cols): consecutive row ranges as n experts (a view)."""
    rows, cols = w.shape[-2], w.shape[-1]
    if isinstance(w, torch.Tensor):
        return w.view(n, rows // n, cols)
    return QuantTensor(w.data.view(n, rows // n, w.data.shape[-1]), w.qtype, (n, rows // n, cols))


def columns_as_experts(w: Weight, n: int) -> Weight | None:
    """(rows, n*I) -> (n, rows, I): consecutive column ranges as n experts; None where I is not whole
    blocks of the QuantTensor's type."""
    rows, cols = w.shape
    if isinstance(w, torch.Tensor):
        return w.view(rows, n, cols // n).transpose(0, 1)
    if (cols // n) % block_elems(w):
        return None
    data = w.data.view(rows, n, w.data.shape[-1] // n).transpose(0, 1).contiguous()
    return QuantTensor(data, w.qtype, (n, rows, cols // n))


def gate_up_per_expert(gate: Weight, up: Weight) -> Weight | None:
    """(E, I, H) gate and up -> (E, 2I, H): rows [0, I) gate, [I, 2I) up of each expert."""
    return cat_rows([gate, up])
