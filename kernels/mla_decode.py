"""Absorbed MLA decode: MQA over the paged latent cache, split over the context, merged exactly.

Algorithm (FlashDecoding over a latent cache shared by all heads):
  Every query row is a (token, head) pair of one sequence; a sequence owns q_len * H rows, token-major
  (row r is token r // H, head r % H), so a row block holds BLOCK_M heads of one token when H >= BLOCK_M,
  or several tokens of a short chunk when H is small (V2-Lite). One program takes one row block of one
  sequence and one split of its context, streams the split's cache rows in tiles of BLOCK_N keys, and
  uses each tile twice: K = the whole 576-wide row (as 512 + 64: two dots, no padding) and V = its first
  512 values. So a tile is read once for BLOCK_M rows; that reuse is the point of MQA. Online softmax in
  base 2 (the scale folded with log2 e); a row sees key j iff j <= its position, which makes chunks of a
  few new tokens causal among themselves.
  The kernel writes fp32 partials (T, H, splits, C) and (T, H, splits), and a second kernel merges them
  exactly: lse = log sum_k exp(lse_k), out = sum_k exp(lse_k - lse) out_k. Given W_UV, the merge kernel
  also projects the latent (out_h = W_UV[h] @ out, a tl.dot over a fixed 16-token tile) and writes
  (T, H, V): at one token the separate bmm would be one more launch-bound kernel per layer.

Never-read guarantees (tested with NaN-poisoned slots and out-of-range table entries): block-table
entries are loaded only for keys below the sequence length, and cache rows only for those keys.

Shapes: T tokens in the batch, H heads, S sequences, D = C + R latent width (576 = 512 + 64 on real
models), P page (block) size.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mlapipe.kernels.mla_prefill import pin_if_requested
from mlapipe.kernels.pdl import launch_options, wait_for_previous

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # a constexpr, so kernels may read it
# Smallest share of the context worth a split of its own: below it the merge costs more than it saves.
MIN_KEYS_PER_SPLIT = 256
# The projecting merge's tile: 16 tokens (tl.dot's smallest M), 16 outputs, 4 warps. Fixed, never chosen
# from T: the tile fixes each output's summation order (batch invariance). Measured on an H200 at 512 + 64
# latent, V 128, 16 splits: 16 x 16 gives 128 programs a token on V2-Lite; 16 x 32 and 16 x 64 ran 10-20x
# slower (register-bound), and one token a program (a GEMV) 2-10x slower than this tile.
PROJECT_BLOCK_T, PROJECT_BLOCK_V, PROJECT_NUM_WARPS = 16, 16, 4


def decode_configs() -> list[triton.Config]:
    """Autotune space, keyed on the static dims (heads, latent widths), never on batch or context.

    MLAPIPE_AUTOTUNE=0 pins the first config that fits (fast, deterministic CI)."""
    configs = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        # deeper pipelines: more cache bytes in flight per multiprocessor for the memory-bound shapes
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=3),
    ]
    return configs


def _prune_for_heads(configs, named_args, **kwargs):
    """Row blocks wider than one token's heads add masked work for single-token decode; drop them.
    (Depends on the head count only, which is in the autotune key.)"""
    widest = max(16, triton.next_power_of_2(named_args["num_heads"]))
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= widest]
    return pin_if_requested(fitting or configs[:1])


@triton.autotune(
    configs=decode_configs(),
    key=["num_heads", "KV_LORA_RANK", "ROPE_DIM"],
    prune_configs_by={"early_config_prune": _prune_for_heads},
)
@triton.jit
def _mla_decode_kernel(
    q_ptr,  # (T, H, D)
    kv_ptr,  # (num_blocks, P, D)
    block_table_ptr,  # (S, max_blocks) int32
    seq_lens_ptr,  # (S,) int32
    query_start_loc_ptr,  # (S + 1,) int32
    out_ptr,  # (T, H, splits, C) fp32 partials
    lse_ptr,  # (T, H, splits) fp32
    stride_qt,
    stride_qh,
    stride_kvb,
    stride_kvp,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_os,
    stride_lt,
    stride_lh,
    stride_ls,
    num_heads,
    num_splits,
    scale_log2,  # softmax_scale * log2(e)
    KV_LORA_RANK: tl.constexpr,  # a power of two >= 16, like ROPE_DIM (the launcher checks)
    ROPE_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    seq = tl.program_id(0)
    row_block = tl.program_id(1)
    split = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    num_rows = q_len * num_heads
    if row_block * BLOCK_M >= num_rows:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_new = seq_len - q_len

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_valid = rows < num_rows
    token = rows // num_heads
    head = rows % num_heads
    position = first_new + token  # (BLOCK_M,) absolute position of each row's token

    # This split's keys, in whole tiles, and no further than the last row of the block can see.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    kv_start = split * split_len
    last_token = tl.minimum(q_len - 1, (row_block * BLOCK_M + BLOCK_M - 1) // num_heads)
    kv_end = tl.minimum(tl.minimum(kv_start + split_len, seq_len), first_new + last_token + 1)

    c = tl.arange(0, KV_LORA_RANK)
    r = tl.arange(0, ROPE_DIM)
    q_rows = q_ptr + (q_start + token).to(tl.int64) * stride_qt + head * stride_qh  # (BLOCK_M,)
    q_nope = tl.load(q_rows[:, None] + c[None, :], mask=row_valid[:, None], other=0.0)
    q_pe = tl.load(q_rows[:, None] + KV_LORA_RANK + r[None, :], mask=row_valid[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, KV_LORA_RANK], dtype=tl.float32)
    table_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    for tile_start in tl.range(kv_start, kv_end, BLOCK_N):
        keys = tile_start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        key_valid = keys < kv_end
        if PAGE_SIZE % BLOCK_N == 0:
            # The tile lies inside one page (tile_start < kv_end <= seq_len, so the page is in use): one
            # scalar table read, contiguous rows, and a load the software pipeliner can run ahead.
            block_id = tl.load(table_row + tile_start // PAGE_SIZE).to(tl.int64)
            kv_rows = (
                kv_ptr + block_id * stride_kvb + (tile_start % PAGE_SIZE + tl.arange(0, BLOCK_N)) * stride_kvp
            )
        else:
            block_ids = tl.load(table_row + keys // PAGE_SIZE, mask=key_valid, other=0)
            kv_rows = kv_ptr + block_ids.to(tl.int64) * stride_kvb + (keys % PAGE_SIZE) * stride_kvp
        # other=0 for keys past the end: their slots may hold NaN, and 0 * NaN would leak through p @ V.
        k_nope = tl.load(kv_rows[:, None] + c[None, :], mask=key_valid[:, None], other=0.0)
        k_pe = tl.load(kv_rows[:, None] + KV_LORA_RANK + r[None, :], mask=key_valid[:, None], other=0.0)
        scores = tl.dot(q_nope, tl.trans(k_nope)) + tl.dot(q_pe, tl.trans(k_pe))  # (BLOCK_M, BLOCK_N)
        visible = key_valid[None, :] & (keys[None, :] <= position[:, None])
        scores = tl.where(visible, scores * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # A row with nothing visible yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_nope.dtype), k_nope)  # V = first C values of the row
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
    out_rows = out_ptr + (q_start + token).to(tl.int64) * stride_ot + head * stride_oh + split * stride_os
    tl.store(out_rows[:, None] + c[None, :], out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    lse_rows = lse_ptr + (q_start + token).to(tl.int64) * stride_lt + head * stride_lh + split * stride_ls
    tl.store(lse_rows, lse, mask=row_valid)


@triton.jit
def _merge_rows(
    lse_rows,  # (ROWS,) pointers to each row's first partial lse; a row's splits are contiguous
    out_rows,  # (ROWS,) pointers to each row's first partial out
    row_valid,
    num_splits,
    stride_ps,
    KV_LORA_RANK: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
):
    """The exact merge of a block of (token, head) rows: (ROWS, C) fp32 and lse (ROWS,). Both merge
    kernels call it, so projecting changes nothing in how the splits are combined: per row, the same
    fp32 operations in the same split order, whatever the other rows of the block are."""
    splits = tl.arange(0, BLOCK_SPLITS)
    partial_lse = tl.load(
        lse_rows[:, None] + splits[None, :],
        mask=row_valid[:, None] & (splits[None, :] < num_splits),
        other=float("-inf"),
    )
    lse_max = tl.max(partial_lse, axis=1)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.sum(tl.exp(partial_lse - lse_max[:, None]), axis=1)
    lse = lse_max + tl.log(total)  # -inf only for a row that saw no key at all

    c = tl.arange(0, KV_LORA_RANK)
    mask = row_valid[:, None]
    acc = tl.zeros([lse_rows.shape[0], KV_LORA_RANK], dtype=tl.float32)
    for split in range(num_splits):
        weight = tl.exp(tl.load(lse_rows + split, mask=row_valid, other=float("-inf")) - lse)
        weight = tl.where(total > 0.0, weight, 0.0)
        part = tl.load(out_rows[:, None] + split * stride_ps + c[None, :], mask=mask, other=0.0)
        acc += weight[:, None] * part
    return acc, lse


@triton.jit
def _merge_splits_kernel(
    partial_out_ptr,  # (T, H, splits, C) fp32
    partial_lse_ptr,  # (T, H, splits) fp32
    out_ptr,  # (T, H, C)
    lse_ptr,  # (T, H) fp32
    num_heads,
    num_splits,
    stride_pt,
    stride_ph,
    stride_ps,
    stride_lpt,
    stride_lph,
    stride_ot,
    stride_oh,
    stride_lt,
    KV_LORA_RANK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    token = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_valid = heads < num_heads
    lse_rows = partial_lse_ptr + token.to(tl.int64) * stride_lpt + heads * stride_lph  # (BLOCK_H,)
    out_rows = partial_out_ptr + token.to(tl.int64) * stride_pt + heads * stride_ph  # (BLOCK_H,)
    acc, lse = _merge_rows(lse_rows, out_rows, head_valid, num_splits, stride_ps, KV_LORA_RANK, BLOCK_SPLITS)
    c = tl.arange(0, KV_LORA_RANK)
    final_rows = out_ptr + token.to(tl.int64) * stride_ot + heads * stride_oh
    tl.store(final_rows[:, None] + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=head_valid[:, None])
    tl.store(lse_ptr + token.to(tl.int64) * stride_lt + heads, lse, mask=head_valid)


@triton.jit
def _merge_splits_project_kernel(
    partial_out_ptr,  # (T, H, splits, C) fp32
    partial_lse_ptr,  # (T, H, splits) fp32
    w_uv_ptr,  # (H, V, C)
    out_ptr,  # (T, H, V)
    lse_ptr,  # (T, H) fp32
    num_tokens,
    num_splits,
    v_dim,
    stride_pt,
    stride_ph,
    stride_ps,
    stride_lpt,
    stride_lph,
    stride_wh,
    stride_wv,
    stride_ot,
    stride_oh,
    stride_lt,
    KV_LORA_RANK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Merge + W_UV for BLOCK_T tokens of one head and BLOCK_V of its outputs: grid (T / BLOCK_T, H,
    V / BLOCK_V), so one token still spreads over H * V / BLOCK_V programs. Every program of a (token
    block, head) redoes its merge (partials just written, read from L2) instead of passing the latent
    through memory and a second launch. The token tile gives the product an M dimension for tl.dot,
    whose per-row sum over C has one fixed order for the fixed tile: a row's result does not depend on
    the other rows of its tile, so not on T (padding rows are masked off)."""
    wait_for_previous(PDL)
    head = tl.program_id(1)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_valid = tokens < num_tokens
    lse_rows = partial_lse_ptr + tokens.to(tl.int64) * stride_lpt + head * stride_lph  # (BLOCK_T,)
    out_rows = partial_out_ptr + tokens.to(tl.int64) * stride_pt + head * stride_ph  # (BLOCK_T,)
    acc, lse = _merge_rows(lse_rows, out_rows, token_valid, num_splits, stride_ps, KV_LORA_RANK, BLOCK_SPLITS)
    # The unprojected path's latent is q.dtype; round it the same way so both paths see one number.
    latent = acc.to(out_ptr.dtype.element_ty)  # (BLOCK_T, C)
    c = tl.arange(0, KV_LORA_RANK)
    v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_valid = v < v_dim
    w_rows = w_uv_ptr + head.to(tl.int64) * stride_wh + v * stride_wv  # (BLOCK_V,)
    w = tl.load(w_rows[:, None] + c[None, :], mask=v_valid[:, None], other=0.0)
    # fp32 accumulation; "ieee" keeps an fp32 model's product in fp32 (TF32 would drop 13 mantissa bits),
    # bf16 / fp16 products are exact either way.
    projected = tl.dot(latent, tl.trans(w), input_precision="ieee")  # (BLOCK_T, BLOCK_V) fp32
    out_tile = out_ptr + tokens.to(tl.int64)[:, None] * stride_ot + head * stride_oh + v[None, :]
    tl.store(out_tile, projected.to(out_ptr.dtype.element_ty), mask=token_valid[:, None] & v_valid[None, :])
    if tl.program_id(2) == 0:  # every program of the (token block, head) has the same lse; one writes it
        tl.store(lse_ptr + tokens.to(tl.int64) * stride_lt + head, lse, mask=token_valid)


def choose_num_splits(num_seqs: int, row_blocks: int, max_seq_len: int, num_sms: int) -> int:
    """Splits of the context so that about four programs per multiprocessor are in flight, each over at
    least MIN_KEYS_PER_SPLIT keys (a pure function of sizes the caller knows, so no device sync)."""
    programs = max(1, num_seqs * row_blocks)
    wanted = math.ceil(4 * num_sms / programs)
    return max(1, min(wanted, math.ceil(max_seq_len / MIN_KEYS_PER_SPLIT), 64))


def decode_splits(num_seqs: int, num_heads: int, max_query_len: int, max_seq_len: int, device) -> int:
    """The split count mla_decode picks for these sizes (a CUDA-graph decode step keys its graph on it)."""
    nominal_row_blocks = math.ceil(num_heads * max_query_len / 64)
    sms = _multiprocessor_count(torch.device(device))
    return choose_num_splits(num_seqs, nominal_row_blocks, max_seq_len, sms)


def _is_dot_width(width: int) -> bool:
    return width >= 16 and width & (width - 1) == 0


def _multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so CPU tests exercise the merge


def mla_decode(
    q: torch.Tensor,  # (T, H, D) absorbed queries: W_UK^T q_nope (C) then roped q_pe (R)
    kv_cache: torch.Tensor,  # (num_blocks, block_size, D) latent cache, new tokens already written
    block_table: torch.Tensor,  # (S, max_blocks) int32
    seq_lens: torch.Tensor,  # (S,) int32: cached + new tokens per sequence
    query_start_loc: torch.Tensor,  # (S+1,) int32: sequence s owns q[query_start_loc[s]:query_start_loc[s+1]]
    softmax_scale: float,
    kv_lora_rank: int,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_kv_splits: int | None = None,
    w_uv: torch.Tensor | None = None,  # (H, V, C) in q.dtype: project the merged latent by it
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode. Returns out (T, H, C) in q.dtype and lse (T, H) fp32, like the reference.

    max_query_len / max_seq_len are hints that spare a device sync (the decode step of a serving loop
    knows them); without them they are read from the tensors. num_kv_splits overrides the split count.
    With w_uv, out is (T, H, V) = the q.dtype latent (as above) times w_uv[h] with fp32 accumulation,
    made by the merge kernel itself (at one token the separate bmm is a launch-bound kernel of its own).
    """
    T, H, D = q.shape
    if kv_cache.dim() != 3 or kv_cache.shape[-1] != D:
        raise ValueError(f"kv_cache must be (num_blocks, block_size, {D}), got {tuple(kv_cache.shape)}")
    if q.dtype != kv_cache.dtype:
        raise ValueError(f"q and kv_cache dtypes differ: {q.dtype} vs {kv_cache.dtype}")
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("q and kv_cache need a contiguous last dimension")
    rope_dim = D - kv_lora_rank
    if not (_is_dot_width(kv_lora_rank) and _is_dot_width(rope_dim)):
        # Whole-width tiles keep the loads unmasked along D; real models have 512 and 64.
        raise ValueError(f"kv_lora_rank {kv_lora_rank} and rope dim {rope_dim} must be powers of two >= 16")
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_seqs + 1 or block_table.shape[0] != num_seqs:
        raise ValueError("block_table, seq_lens and query_start_loc disagree on the number of sequences")
    if block_table.stride(-1) != 1:
        raise ValueError("block_table rows must be contiguous")
    if w_uv is not None and (w_uv.dim() != 3 or w_uv.shape[0] != H or w_uv.shape[2] != kv_lora_rank):
        raise ValueError(f"w_uv must be ({H}, V, {kv_lora_rank}), got {tuple(w_uv.shape)}")
    if w_uv is not None and (w_uv.dtype != q.dtype or w_uv.stride(-1) != 1):
        raise ValueError(f"w_uv must be {q.dtype} with a contiguous last dimension, got {w_uv.dtype}")
    out_width = kv_lora_rank if w_uv is None else w_uv.shape[1]
    out = torch.empty(T, H, out_width, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    if T == 0 or num_seqs == 0:
        return out, lse.fill_(float("-inf"))

    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    if num_kv_splits is None:
        num_kv_splits = decode_splits(num_seqs, H, max_query_len, max_seq_len, q.device)

    # fp32 partials even for one split: the autotune key includes argument dtypes, and one partial type
    # keeps one tuned config per head count; the merge of a single split is a cheap cast.
    target_out = torch.empty(T, H, num_kv_splits, kv_lora_rank, dtype=torch.float32, device=q.device)
    target_lse = torch.empty(T, H, num_kv_splits, dtype=torch.float32, device=q.device)

    def grid(meta):
        return (num_seqs, triton.cdiv(H * max_query_len, meta["BLOCK_M"]), num_kv_splits)

    _mla_decode_kernel[grid](
        q,
        kv_cache,
        block_table,
        seq_lens,
        query_start_loc,
        target_out,
        target_lse,
        q.stride(0),
        q.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        block_table.stride(0),
        target_out.stride(0),
        target_out.stride(1),
        target_out.stride(2),
        target_lse.stride(0),
        target_lse.stride(1),
        target_lse.stride(2),
        H,
        num_kv_splits,
        softmax_scale * LOG2E,
        KV_LORA_RANK=kv_lora_rank,
        ROPE_DIM=rope_dim,
        PAGE_SIZE=kv_cache.shape[1],
        **launch_options(q.device),
    )
    if w_uv is not None:
        _merge_and_project(target_out, target_lse, w_uv, out, lse)
        return out, lse
    block_h = min(16, triton.next_power_of_2(H))
    _merge_splits_kernel[(T, triton.cdiv(H, block_h))](
        target_out,
        target_lse,
        out,
        lse,
        H,
        num_kv_splits,
        target_out.stride(0),
        target_out.stride(1),
        target_out.stride(2),
        target_lse.stride(0),
        target_lse.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        KV_LORA_RANK=kv_lora_rank,
        BLOCK_H=block_h,
        BLOCK_SPLITS=triton.next_power_of_2(num_kv_splits),
        num_warps=4,
        **launch_options(target_out.device),
    )
    return out, lse


def _merge_and_project(partial_out, partial_lse, w_uv, out, lse) -> None:
    T, H, num_splits, kv_lora_rank = partial_out.shape
    v_dim = w_uv.shape[1]
    grid = (triton.cdiv(T, PROJECT_BLOCK_T), H, triton.cdiv(v_dim, PROJECT_BLOCK_V))
    _merge_splits_project_kernel[grid](
        partial_out,
        partial_lse,
        w_uv,
        out,
        lse,
        T,
        num_splits,
        v_dim,
        partial_out.stride(0),
        partial_out.stride(1),
        partial_out.stride(2),
        partial_lse.stride(0),
        partial_lse.stride(1),
        w_uv.stride(0),
        w_uv.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        KV_LORA_RANK=kv_lora_rank,
        BLOCK_T=PROJECT_BLOCK_T,
        BLOCK_V=PROJECT_BLOCK_V,
        BLOCK_SPLITS=triton.next_power_of_2(num_splits),
        num_warps=PROJECT_NUM_WARPS,
        **launch_options(partial_out.device),
    )
