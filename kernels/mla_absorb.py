"""The absorbed MLA query of a decode step in one kernel: q_nope @ W_UK per head, the pairwise rope of
q_pe, both rounded to q's dtype and written side by side in the cache's dtype. The torch path (rope in
place, the einsum's bmm and its strided-view copies, cat, cast) takes 3-4 launches a layer, each costing
its launch at one token, not its bytes.

Batch invariance: every program takes BLOCK_T token rows (fixed, never a function of T) and one tl.dot
over the whole N, so a token's products are summed in the same order alone or in any batch.

q may also be the fp32 partials of the split linear that made it, summed here as its sum kernel would
(kernels/partials.py): the same bits, and the decode step's q sum kernel is gone. absorb_and_write_latent
also writes the step's latent cache rows (kernels/fused_norm_rope.py's write, by the programs of one more
head index): one launch for both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mlapipe.kernels.fused_norm_rope import (
    ABSORB_WARPS,
    latent_rows,
    norm_warps,
    write_latent_cache,
    write_latent_row,
)
from mlapipe.kernels.partials import check_partials, load_summed, triton_dtype
from mlapipe.kernels.pdl import launch_options, wait_for_previous

BLOCK_T = 16  # token rows a program: tl.dot's minimum; fixed so a token's bits do not depend on the batch
BLOCK_C = 64  # latent columns a program: H * C / 64 programs (1024 on V3) keep every SM streaming W_UK


@triton.jit
def _absorb_query_kernel(
    q_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, T, C,
    q_token_stride, q_head_stride, partial_stride, w_head_stride, w_row_stride, cos_stride, out_token_stride,
    out_head_stride, N: tl.constexpr, R: tl.constexpr, KIND: tl.constexpr, COMPUTE: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    NUM_PARTIALS: tl.constexpr,  # 0: q is (T, H, N + R); n: n fp32 partial sums of it (n, T, H, N + R)
    # the decode step's latent cache write, by the programs of head index H (absorb_and_write_latent)
    latent_ptr, kv_norm_ptr, slot_ptr, cache_ptr, H, latent_stride, latent_partial_stride, cache_stride, eps,
    WRITE_LATENT: tl.constexpr, LATENT_KIND: tl.constexpr, BLOCK_LATENT: tl.constexpr,
    NUM_LATENT_PARTIALS: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    wait_for_previous(PDL)
    head = tl.program_id(1)
    if WRITE_LATENT and head == H:
        if tl.program_id(2) == 0:  # one program a token block writes its tokens' rows
            for i in range(BLOCK_T):
                token = tl.program_id(0) * BLOCK_T + i
                if token < T:
                    write_latent_row(
                        latent_ptr, kv_norm_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, token.to(tl.int64),
                        latent_stride, latent_partial_stride, cos_stride, cache_stride, C, R // 2, eps,
                        LATENT_KIND, BLOCK_LATENT, R // 2, NUM_LATENT_PARTIALS,
                    )  # fmt: skip
    else:
        _absorb_tile(
            q_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, T, C, head.to(tl.int64), q_token_stride, q_head_stride,
            partial_stride, w_head_stride, w_row_stride, cos_stride, out_token_stride, out_head_stride, N, R, KIND,
            COMPUTE, IEEE, BLOCK_T, BLOCK_C, NUM_PARTIALS,
        )  # fmt: skip


@triton.jit
def _absorb_tile(
    q_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, T, C, head,
    q_token_stride, q_head_stride, partial_stride, w_head_stride, w_row_stride, cos_stride, out_token_stride,
    out_head_stride, N: tl.constexpr, R: tl.constexpr, KIND: tl.constexpr, COMPUTE: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, NUM_PARTIALS: tl.constexpr,
):  # fmt: skip
    """The absorbed query of BLOCK_T tokens, one head, BLOCK_C latent columns (and the head's rope)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    token_ok = (tokens < T)[:, None]
    q_rows = q_ptr + tokens.to(tl.int64)[:, None] * q_token_stride + head * q_head_stride
    out_rows = out_ptr + tokens.to(tl.int64)[:, None] * out_token_stride + head * out_head_stride
    # rounded to q's dtype (KIND) first, then to the output's, as the torch path's einsum and cast do
    kind: tl.constexpr = KIND
    out_kind = out_ptr.dtype.element_ty

    n = tl.arange(0, N)
    q_nope = load_summed(q_rows, n[None, :], token_ok, partial_stride, NUM_PARTIALS, KIND).to(COMPUTE)
    w = tl.load(
        w_ptr + head * w_head_stride + n[:, None] * w_row_stride + cols[None, :],
        mask=(cols < C)[None, :],
        other=0.0,
    ).to(COMPUTE)
    if IEEE:  # fp32 operands: true fp32 products, not TF32, so results match the fp32 reference
        latent = tl.dot(q_nope, w, input_precision="ieee")
    else:
        latent = tl.dot(q_nope, w)
    tl.store(out_rows + cols[None, :], latent.to(kind).to(out_kind), mask=token_ok & (cols < C)[None, :])

    # the rope of q[..., N:] once per token and head, as _rope_pairs_kernel computes it (same bits)
    if tl.program_id(2) == 0:
        r = tl.arange(0, R)
        x = load_summed(q_rows, N + r[None, :], token_ok, partial_stride, NUM_PARTIALS, KIND)
        even, odd = tl.split(tl.reshape(x, (BLOCK_T, R // 2, 2)))
        i = tl.arange(0, R // 2)
        angle_at = tokens.to(tl.int64)[:, None] * cos_stride + i[None, :]
        c = tl.load(cos_ptr + angle_at, mask=token_ok, other=0.0)
        s = tl.load(sin_ptr + angle_at, mask=token_ok, other=0.0)
        rotated = tl.reshape(
            tl.join((even * c - odd * s).to(kind), (even * s + odd * c).to(kind)), (BLOCK_T, R)
        )
        tl.store(out_rows + C + r[None, :], rotated.to(out_kind), mask=token_ok)


def _is_dot_width(width: int) -> bool:
    return width >= 16 and width & (width - 1) == 0


def absorb_query(
    q: torch.Tensor,
    w_uk: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out_dtype: torch.dtype,
    partials_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """q (T, H, N + R), unit stride along the last dim (token and head strides free: a column slice of the
    projection); w_uk (H, N, C), unit last stride; cos, sin (T, R/2) fp32. Returns (T, H, C + R) contiguous
    in out_dtype: [:C] = q_nope @ w_uk[h] (fp32 accumulation), [C:] = the pairwise rope of q[..., N:], each
    rounded to q.dtype and then to out_dtype. q is not modified. N and R must be powers of two >= 16.
    With partials_dtype, q is a split linear's fp32 partials (n, T, H, N + R), summed in order and rounded
    to partials_dtype first (kernels/partials.py), which then stands for q.dtype."""
    return _launch(q, w_uk, cos, sin, out_dtype, partials_dtype, None)


def absorb_and_write_latent(
    q: torch.Tensor,
    latent: torch.Tensor,
    w_uk: torch.Tensor,
    kv_norm: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    out_dtype: torch.dtype,
    q_partials_dtype: torch.dtype | None = None,
    latent_partials_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A decode step's two jobs before its attention in one launch: absorb_query(q, w_uk, cos, sin, out_dtype,
    q_partials_dtype), returned, and write_latent_cache(latent, kv_norm, cos, sin, eps, kv_cache, slot_mapping,
    latent_partials_dtype) (kernels/fused_norm_rope.py), each with the bits of its own kernel. The latent
    rows' rope width must be q's (the model's rope dim); kv_norm's width is w_uk's C."""
    if kv_norm.shape[0] != w_uk.shape[2]:
        raise ValueError(f"kv_norm ({kv_norm.shape[0]},) must be w_uk's latent width C = {w_uk.shape[2]}")
    if norm_warps(triton.next_power_of_2(kv_norm.shape[0])) != ABSORB_WARPS:  # C > 1024: keep the norm's bits
        write_latent_cache(latent, kv_norm, cos, sin, eps, kv_cache, slot_mapping, latent_partials_dtype)
        return absorb_query(q, w_uk, cos, sin, out_dtype, q_partials_dtype)
    return _launch(
        q, w_uk, cos, sin, out_dtype, q_partials_dtype, (latent, kv_norm, eps, kv_cache, slot_mapping, latent_partials_dtype)
    )  # fmt: skip


def _launch(q, w_uk, cos, sin, out_dtype, partials_dtype, write) -> torch.Tensor:
    partials = q
    if partials_dtype is not None:
        check_partials(q, partials_dtype, "absorb_query")
        if q.dim() != 4:
            raise ValueError(f"absorb_query partials must be (n, T, H, N + R), got {tuple(q.shape)}")
        q = q[0]
    if q.dim() != 3 or w_uk.dim() != 3 or w_uk.shape[0] != q.shape[1] or w_uk.shape[1] >= q.shape[2]:
        raise ValueError(f"w_uk {tuple(w_uk.shape)} must be (H, N, C) for q (T, H, N + R) {tuple(q.shape)}")
    q_dtype = partials_dtype or q.dtype
    T, H, width = q.shape
    N, C = w_uk.shape[1], w_uk.shape[2]
    R = width - N
    if not _is_dot_width(N):
        raise ValueError(f"w_uk's N = {N} must be a power of two >= 16 (a tl.dot width)")
    if not _is_dot_width(R):
        raise ValueError(f"q's rope width R = {R} (q's last dim minus N) must be a power of two >= 16")
    if cos.shape != (T, R // 2) or sin.shape != (T, R // 2):
        raise ValueError(
            f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be (T, R/2) = {(T, R // 2)}"
        )
    if q.stride(-1) != 1 or w_uk.stride(-1) != 1:
        raise ValueError("q and w_uk need a unit stride along their last dim")
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(T, H, C + R, dtype=out_dtype, device=q.device)
    latent_args, latent_meta = _latent_args(write, T, C, R, out)
    if T and H:
        # 16-bit operands of one dtype go to the tensor cores as they are (their products are exact in the
        # fp32 accumulator); anything else is upcast to fp32 with IEEE products
        half = q_dtype == w_uk.dtype and q_dtype in (torch.float16, torch.bfloat16)
        compute = (tl.float16 if q_dtype == torch.float16 else tl.bfloat16) if half else tl.float32
        heads = H + 1 if write else H  # the programs of head index H write the latent rows
        grid = (triton.cdiv(T, BLOCK_T), heads, max(1, triton.cdiv(C, BLOCK_C)))  # C = 0 still ropes
        num_partials = partials.shape[0] if partials_dtype is not None else 0
        _absorb_query_kernel[grid](
            partials, w_uk, cos, sin, out, T, C, q.stride(0), q.stride(1), partials.stride(0) if num_partials else 0,
            w_uk.stride(0), w_uk.stride(1), cos.stride(0), out.stride(0), out.stride(1), N=N, R=R,
            KIND=triton_dtype(q_dtype), COMPUTE=compute, IEEE=not half, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
            NUM_PARTIALS=num_partials, **latent_args, H=H, **latent_meta, num_warps=ABSORB_WARPS,
            **launch_options(q.device),
        )  # fmt: skip
    return out


def _latent_args(write, T: int, C: int, R: int, out: torch.Tensor) -> tuple[dict, dict]:
    """The cache write's kernel arguments (pointers and strides, then constexprs); placeholders without one."""
    if write is None:
        pointers = dict(latent_ptr=out, kv_norm_ptr=out, slot_ptr=out, cache_ptr=out)
        strides = dict(latent_stride=0, latent_partial_stride=0, cache_stride=0, eps=0.0)
        meta = dict(WRITE_LATENT=False, LATENT_KIND=tl.float32, BLOCK_LATENT=16, NUM_LATENT_PARTIALS=0)
        return {**pointers, **strides}, meta
    latent, kv_norm, eps, kv_cache, slot_mapping, partials_dtype = write
    latent, rows, num_partials, partial_stride, kind = latent_rows(latent, partials_dtype, "absorb_and_write_latent")
    if rows.shape != (T, C + R):
        raise ValueError(f"latent rows {tuple(rows.shape)} must be (T, C + R) = {(T, C + R)}")
    flat_cache = kv_cache.view(-1, kv_cache.shape[-1])  # raises where the reference's view would
    if flat_cache.shape[1] != C + R or slot_mapping.shape != (T,):
        raise ValueError(f"kv_cache rows {flat_cache.shape[1]} and slot_mapping {tuple(slot_mapping.shape)} "
                         f"must be C + R = {C + R} wide and (T,) = ({T},)")  # fmt: skip
    pointers = dict(latent_ptr=latent, kv_norm_ptr=kv_norm, slot_ptr=slot_mapping, cache_ptr=flat_cache)
    strides = dict(latent_stride=rows.stride(0), latent_partial_stride=partial_stride,
                   cache_stride=flat_cache.stride(0), eps=eps)  # fmt: skip
    meta = dict(WRITE_LATENT=True, LATENT_KIND=triton_dtype(kind), BLOCK_LATENT=triton.next_power_of_2(C),
                NUM_LATENT_PARTIALS=num_partials)  # fmt: skip
    return {**pointers, **strides}, meta
