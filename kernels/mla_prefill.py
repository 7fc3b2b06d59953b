"""Decompressed MLA prefill (FlashMLA-2): per head step, decompress K_nope and V, then causal attention.

Algorithm, for each head step [h0, h1) of `head_steps` (kernels/amb.py keeps a step's K_nope + V under
the stage's budget):
  0. (once) gather every active sequence's latent rows through its block table into one contiguous
     (L, C + R) buffer, sequence after sequence (L = sum of their lengths, cached prefix + new tokens);
  1. `_decompress_kernel` twice: K_nope[h] = c_kv @ W_UK[h]^T -> (steps, L, N) and V[h] = c_kv @ W_UV[h]^T
     -> (steps, L, V), head-major so a program's K/V tiles are contiguous. The rope key k_pe stays in the
     latent buffer: it is shared by all heads, so it is neither copied per head nor concatenated to K;
  2. `_prefill_attention_kernel`: flash attention with K head dim N + R (two dots, 128 + 64, no padding)
     and V head dim V (not padded to N + R), causal with an offset: query i of a sequence with q_len new
     tokens sits at position seq_len - q_len + i and sees keys j <= that. Key tiles that every row of a
     query block sees run without masks; only the tiles on the diagonal are masked. Query blocks of the
     longest rows are scheduled first (they have the most tiles).
Every program computes one head of one query block, and the decompression config does not depend on the
step size, so each head's bits are the same whatever the head steps: amb changes memory, not the output.

Shapes: T new tokens in the batch, H heads, S sequences, C kv_lora_rank (512), R rope dim (64),
N qk_nope dim (128), V v head dim (128), L gathered latent rows, P page (block) size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mlapipe.kernels.host import upload
from mlapipe.kernels.pdl import launch_options, wait_for_previous

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # a constexpr, so kernels may read it


def pin_if_requested(configs: list[triton.Config]) -> list[triton.Config]:
    """MLAPIPE_AUTOTUNE=0 pins the first config (fast, deterministic CI). Applied while pruning, since
    Triton skips pruning when only one config is declared."""
    return configs[:1] if os.environ.get("MLAPIPE_AUTOTUNE", "1") == "0" else configs


def decompress_configs() -> list[triton.Config]:
    """Autotune spaces are keyed on static dims only, so a head step's size never changes a config."""
    return [
        triton.Config({"BLOCK_L": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_L": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_L": 128, "BLOCK_K": 128}, num_warps=8, num_stages=2),
    ]


def attention_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=2),
    ]


def _fit_reduction_block(configs, named_args, **kwargs):
    """A reduction step wider than kv_lora_rank would read past the latent; narrow it (small test dims)."""
    width = kwargs["KV_LORA_RANK"]
    fitted = []
    for config in configs:
        block = dict(config.kwargs, BLOCK_K=min(config.kwargs["BLOCK_K"], width))
        fitted.append(triton.Config(block, num_warps=config.num_warps, num_stages=config.num_stages))
    return pin_if_requested(fitted)


def _prune_attention(configs, named_args, **kwargs):
    return pin_if_requested(configs)


@triton.autotune(
    configs=decompress_configs(),
    key=["KV_LORA_RANK", "OUT_DIM"],
    prune_configs_by={"early_config_prune": _fit_reduction_block},
)
@triton.jit
def _decompress_kernel(
    latent_ptr,  # (L, C + R)
    w_ptr,  # (H, OUT_DIM, C): W_UK or W_UV
    out_ptr,  # (steps, L, OUT_DIM)
    num_rows,
    head_offset,
    stride_lat,
    stride_wh,
    stride_wo,
    stride_oh,
    stride_ol,
    KV_LORA_RANK: tl.constexpr,
    OUT_DIM: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    head = tl.program_id(1)
    row_valid = rows < num_rows
    o = tl.arange(0, OUT_DIM)
    k = tl.arange(0, BLOCK_K)
    a_ptrs = latent_ptr + rows.to(tl.int64)[:, None] * stride_lat + k[None, :]  # (BLOCK_L, BLOCK_K)
    w_ptrs = w_ptr + (head_offset + head).to(tl.int64) * stride_wh + o[None, :] * stride_wo + k[:, None]
    acc = tl.zeros([BLOCK_L, OUT_DIM], dtype=tl.float32)
    for k0 in tl.range(0, KV_LORA_RANK, BLOCK_K):
        a = tl.load(a_ptrs + k0, mask=row_valid[:, None], other=0.0)
        w = tl.load(w_ptrs + k0)  # (BLOCK_K, OUT_DIM)
        acc = tl.dot(a, w, acc)
    out_ptrs = out_ptr + head.to(tl.int64) * stride_oh + rows.to(tl.int64)[:, None] * stride_ol + o[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q_nope,
    q_pe,
    tile_start,
    kv_end,
    position,  # (BLOCK_M,)
    k_nope_ptrs,  # (BLOCK_N, N) pointers of the tile at key 0
    k_pe_ptrs,  # (BLOCK_N, R)
    v_ptrs,  # (BLOCK_N, V)
    stride_kl,
    stride_lat,
    stride_vl,
    scale_log2,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # False where every row sees every key of the tile
):
    keys = tile_start + tl.arange(0, BLOCK_N)
    if MASKED:
        key_valid = keys < kv_end
        k_nope = tl.load(k_nope_ptrs + tile_start * stride_kl, mask=key_valid[:, None], other=0.0)
        k_pe = tl.load(k_pe_ptrs + tile_start * stride_lat, mask=key_valid[:, None], other=0.0)
        v = tl.load(v_ptrs + tile_start * stride_vl, mask=key_valid[:, None], other=0.0)
    else:
        k_nope = tl.load(k_nope_ptrs + tile_start * stride_kl)
        k_pe = tl.load(k_pe_ptrs + tile_start * stride_lat)
        v = tl.load(v_ptrs + tile_start * stride_vl)
    scores = tl.dot(q_nope, tl.trans(k_nope)) + tl.dot(q_pe, tl.trans(k_pe))  # (BLOCK_M, BLOCK_N)
    scores = scores * scale_log2
    if MASKED:
        visible = key_valid[None, :] & (keys[None, :] <= position[:, None])
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    # Rows past the sequence's queries may see nothing; subtract 0 there so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.autotune(
    configs=attention_configs(),
    key=["NOPE_DIM", "ROPE_DIM", "V_DIM"],
    prune_configs_by={"early_config_prune": _prune_attention},
)
@triton.jit
def _prefill_attention_kernel(
    q_ptr,  # (T, H, N + R)
    k_nope_ptr,  # (steps, L, N)
    v_ptr,  # (steps, L, V)
    latent_ptr,  # (L, C + R): k_pe = latent[:, C:]
    out_ptr,  # (T, H, V)
    lse_ptr,  # (T, H) fp32
    q_start_ptr,  # (S_active,) int32, one entry per sequence with new tokens
    q_len_ptr,
    seq_len_ptr,
    kv_start_ptr,  # first row of the sequence in the latent buffer
    head_offset,
    num_step_heads,
    stride_qt,
    stride_qh,
    stride_kh,
    stride_kl,
    stride_vh,
    stride_vl,
    stride_lat,
    stride_ot,
    stride_oh,
    stride_lt,
    scale_log2,
    KV_LORA_RANK: tl.constexpr,
    NOPE_DIM: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    seq = tl.program_id(0) // num_step_heads
    step_head = tl.program_id(0) % num_step_heads
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)  # the longest rows first
    q_len = tl.load(q_len_ptr + seq)
    if m_block * BLOCK_M >= q_len:
        return
    q_start = tl.load(q_start_ptr + seq)
    seq_len = tl.load(seq_len_ptr + seq)
    kv_start = tl.load(kv_start_ptr + seq).to(tl.int64)
    first_new = seq_len - q_len
    head = head_offset + step_head

    i = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = i < q_len
    position = first_new + i
    n = tl.arange(0, NOPE_DIM)
    r = tl.arange(0, ROPE_DIM)
    d = tl.arange(0, V_DIM)
    key = tl.arange(0, BLOCK_N)
    q_rows = q_ptr + (q_start + i).to(tl.int64) * stride_qt + head * stride_qh
    q_nope = tl.load(q_rows[:, None] + n[None, :], mask=row_valid[:, None], other=0.0)
    q_pe = tl.load(q_rows[:, None] + NOPE_DIM + r[None, :], mask=row_valid[:, None], other=0.0)
    k_nope_ptrs = (
        k_nope_ptr + step_head.to(tl.int64) * stride_kh + (kv_start + key)[:, None] * stride_kl + n[None, :]
    )
    k_pe_ptrs = latent_ptr + (kv_start + key)[:, None] * stride_lat + KV_LORA_RANK + r[None, :]
    v_ptrs = v_ptr + step_head.to(tl.int64) * stride_vh + (kv_start + key)[:, None] * stride_vl + d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, V_DIM], dtype=tl.float32)
    # Keys up to the block's first position are visible to all of its rows: whole tiles of them unmasked.
    full_end = (first_new + m_block * BLOCK_M + 1) // BLOCK_N * BLOCK_N
    kv_end = first_new + tl.minimum(m_block * BLOCK_M + BLOCK_M, q_len)  # past the block's last position
    for tile_start in tl.range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q_nope, q_pe, tile_start, kv_end, position, k_nope_ptrs, k_pe_ptrs, v_ptrs,
            stride_kl, stride_lat, stride_vl, scale_log2, BLOCK_N, False,
        )  # fmt: skip
    for tile_start in tl.range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q_nope, q_pe, tile_start, kv_end, position, k_nope_ptrs, k_pe_ptrs, v_ptrs,
            stride_kl, stride_lat, stride_vl, scale_log2, BLOCK_N, True,
        )  # fmt: skip

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    out_rows = out_ptr + (q_start + i).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    tl.store(lse_ptr + (q_start + i).to(tl.int64) * stride_lt + head, lse, mask=row_valid)


def _is_dot_width(width: int) -> bool:
    return width >= 16 and width & (width - 1) == 0


@dataclass
class PrefillPlan:
    """What every layer's prefill launch needs from one micro-batch's sequences, made once per
    micro-batch: host values the scheduler already had, and the latent gather rows and kernel metadata
    uploaded once. With it a layer's launch never reads the GPU, so the host can queue all the layers
    ahead of the GPU instead of waiting for it at each one (and a CUDA graph can capture the launch)."""

    num_tokens: int  # T: rows of q
    num_sequences: int  # entries of meta (sequences with new tokens; more where a graph pads)
    max_query_len: int  # bounds the query blocks of the grid
    latent_rows: torch.Tensor  # (L,) flat cache rows, sequence after sequence
    meta: (
        torch.Tensor
    )  # (4, num_sequences) int32 (int64 from a graph): query start, query length, kv length, kv start
    zero_unowned_rows: bool = False  # rows of q that no sequence owns (a graph's padding) get zeros


def prefill_plan(block_table: torch.Tensor, lengths: list[int], starts: list[int], page: int) -> PrefillPlan:
    if len(starts) != len(lengths) + 1:
        raise ValueError("query_start_loc must have S + 1 entries and end at the number of tokens")
    device = block_table.device
    q_lens = [b - a for a, b in zip(starts, starts[1:])]
    active = [s for s, n in enumerate(q_lens) if n > 0]
    if any(lengths[s] < q_lens[s] for s in active):
        raise ValueError("a sequence has more new tokens than its length")
    active_lengths = [lengths[s] for s in active]
    kv_starts = [0]
    for n in active_lengths[:-1]:
        kv_starts.append(kv_starts[-1] + n)
    total = sum(active_lengths)
    lens = upload(active_lengths, torch.int64, device)
    seq_of_row = torch.repeat_interleave(upload(active, torch.int64, device), lens, output_size=total)
    position = torch.arange(total, device=device) - torch.repeat_interleave(
        upload(kv_starts, torch.int64, device), lens, output_size=total
    )
    blocks = block_table[seq_of_row, position // page].long()
    meta = upload(
        [[starts[s] for s in active], [q_lens[s] for s in active], active_lengths, kv_starts],
        torch.int32,
        device,
    )
    return PrefillPlan(
        num_tokens=starts[-1],
        num_sequences=len(active),
        max_query_len=max(q_lens, default=0),
        latent_rows=blocks * page + position % page,
        meta=meta,
    )


def mla_prefill(
    q: torch.Tensor,  # (T, H, N + R): q_nope then roped q_pe
    kv_cache: torch.Tensor,  # (num_blocks, block_size, C + R), new tokens already written
    block_table: torch.Tensor,  # (S, max_blocks) int32
    seq_lens: torch.Tensor,  # (S,) int32
    query_start_loc: torch.Tensor,  # (S+1,) int32
    w_uk: torch.Tensor,  # (H, N, C): k_nope_h = w_uk[h] @ c_kv
    w_uv: torch.Tensor,  # (H, V, C): v_h = w_uv[h] @ c_kv
    softmax_scale: float,
    head_steps: list[tuple[int, int]] | None = None,
    plan: PrefillPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decompressed MLA prefill. Returns out (T, H, V) in q.dtype and lse (T, H) fp32, like the reference.

    head_steps (kernels.amb.plan_prefill_head_steps) bounds the decompressed K_nope + V held at once.
    plan (prefill_plan, made once per micro-batch) spares the launch every host read; without one it
    reads seq_lens and query_start_loc on the host (syncs with the GPU).
    """
    T, H, qk_dim = q.shape
    _, nope_dim, kv_lora_rank = w_uk.shape
    v_dim = w_uv.shape[1]
    rope_dim = qk_dim - nope_dim
    if kv_cache.dim() != 3 or kv_cache.shape[-1] != kv_lora_rank + rope_dim:
        raise ValueError(
            f"kv_cache must be (num_blocks, block_size, {kv_lora_rank + rope_dim}), "
            f"got {tuple(kv_cache.shape)}"
        )
    if w_uk.shape[0] != H or w_uv.shape != (H, v_dim, kv_lora_rank):
        raise ValueError(f"w_uk {tuple(w_uk.shape)} / w_uv {tuple(w_uv.shape)} do not match {H} heads")
    if not all(_is_dot_width(w) for w in (kv_lora_rank, nope_dim, rope_dim, v_dim)):
        # Whole-width tiles keep every load unmasked along the head dims; real models have 512/128/64/128.
        raise ValueError("kv_lora_rank, qk_nope, rope and v dims must be powers of two >= 16")
    if len({q.dtype, kv_cache.dtype, w_uk.dtype, w_uv.dtype}) != 1:
        raise ValueError("q, kv_cache, w_uk and w_uv must share one dtype")
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1 or w_uk.stride(-1) != 1 or w_uv.stride(-1) != 1:
        raise ValueError("q, kv_cache, w_uk and w_uv need a contiguous last dimension")
    steps = head_steps or [(0, H)]
    if steps[0][0] != 0 or steps[-1][1] != H or any(a[1] != b[0] for a, b in zip(steps, steps[1:])):
        raise ValueError(f"head_steps {steps} must tile [0, {H}) in order")

    if plan is None:
        plan = prefill_plan(block_table, seq_lens.tolist(), query_start_loc.tolist(), kv_cache.shape[1])
    if plan.num_tokens != T:
        raise ValueError("query_start_loc must have S + 1 entries and end at the number of tokens")
    make = torch.zeros if plan.zero_unowned_rows else torch.empty
    out = make(T, H, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    if plan.num_sequences == 0:
        return out, lse

    latent = kv_cache.reshape(-1, kv_cache.shape[-1])[plan.latent_rows]  # (L, C + R)
    num_rows = latent.shape[0]
    meta = plan.meta
    max_q_len = plan.max_query_len

    for h0, h1 in steps:
        step_heads = h1 - h0
        k_nope = torch.empty(step_heads, num_rows, nope_dim, dtype=q.dtype, device=q.device)
        values = torch.empty(step_heads, num_rows, v_dim, dtype=q.dtype, device=q.device)
        for weight, target in ((w_uk, k_nope), (w_uv, values)):

            def decompress_grid(meta_args, step_heads=step_heads):
                return (triton.cdiv(num_rows, meta_args["BLOCK_L"]), step_heads)

            _decompress_kernel[decompress_grid](
                latent, weight, target, num_rows, h0,
                latent.stride(0), weight.stride(0), weight.stride(1), target.stride(0), target.stride(1),
                KV_LORA_RANK=kv_lora_rank, OUT_DIM=target.shape[-1], **launch_options(latent.device),
            )  # fmt: skip

        def attention_grid(meta_args, step_heads=step_heads):
            return (plan.num_sequences * step_heads, triton.cdiv(max_q_len, meta_args["BLOCK_M"]))

        _prefill_attention_kernel[attention_grid](
            q, k_nope, values, latent, out, lse, meta[0], meta[1], meta[2], meta[3],
            h0, step_heads,
            q.stride(0), q.stride(1), k_nope.stride(0), k_nope.stride(1), values.stride(0), values.stride(1),
            latent.stride(0), out.stride(0), out.stride(1), lse.stride(0),
            softmax_scale * LOG2E,
            KV_LORA_RANK=kv_lora_rank, NOPE_DIM=nope_dim, ROPE_DIM=rope_dim, V_DIM=v_dim,
            **launch_options(q.device),
        )  # fmt: skip
    return out, lse
