"""Whole-tensor dequantization and the embedding-row gather, for any type in kernels/quant/types.py.

Both kernels are the same loop: a program takes BLOCK_R rows x BLOCK_K values, asks the type's tile
decoder (a tl.constexpr argument, kernels/quant/decoders.py) for them in fp32, and stores them in the
output dtype. `dequantize` walks the rows of the tensor; `quant_embedding` walks the rows named by the
token ids, so an embedding table stays in its blocks and only the looked-up rows are decoded.
Each launcher has a pure-torch reference of the same signature (through kernels/quant/reference.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mlapipe.kernels.pdl import launch_options, wait_for_previous
from mlapipe.kernels.quant import reference, tables
from mlapipe.kernels.quant.tensor import QuantTensor
from mlapipe.kernels.quant.types import quant_type, row_bytes

MAX_BLOCK_K = 256


@triton.jit
def _dequantize_kernel(
    w_ptr,  # uint8 (n_rows, row_bytes)
    table_ptr,  # int16 lookup table of the type (tables.py)
    out_ptr,  # (n_rows, cols)
    n_rows,
    cols,
    row_bytes,
    DECODE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k0 = tl.program_id(1) * BLOCK_K
    values = DECODE(w_ptr, tl.minimum(rows, n_rows - 1), row_bytes, k0, BLOCK_K, table_ptr)
    k = k0 + tl.arange(0, BLOCK_K)
    mask = (rows < n_rows)[:, None] & (k < cols)[None, :]
    offsets = rows.to(tl.int64)[:, None] * cols + k[None, :]
    tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _embedding_kernel(
    ids_ptr,  # (T,) token ids
    w_ptr,  # uint8 (vocab, row_bytes)
    table_ptr,
    out_ptr,  # (T, cols)
    num_tokens,
    vocab,
    cols,
    row_bytes,
    DECODE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    tokens = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ids = tl.load(ids_ptr + tokens, mask=tokens < num_tokens, other=0)
    # ids are checked by the caller; the clamp only keeps a bad one from reading past the table
    ids = tl.minimum(tl.maximum(ids, 0), vocab - 1)
    k0 = tl.program_id(1) * BLOCK_K
    values = DECODE(w_ptr, ids, row_bytes, k0, BLOCK_K, table_ptr)
    k = k0 + tl.arange(0, BLOCK_K)
    mask = (tokens < num_tokens)[:, None] & (k < cols)[None, :]
    offsets = tokens.to(tl.int64)[:, None] * cols + k[None, :]
    tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=mask)


def tile_k(qtype: int, cols: int) -> int:
    """BLOCK_K for walking rows of `cols` values: a power of two >= 32 that divides the row for block
    types (a tile never straddles the row's end), MAX_BLOCK_K for the plain floats (they mask)."""
    row = quant_type(qtype)
    if row.block_elems == 1:
        return min(MAX_BLOCK_K, max(32, triton.next_power_of_2(cols)))
    block_k = 32
    while block_k < MAX_BLOCK_K and cols % (2 * block_k) == 0:
        block_k *= 2
    return block_k


def check_quant_tensor(w: QuantTensor, what: str = "weight") -> None:
    """One-line errors for a QuantTensor whose bytes do not match its type and shape."""
    row = quant_type(w.qtype)
    assert w.data.dtype == torch.uint8, f"{what}: {row.name} blocks are uint8, got {w.data.dtype}"
    assert w.data.is_contiguous(), f"{what}: {row.name} blocks must be contiguous"
    want = (*w.shape[:-1], row_bytes(w.qtype, w.shape[-1]))
    assert tuple(w.data.shape) == want, (
        f"{what}: {row.name} of shape {list(w.shape)} needs bytes {list(want)}, got {list(w.data.shape)}"
    )


def _block_r(device: torch.device) -> int:
    return 16 if device.type == "cuda" else 4  # small tiles keep the interpreter quick


def dequantize(
    w: QuantTensor, dtype: torch.dtype = torch.float32, block_k: int | None = None
) -> torch.Tensor:
    """All of w's values, decoded on its device: (*lead, rows, cols) in `dtype`. `block_k` overrides the
    tile width (tests walk the same rows with every tile the decoders allow)."""
    check_quant_tensor(w)
    cols = w.shape[-1]
    n_rows = w.data.numel() // max(1, w.data.shape[-1])
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    if out.numel() == 0:
        return out
    block_r, block_k = _block_r(w.device), block_k or tile_k(w.qtype, cols)
    assert block_k >= 32 and block_k & (block_k - 1) == 0, f"block_k {block_k}: a power of two >= 32"
    assert quant_type(w.qtype).block_elems == 1 or cols % block_k == 0, (
        f"block_k {block_k} splits a row of {cols}"
    )
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(cols, block_k))
    _dequantize_kernel[grid](
        w.data,
        tables.device_table(w.qtype, w.device),
        out,
        n_rows,
        cols,
        w.data.shape[-1],
        DECODE=quant_type(w.qtype).decoder,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        **launch_options(w.data.device),
    )
    return out


def dequantize_reference(w: QuantTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return reference.dequantize_rows(w.data, w.qtype).reshape(w.shape).to(dtype)


def quant_embedding(ids: torch.Tensor, w: QuantTensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` (T,) of the embedding table w (vocab, cols), decoded by gather: (T, cols) in dtype."""
    check_quant_tensor(w, "embedding")
    assert len(w.shape) == 2, f"embedding: a (vocab, cols) table, got shape {list(w.shape)}"
    assert ids.dim() == 1 and not ids.is_floating_point(), (
        f"embedding: ids are (T,) integers, got {ids.dtype}"
    )
    vocab, cols = w.shape
    out = torch.empty((ids.shape[0], cols), dtype=dtype, device=w.device)
    if out.numel() == 0:
        return out
    ids = ids.to(w.device).contiguous()
    block_r, block_k = _block_r(w.device), tile_k(w.qtype, cols)
    grid = (triton.cdiv(ids.shape[0], block_r), triton.cdiv(cols, block_k))
    _embedding_kernel[grid](
        ids,
        w.data,
        tables.device_table(w.qtype, w.device),
        out,
        ids.shape[0],
        vocab,
        cols,
        w.data.shape[-1],
        DECODE=quant_type(w.qtype).decoder,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        **launch_options(ids.device),
    )
    return out


def quant_embedding_reference(ids: torch.Tensor, w: QuantTensor, dtype: torch.dtype) -> torch.Tensor:
    rows = w.data[ids.to(w.device).long()]
    return reference.dequantize_rows(rows, w.qtype).to(dtype)
