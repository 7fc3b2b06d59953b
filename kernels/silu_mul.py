"""silu(gate) * up in one kernel, for the dense SwiGLU MLPs of prefill-sized batches (the shared experts).

Their gate|up GEMM writes (T, n, 2, I): per token and shared expert, I gate values then I up values.
The torch form (`F.silu(g[..., 0, :]) * g[..., 1, :]`) is two strided elementwise kernels and a
temporary; here one program reads a row's gate and up halves and writes the product (~17 + 16 us a layer
at 2048 V2-Lite tokens became one pass over the same bytes). fp32 math, rounded once to the input dtype,
as torch's silu then mul of bf16 tensors round twice: the reference rounds the same way as torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mlapipe.kernels.pdl import launch_options, wait_for_previous


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)  # one (token, expert) pair
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0)
    # torch rounds silu(gate) to the dtype before the product: the same two roundings here
    activated = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)
    product = activated.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * inter + cols, product.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2, I) contiguous: gate = x[..., 0, :], up = x[..., 1, :] -> silu(gate) * up, (..., I)."""
    if x.dim() < 2 or x.shape[-2] != 2 or not x.is_contiguous():
        raise ValueError(f"silu_mul takes a contiguous (..., 2, I) tensor, got {tuple(x.shape)}")
    inter = x.shape[-1]
    out = torch.empty(x.shape[:-2] + (inter,), dtype=x.dtype, device=x.device)
    rows = out.numel() // max(1, inter)
    if rows and inter:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
            x, out, inter, BLOCK=block, num_warps=4, **launch_options(x.device)
        )
    return out
