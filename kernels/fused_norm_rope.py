"""Triton RMSNorm and pairwise rope, one kernel each. Their torch references (kernels/reference.py,
same signatures) take ~7 and ~9 elementwise kernels; a decode step runs 3 norms and 2 ropes per layer,
and at small batches each kernel costs its launch, not its bytes.

write_latent_cache fuses the latent cache write (kv norm of latent[:, :C], rope of latent[:, C:], cast,
scatter to the slot_mapping rows) into one kernel, where the torch path takes ~5 launches.

rms_norm, add_rms_norm and write_latent_cache also take a split linear's fp32 partials in place of their
input and sum them as its sum kernel would (kernels/partials.py): the same bits, one launch fewer."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mlapipe.kernels.partials import check_partials, load_summed, triton_dtype
from mlapipe.kernels.pdl import launch_options, wait_for_previous

# A norm's sum of squares is reduced over the warps' layout, so its last bit depends on the warp count: every
# norm here takes norm_warps(BLOCK), and the fused decode kernel (kernels/mla_absorb.py) writes latent rows with
# the absorbed query's 4 warps, which is norm_warps for every latent width up to 1024 (DeepSeek's: 512).
ABSORB_WARPS = 4


def norm_warps(block: int) -> int:
    return max(ABSORB_WARPS, min(16, block // 256))


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    x_row_stride,
    partial_stride,
    width,
    eps,
    BLOCK: tl.constexpr,
    NUM_PARTIALS: tl.constexpr,  # 0: x is (rows, W); n: x is n fp32 partial sums (n, rows, W)
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = load_summed(x_ptr + row * x_row_stride, cols, mask, partial_stride, NUM_PARTIALS, out_ptr.dtype.element_ty)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / width + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    delta_ptr,
    w_ptr,
    sum_ptr,
    out_ptr,
    x_row_stride,
    delta_row_stride,
    partial_stride,
    width,
    eps,
    BLOCK: tl.constexpr,
    NUM_PARTIALS: tl.constexpr,  # 0: delta is (T, W); n: delta is n fp32 partial sums (n, T, W)
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    # the split linear's sum (quant/linear.py _sum_chunks_kernel) where delta is its partials
    delta_row = delta_ptr + row * delta_row_stride
    delta = load_summed(delta_row, cols, mask, partial_stride, NUM_PARTIALS, sum_ptr.dtype.element_ty)
    # rounded to the stream's dtype first, as torch's add does; the norm reads the rounded sum
    total = (x + delta).to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + row * width + cols, total, mask=mask)
    t = total.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(t * t, axis=0) / width + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (t * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_pairs_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    x_token_stride,
    x_head_stride,
    out_token_stride,
    out_head_stride,
    cos_stride,
    heads,
    half,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # Each head's R values are loaded and stored as one contiguous run and split into (even, odd) pairs
    # in registers: loads of every other element lost the vector width (a pp2048 prompt spent 21 us a
    # layer here, ~200 GB/s). The arithmetic, and so the bits, are the same.
    wait_for_previous(PDL)
    token = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    r = tl.arange(0, 2 * BLOCK_HALF)
    mask = (h < heads)[:, None] & (r < 2 * half)[None, :]
    x = tl.load(
        x_ptr + token * x_token_stride + h[:, None] * x_head_stride + r[None, :], mask=mask, other=0.0
    )
    even, odd = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_HEADS, BLOCK_HALF, 2)))
    i = tl.arange(0, BLOCK_HALF)
    c = tl.load(cos_ptr + token * cos_stride + i, mask=i < half, other=0.0)[None, :]
    s = tl.load(sin_ptr + token * cos_stride + i, mask=i < half, other=0.0)[None, :]
    kind = out_ptr.dtype.element_ty
    rotated = tl.reshape(
        tl.join((even * c - odd * s).to(kind), (even * s + odd * c).to(kind)), (BLOCK_HEADS, 2 * BLOCK_HALF)
    )
    tl.store(
        out_ptr + token * out_token_stride + h[:, None] * out_head_stride + r[None, :], rotated, mask=mask
    )


@triton.jit
def _write_latent_cache_kernel(
    latent_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    slot_ptr,
    cache_ptr,
    latent_stride,
    partial_stride,
    cos_stride,
    cache_stride,
    width,
    half,
    eps,
    KIND: tl.constexpr,  # the activations' dtype: latent's, or the one its partials are rounded to
    BLOCK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    NUM_PARTIALS: tl.constexpr,  # 0: latent is (T, C + R); n: n fp32 partial sums (n, T, C + R)
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    token = tl.program_id(0).to(tl.int64)
    write_latent_row(
        latent_ptr, w_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, token, latent_stride, partial_stride, cos_stride,
        cache_stride, width, half, eps, KIND, BLOCK, BLOCK_HALF, NUM_PARTIALS,
    )  # fmt: skip


@triton.jit
def write_latent_row(
    latent_ptr, w_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, token, latent_stride, partial_stride, cos_stride,
    cache_stride, width, half, eps, KIND: tl.constexpr, BLOCK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    NUM_PARTIALS: tl.constexpr,
):  # fmt: skip
    """One token's cache row (write_latent_cache); also run by kernels/mla_absorb.py's fused decode kernel,
    with as many warps (norm_warps), so both lay the norm's reduction out alike: the same bits."""
    src = latent_ptr + token * latent_stride
    dst = cache_ptr + tl.load(slot_ptr + token).to(tl.int64) * cache_stride
    # round to the activations' dtype first, then to the cache's, as the reference's two casts do
    kind: tl.constexpr = KIND
    cache_kind = cache_ptr.dtype.element_ty
    # the kv norm of the first `width` values, as _rms_norm_kernel computes it
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = load_summed(src, cols, mask, partial_stride, NUM_PARTIALS, KIND)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / width + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + cols, (x * rstd * w).to(kind).to(cache_kind), mask=mask)
    # the rope of the last 2 * half values, as _rope_pairs_kernel computes it
    i = tl.arange(0, BLOCK_HALF)
    pair_mask = i < half
    even = load_summed(src, width + 2 * i, pair_mask, partial_stride, NUM_PARTIALS, KIND)
    odd = load_summed(src, width + 2 * i + 1, pair_mask, partial_stride, NUM_PARTIALS, KIND)
    c = tl.load(cos_ptr + token * cos_stride + i, mask=pair_mask, other=0.0)
    s = tl.load(sin_ptr + token * cos_stride + i, mask=pair_mask, other=0.0)
    tl.store(dst + width + 2 * i, (even * c - odd * s).to(kind).to(cache_kind), mask=pair_mask)
    tl.store(dst + width + 2 * i + 1, (even * s + odd * c).to(kind).to(cache_kind), mask=pair_mask)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm in one pass: (x + delta, rms_norm(x + delta) * weight), both
    contiguous in x.dtype; x, delta (T, W) with unit stride along W. Bit for bit the add then rms_norm.

    delta may also be (n, T, W) fp32 partial sums of a split linear (ops.linear(..., unsummed=True)):
    summed here in order and rounded to x.dtype, as the linear's own sum kernel would, so the same bits
    with one launch fewer."""
    T, width = x.shape
    partials = delta.dim() == 3
    if partials:
        if delta.shape[1:] != x.shape or delta.dtype != torch.float32 or not delta.is_contiguous():
            raise ValueError(f"partials {tuple(delta.shape)} must be contiguous fp32 (n, *{tuple(x.shape)})")
    elif delta.shape != x.shape or delta.dtype != x.dtype or delta.stride(-1) != 1:
        raise ValueError(f"x {tuple(x.shape)} and delta {tuple(delta.shape)} must match, unit last stride")
    if x.stride(-1) != 1:
        raise ValueError(f"x {tuple(x.shape)} needs a unit last stride")
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if T:
        block = triton.next_power_of_2(width)
        _add_rms_norm_kernel[(T,)](
            x, delta, weight, total, out, x.stride(0), delta.stride(-2), delta.stride(0) if partials else 0,
            width, eps, BLOCK=block, NUM_PARTIALS=delta.shape[0] if partials else 0,
            num_warps=norm_warps(block), **launch_options(x.device),
        )  # fmt: skip
    return total, out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, partials_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x (..., W) with unit stride along W (rows may be strided, e.g. a column slice), weight (W,):
    x / rms(x) * weight in fp32, returned contiguous in x.dtype. With partials_dtype, x is a split
    linear's fp32 partials (n, T, W) (rows may be strided), summed in order and rounded to partials_dtype
    first (kernels/partials.py); the result is (T, W) in partials_dtype."""
    width = x.shape[-1]
    if partials_dtype is not None:
        check_partials(x, partials_dtype, "rms_norm")
        if x.dim() != 3:
            raise ValueError(f"rms_norm partials must be (n, T, W), got {tuple(x.shape)}")
        rows, num_partials, partial_stride = x[0], x.shape[0], x.stride(0)
        out = torch.empty(rows.shape, dtype=partials_dtype, device=x.device)
    else:
        rows = x if x.dim() == 2 and x.stride(-1) == 1 else x.reshape(-1, width)
        num_partials, partial_stride = 0, 0
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(width)
        _rms_norm_kernel[(rows.shape[0],)](
            x if num_partials else rows, weight, out, rows.stride(0), partial_stride, width, eps,
            BLOCK=block, NUM_PARTIALS=num_partials, num_warps=norm_warps(block),
            **launch_options(rows.device),
        )  # fmt: skip
    return out


def apply_rope_pairs(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotates adjacent pairs (x[2i], x[2i+1]) by angle i. x (T, ..., R), the last dim of unit stride;
    cos, sin (T, R/2) fp32. Returns a contiguous tensor of x's shape and dtype, or writes `out` (x's
    shape and dtype, unit stride along R, rows may be strided; `out` may be x itself: in place)."""
    T, R = x.shape[0], x.shape[-1]
    view = x if x.dim() == 3 else x.reshape(T, -1, R)
    if view.stride(-1) != 1:
        view = view.contiguous()
    heads, half = view.shape[1], R // 2
    cos, sin = cos.contiguous(), sin.contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    target = out if out.dim() == 3 else out.view(T, -1, R)
    if target.shape != view.shape or target.stride(-1) != 1 or out.dtype != x.dtype:
        raise ValueError(
            f"out {tuple(out.shape)} must have x's shape {tuple(x.shape)}, dtype and a unit last stride"
        )
    if T and heads:
        block_heads = min(16, triton.next_power_of_2(heads))
        grid = (T, triton.cdiv(heads, block_heads))
        # each program reads its pairs before writing them: out may alias x
        _rope_pairs_kernel[grid](
            view, cos, sin, target, view.stride(0), view.stride(1), target.stride(0), target.stride(1),
            cos.stride(0), heads, half, BLOCK_HEADS=block_heads, BLOCK_HALF=triton.next_power_of_2(half),
            **launch_options(view.device),
        )  # fmt: skip
    return out


def latent_rows(latent: torch.Tensor, partials_dtype: torch.dtype | None, name: str):
    """(the tensor a kernel reads, its (T, C + R) rows, partial count, partial stride, the activations' dtype)
    of write_latent_cache's latent argument."""
    if partials_dtype is None:
        latent = latent if latent.stride(-1) == 1 else latent.contiguous()
        return latent, latent, 0, 0, latent.dtype
    check_partials(latent, partials_dtype, name)
    if latent.dim() != 3:
        raise ValueError(f"{name}: latent partials must be (n, T, C + R), got {tuple(latent.shape)}")
    return latent, latent[0], latent.shape[0], latent.stride(0), partials_dtype


def write_latent_cache(
    latent: torch.Tensor,
    kv_norm: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    partials_dtype: torch.dtype | None = None,
) -> None:
    """latent (T, C + R), unit stride along the last dim (rows may be strided); kv_norm (C,); cos, sin
    (T, R/2) fp32; kv_cache (num_blocks, block_size, C + R), written in place at the flat rows
    slot_mapping (T,) int64: rms_norm(latent[:, :C]) * kv_norm, then the pairwise rope of latent[:, C:],
    each rounded to latent.dtype and then to kv_cache.dtype. Slots must be in range (no negative ones).
    With partials_dtype, latent is a split linear's fp32 partials (n, T, C + R), summed in order and
    rounded to partials_dtype first (kernels/partials.py), which then stands for latent.dtype."""
    latent, rows, num_partials, partial_stride, kind = latent_rows(latent, partials_dtype, "write_latent_cache")
    T, width = rows.shape[0], kv_norm.shape[0]
    half = (rows.shape[1] - width) // 2
    flat_cache = kv_cache.view(-1, kv_cache.shape[-1])  # raises where the reference's view would
    cos, sin = cos.contiguous(), sin.contiguous()
    if T:
        block = triton.next_power_of_2(width)
        _write_latent_cache_kernel[(T,)](
            latent, kv_norm, cos, sin, slot_mapping, flat_cache,
            rows.stride(0), partial_stride, cos.stride(0), flat_cache.stride(0), width, half, eps,
            KIND=triton_dtype(kind), BLOCK=block, BLOCK_HALF=triton.next_power_of_2(max(half, 1)),
            NUM_PARTIALS=num_partials, num_warps=norm_warps(block), **launch_options(rows.device),
        )  # fmt: skip
