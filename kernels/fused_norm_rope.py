"""Triton RMSNorm and pairwise rope, one kernel each. Their torch references (kernels/reference.py,
same signatures) take ~7 and ~9 elementwise kernels; a decode step runs 3 norms and 2 ropes per layer,
and at small batches each kernel costs its launch, not its bytes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, x_row_stride, width, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / width + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_pairs_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    x_token_stride,
    x_head_stride,
    cos_stride,
    heads,
    half,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    i = tl.arange(0, BLOCK_HALF)
    mask = (h < heads)[:, None] & (i < half)[None, :]
    src = x_ptr + token * x_token_stride + h[:, None] * x_head_stride + 2 * i[None, :]
    even = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + token * cos_stride + i, mask=i < half, other=0.0)[None, :]
    s = tl.load(sin_ptr + token * cos_stride + i, mask=i < half, other=0.0)[None, :]
    dst = out_ptr + (token * heads + h[:, None]) * (2 * half) + 2 * i[None, :]
    kind = out_ptr.dtype.element_ty
    tl.store(dst, (even * c - odd * s).to(kind), mask=mask)
    tl.store(dst + 1, (even * s + odd * c).to(kind), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., W) with unit stride along W (rows may be strided, e.g. a column slice), weight (W,):
    x / rms(x) * weight in fp32, returned contiguous in x.dtype."""
    width = x.shape[-1]
    rows = x if x.dim() == 2 and x.stride(-1) == 1 else x.reshape(-1, width)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(width)
        _rms_norm_kernel[(rows.shape[0],)](
            rows,
            weight,
            out,
            rows.stride(0),
            width,
            eps,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
    return out


def apply_rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates adjacent pairs (x[2i], x[2i+1]) by angle i. x (T, ..., R), the last dim of unit stride;
    cos, sin (T, R/2) fp32. Returns a contiguous tensor of x's shape and dtype."""
    T, R = x.shape[0], x.shape[-1]
    view = x if x.dim() == 3 else x.reshape(T, -1, R)
    if view.stride(-1) != 1:
        view = view.contiguous()
    heads, half = view.shape[1], R // 2
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if T and heads:
        block_heads = min(16, triton.next_power_of_2(heads))
        grid = (T, triton.cdiv(heads, block_heads))
        _rope_pairs_kernel[grid](
            view, cos, sin, out, view.stride(0), view.stride(1), cos.stride(0), heads, half,
            BLOCK_HEADS=block_heads, BLOCK_HALF=triton.next_power_of_2(half),
        )  # fmt: skip
    return out
