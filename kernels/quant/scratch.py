"""Decoders of the dequantized scratch: rows of plain bf16 / fp16 / fp32 values (row_bytes = cols times
the element size), the same signature as kernels/quant/decoders.py, with wide loads. The GEMMs run over
a scratch with these and give the bits they give decoding the blocks themselves (the scratch holds the
decoded values already rounded to the dtype the dot takes)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def decode_bf16_scratch(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    """The scratch's decoder: bf16 rows (row_bytes = 2 * cols) read as bf16 (wide loads) -> fp32."""
    row_start = (w_ptr + rows.to(tl.int64)[:, None] * row_bytes).to(tl.pointer_type(tl.bfloat16))
    return tl.load(row_start + k0 + tl.arange(0, BLOCK_K)[None, :]).to(tl.float32)


@triton.jit
def decode_fp16_scratch(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    row_start = (w_ptr + rows.to(tl.int64)[:, None] * row_bytes).to(tl.pointer_type(tl.float16))
    return tl.load(row_start + k0 + tl.arange(0, BLOCK_K)[None, :]).to(tl.float32)


@triton.jit
def decode_fp32_scratch(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    row_start = (w_ptr + rows.to(tl.int64)[:, None] * row_bytes).to(tl.pointer_type(tl.float32))
    return tl.load(row_start + k0 + tl.arange(0, BLOCK_K)[None, :])


SCRATCH_DECODERS = {
    torch.bfloat16: decode_bf16_scratch,
    torch.float16: decode_fp16_scratch,
    torch.float32: decode_fp32_scratch,
}
