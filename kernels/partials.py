"""A split linear's fp32 partial sums, summed by the kernel that consumes them.

At decode sizes a quantized linear runs its K chunks as programs of their own and leaves one fp32 partial
per chunk (kernels/quant/linear.py, `quant_linear(..., unsummed=True)`: (n, T, N)); its sum kernel adds
them in chunk order to zero and rounds to the activations' dtype. A consumer that reads a handful of
values a token (a norm, the latent cache write, the absorbed query) can do that sum itself, with the same
additions in the same order and the same rounding, so the same bits and one launch fewer a layer.

Convention of the kernels that take them: `partials_dtype` (the launcher's argument) set means the input is
(n, *shape) fp32 partials to be summed and rounded to that dtype; None means the input itself. The torch
form is kernels/reference.py's `sum_partials` (the references import no Triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def load_summed(ptr, offsets, mask, partial_stride, NUM_PARTIALS: tl.constexpr, KIND: tl.constexpr):
    """fp32 values at ptr + offsets: with NUM_PARTIALS = 0 the input's own values; else
    0 + p0 + p1 + ... (the partials `partial_stride` elements apart, all loads in flight at once), rounded
    to KIND as the split linear's sum kernel stores them."""
    offsets, mask = tl.broadcast(offsets, mask)
    if NUM_PARTIALS == 0:
        values = tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        total = tl.zeros(offsets.shape, tl.float32)
        for p in tl.static_range(NUM_PARTIALS):
            total += tl.load(ptr + p * partial_stride + offsets, mask=mask, other=0.0)
        values = total.to(KIND).to(tl.float32)
    return values


def check_partials(partials: torch.Tensor, dtype: torch.dtype | None, name: str) -> None:
    """A one-line error for partials that are not fp32 with a unit last stride, or a dtype that is not float."""
    if partials.dtype != torch.float32 or partials.stride(-1) != 1:
        raise ValueError(f"{name} partials must be fp32 with a unit last stride, got {partials.dtype}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"{name}'s partials_dtype must be a float dtype, got {dtype}")


def triton_dtype(dtype: torch.dtype):
    """The tl dtype a kernel rounds to (a constexpr argument)."""
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
