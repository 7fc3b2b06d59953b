"""silu(gate) * up in one kernel, for the dense SwiGLU MLPs of prefill-sized batches (the shared experts).

Their gate|up GEMM writes (T, n, 2, I): per token and shared expert, I gate values then I up values.
The torch form (`F.silu(g[..., 0, :]) * g[..., 1, :]`) is two strided elementwise kernels and a
temporary; here one program reads a row's gate and up halves and writes the product (~17 + 16 us a layer
at 2048 V2-Lite tokens became one pass over the same bytes). fp32 math, rounded once to the input dtype,
as torch's silu then mul of bf16 tensors round twice: the reference rounds the same way as torch.

At decode sizes x may be the fp32 partials of the quantized gate|up linear that made it, summed here as
its sum kernel would (kernels/partials.py): the same bits, one launch fewer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mlapipe.kernels.partials import check_partials, load_summed
from mlapipe.kernels.pdl import launch_options, wait_for_previous


@triton.jit
def _silu_mul_kernel(
    x_ptr,
    out_ptr,
    inter,
    partial_stride,
    BLOCK: tl.constexpr,
    NUM_PARTIALS: tl.constexpr = 0,  # 0: x is (rows, 2, I); n: n fp32 partial sums of it
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)  # one (token, expert) pair
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    kind = out_ptr.dtype.element_ty  # x's dtype, or the one its partials are rounded to
    gate = load_summed(x_ptr + row * 2 * inter, cols, mask, partial_stride, NUM_PARTIALS, kind)
    up = load_summed(x_ptr + row * 2 * inter + inter, cols, mask, partial_stride, NUM_PARTIALS, kind)
    # torch rounds silu(gate) to the dtype before the product: the same two roundings here
    activated = (gate / (1.0 + tl.exp(-gate))).to(kind)
    product = activated.to(tl.float32) * up
    tl.store(out_ptr + row * inter + cols, product.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor, partials_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (..., 2, I) contiguous: gate = x[..., 0, :], up = x[..., 1, :] -> silu(gate) * up, (..., I).
    With partials_dtype, x is a split linear's contiguous fp32 partials (n, ..., 2, I), summed in order and
    rounded to partials_dtype first; the result is (..., I) in partials_dtype."""
    if x.dim() < 2 or x.shape[-2] != 2 or not x.is_contiguous():
        raise ValueError(f"silu_mul takes a contiguous (..., 2, I) tensor, got {tuple(x.shape)}")
    num_partials, partial_stride, rows_of = 0, 0, x
    if partials_dtype is not None:
        check_partials(x, partials_dtype, "silu_mul")
        if x.dim() < 3:
            raise ValueError(f"silu_mul partials must be (n, ..., 2, I), got {tuple(x.shape)}")
        num_partials, partial_stride, rows_of = x.shape[0], x.stride(0), x[0]
    inter = x.shape[-1]
    out = torch.empty(rows_of.shape[:-2] + (inter,), dtype=partials_dtype or x.dtype, device=x.device)
    rows = out.numel() // max(1, inter)
    if rows and inter:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
            x, out, inter, partial_stride, BLOCK=block, NUM_PARTIALS=num_partials, num_warps=4,
            **launch_options(x.device),
        )  # fmt: skip
    return out
