"""Stand-in for the Q8_0 entry of kernels/quant/types.py until that table lands: a Triton tile decoder of
the planned shape and its torch reference. Deleted once the real table is on main."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

Q8_0 = 8


@triton.jit
def decode_q8_0(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    """fp32 (len(rows), BLOCK_K): elements [k0, k0 + BLOCK_K) of each row; a block is fp16 d + 32 int8."""
    ks = k0 + tl.arange(0, BLOCK_K)
    block = w_ptr + rows[:, None].to(tl.int64) * row_bytes + (ks // 32 * 34)[None, :]
    lo = tl.load(block).to(tl.uint16)
    hi = tl.load(block + 1).to(tl.uint16)
    d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
    q = tl.load(block + 2 + (ks % 32)[None, :]).to(tl.int8, bitcast=True).to(tl.float32)
    return d * q


def dequantize_q8_0(data: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 (..., row_bytes) -> fp32 (..., cols)."""
    blocks = data.reshape(*data.shape[:-1], cols // 32, 34)
    d = blocks[..., :2].contiguous().view(torch.float16).float()
    q = blocks[..., 2:].contiguous().view(torch.int8).float()
    return (d * q).reshape(*data.shape[:-1], cols)


@dataclass(frozen=True)
class StubType:
    name: str
    block_elems: int
    block_bytes: int
    decode: object
    dequantize: object


TYPES = {Q8_0: StubType("Q8_0", 32, 34, decode_q8_0, dequantize_q8_0)}
