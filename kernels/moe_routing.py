"""DeepSeek MoE routing, and the deterministic ordering of (token, slot) rows that the grouped GEMMs read.

Routing (`moe_routing`, one kernel). One program scores BLOCK_T tokens; a row of the tile holds all E
experts of one token, padded to BLOCK_E (a power of two) with -inf.
  - scores: softmax over experts (V2) or sigmoid (V3), fp32;
  - choice = scores + bias (V3 `exp_probs_b`; the bias picks experts, it never weighs them);
  - groups (num_groups > 1): a group's score is its best choice (softmax, V2 group_limited_greedy) or
    the sum of its two best (sigmoid, V3 noaux_tc); the topk_groups best groups stay, the rest go to -inf;
  - top-k: K rounds of "take the maximum, lowest expert index on ties, knock it out". Ids come out in
    descending choice order; weights are the unbiased scores of those experts, renormalised over the K
    slots when asked, times `scale`;
  - shared experts (num_shared = n > 0): slots K..K+n-1 of every token are experts E..E+n-1 with weight
    1, so the fused MoE runs the shared MLP as always-on experts in the same launch.

Ordering (`moe_align`, no atomics; one kernel when R <= 128, else three over ~64 chunks). Rows are numbered
r = t*K + k (token t, slot k), R = T*K of them. Every output below is a pure function of topk_ids, so the same ids give the same bits.
  1. `_count_chunk_kernel`, one program per CHUNK rows: chunk_counts (num_chunks, E) int32, rows of each
     expert in each chunk (a one-hot sum, no atomics).
  2. `_scan_kernel`, one program: walks the chunks in order for expert_counts (E,) int32; pads each
     expert's run up to a multiple of BLOCK_M; expert_start (E,) = exclusive prefix sum of padded runs;
     writes tile_expert (max_tiles,) int32 (the expert of each BLOCK_M tile, -1 past the last run) and R
     at every padding position; chunk_offsets (num_chunks, E) int32 = expert_start[e] + rows of expert e
     in earlier chunks.
  3. `_scatter_kernel`, one program per chunk: row r of expert e goes to position
     chunk_offsets[chunk, e] + (rows of e before r inside the chunk); so within an expert rows keep
     increasing r (a stable sort by expert). Padding and real positions are disjoint: no fill, no race.
  `_align_one_chunk_kernel` runs the same three steps (shared @triton.jit helpers) in one program.
  sorted_row_ids (max_tiles * BLOCK_M,) int32: row ids by expert; padding holds R (no such row).
  row_positions (R,) int32: the inverse, the sorted position of each row (the scatter writes both), so a
  kernel walking a token's slots in order finds their rows' GEMM outputs without a search.
  max_tiles = cdiv(R, BLOCK_M) + min(E, R) bounds the used tiles for any routing, so every buffer size
  depends on T, K, E and BLOCK_M alone (CUDA-graph friendly); unused tiles say -1 and their programs exit.

Both in one launch (`moe_route_and_align`, the MoE block's call): when the route kernel's one program holds
the whole batch and R <= 128 (`route_align_fits`: a decode step of up to 16 tokens on V2-Lite, 14 on V3),
`_route_align_kernel` runs the route program (the shared `_route_tokens`), a CTA barrier (its ids' stores
then visible to every thread of the program), then the one-chunk ordering (`_align_one_chunk`) on those
ids, with the two kernels' tiles: the same weights, ids and layout, bit for bit (a compile test checks the
route part's sm_90 layouts are the route kernel's). Larger batches run `moe_routing` then `moe_align`.
BLOCK_M is the caller's: the grouped GEMMs' row tile (`row_tile` of kernels/fused_moe.py and
kernels/quant/fused_moe.py), which take the layout as `layout=`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mlapipe.kernels.pdl import launch_options, wait_for_previous

# ----------------------------------------------------------------------------------------------------
# routing


@triton.jit
def _route_tokens(
    logits_ptr,  # (T, E) any float dtype, row stride stride_logits
    bias_ptr,  # (E,) fp32, read only when HAS_BIAS
    weights_ptr,  # (T, K + NUM_SHARED) fp32 out
    ids_ptr,  # (T, K + NUM_SHARED) int64 out
    num_tokens,
    num_experts,
    stride_logits,
    scale,
    TOP_K: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    USE_SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Routes this program's BLOCK_T tokens (the module header): their weights and ids to memory."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    token_ok = tokens < num_tokens
    expert_ok = experts < num_experts
    neg_inf = float("-inf")

    logits = tl.load(
        logits_ptr + tokens[:, None].to(tl.int64) * stride_logits + experts[None, :],
        mask=token_ok[:, None] & expert_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    logits = tl.where(expert_ok[None, :], logits, neg_inf)  # (BLOCK_T, BLOCK_E)
    if USE_SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        scores = shifted / tl.sum(shifted, axis=1)[:, None]
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + experts, mask=expert_ok, other=0.0)[None, :]
    choice = tl.where(expert_ok[None, :], choice, neg_inf)

    if NUM_GROUPS > 1:
        group_of_expert = experts // (num_experts // NUM_GROUPS)  # (BLOCK_E,)
        groups = tl.arange(0, BLOCK_G)
        group_score = tl.full((BLOCK_T, BLOCK_G), neg_inf, tl.float32)
        for g in tl.static_range(NUM_GROUPS):
            in_group = tl.where((group_of_expert == g)[None, :], choice, neg_inf)
            best = tl.max(in_group, axis=1)
            if USE_SIGMOID:
                # Sum of the two best: knock out one copy of the best (lowest index), take the max again.
                first = tl.min(tl.where(in_group == best[:, None], experts[None, :], BLOCK_E), axis=1)
                second = tl.max(tl.where(experts[None, :] == first[:, None], neg_inf, in_group), axis=1)
                best = best + second
            group_score = tl.where(groups[None, :] == g, best[:, None], group_score)
        keep = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
        for _ in tl.static_range(TOPK_GROUPS):
            best = tl.max(group_score, axis=1)
            pick = tl.min(tl.where(group_score == best[:, None], groups[None, :], BLOCK_G), axis=1)
            group_score = tl.where(groups[None, :] == pick[:, None], neg_inf, group_score)
            keep = tl.where(group_of_expert[None, :] == pick[:, None], 1, keep)
        choice = tl.where(keep != 0, choice, neg_inf)

    slots = tl.arange(0, BLOCK_K)
    top_weights = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    top_ids = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(choice, axis=1)
        pick = tl.min(tl.where(choice == best[:, None], experts[None, :], BLOCK_E), axis=1)
        hit = experts[None, :] == pick[:, None]
        weight = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        choice = tl.where(hit, neg_inf, choice)
        top_weights = tl.where(slots[None, :] == k, weight[:, None], top_weights)
        top_ids = tl.where(slots[None, :] == k, pick[:, None], top_ids)
    if RENORMALIZE:
        top_weights = top_weights / (tl.sum(top_weights, axis=1)[:, None] + 1e-20)
    top_weights = top_weights * scale
    shared = (slots >= TOP_K)[None, :]  # always-on experts E.. after the routed slots, weight 1
    top_weights = tl.where(shared, 1.0, top_weights)
    top_ids = tl.where(shared, num_experts + slots[None, :] - TOP_K, top_ids)

    out_offsets = tokens[:, None].to(tl.int64) * (TOP_K + NUM_SHARED) + slots[None, :]
    out_mask = token_ok[:, None] & (slots[None, :] < TOP_K + NUM_SHARED)
    tl.store(weights_ptr + out_offsets, top_weights, mask=out_mask)
    tl.store(ids_ptr + out_offsets, top_ids.to(tl.int64), mask=out_mask)


@triton.jit
def _route_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    num_tokens,
    num_experts,
    stride_logits,
    scale,
    TOP_K: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    USE_SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    _route_tokens(
        logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_logits, scale, TOP_K,
        NUM_SHARED, USE_SIGMOID, HAS_BIAS, NUM_GROUPS, TOPK_GROUPS, RENORMALIZE, BLOCK_T, BLOCK_E, BLOCK_G,
        BLOCK_K,
    )  # fmt: skip


def route_tokens_per_program(num_tokens: int, num_experts: int) -> int:
    """BLOCK_T of the route kernel: fewer tokens a program as E grows, to keep the (BLOCK_T, BLOCK_E) tile
    in registers."""
    return max(1, min(16, 4096 // triton.next_power_of_2(num_experts), triton.next_power_of_2(num_tokens)))


def _prepare_routing(
    router_logits, bias, top_k, gating, num_groups, topk_groups, renormalize, scale, num_shared
):
    """Checks moe_routing's arguments; returns its empty outputs (weights, ids) and the route kernels'
    leading arguments and constexprs."""
    if gating not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown gating function {gating!r}")
    assert router_logits.dim() == 2 and router_logits.stride(1) == 1, (
        "router_logits must be (T, E), rows contiguous"
    )
    T, E = router_logits.shape
    assert 1 <= top_k <= E, f"top_k {top_k} must be in [1, {E}]"
    if num_groups > 1:
        assert E % num_groups == 0, f"{E} experts do not split into {num_groups} groups"
        assert 1 <= topk_groups <= num_groups
        assert gating == "softmax" or E // num_groups >= 2, "sigmoid group scores need two experts a group"
    if bias is not None:
        assert bias.shape == (E,), f"bias {tuple(bias.shape)} must be ({E},)"
        bias = bias.float().contiguous()
    weights = torch.empty(T, top_k + num_shared, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k + num_shared, dtype=torch.int64, device=router_logits.device)
    args = (
        router_logits,
        bias if bias is not None else weights,  # any pointer; never read without HAS_BIAS
        weights,
        ids,
        T,
        E,
        router_logits.stride(0),
        float(scale),
    )
    meta = dict(
        TOP_K=top_k,
        NUM_SHARED=num_shared,
        USE_SIGMOID=gating == "sigmoid",
        HAS_BIAS=bias is not None,
        NUM_GROUPS=max(1, num_groups),
        TOPK_GROUPS=topk_groups if num_groups > 1 else 1,
        RENORMALIZE=bool(renormalize),
        BLOCK_T=route_tokens_per_program(T, E),
        BLOCK_E=triton.next_power_of_2(E),
        BLOCK_G=triton.next_power_of_2(max(1, num_groups)),
        BLOCK_K=triton.next_power_of_2(top_k + num_shared),
    )
    return weights, ids, args, meta


def moe_routing(
    router_logits: torch.Tensor,  # (T, E)
    bias: torch.Tensor | None,  # (E,) selection-only bias (V3 exp_probs_b), or None
    top_k: int,
    gating: str,  # "softmax" (V2) or "sigmoid" (V3)
    num_groups: int,  # expert groups; 1 = no group limit
    topk_groups: int,  # groups kept when num_groups > 1
    renormalize: bool,
    scale: float,
    num_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek router: weights (T, K + num_shared) fp32 and expert ids (T, K + num_shared) int64 (see
    the module header); the last num_shared slots are the shared experts, numbered E.., with weight 1."""
    weights, ids, args, meta = _prepare_routing(
        router_logits, bias, top_k, gating, num_groups, topk_groups, renormalize, scale, num_shared
    )
    T = router_logits.shape[0]
    if T == 0:
        return weights, ids
    _route_kernel[(triton.cdiv(T, meta["BLOCK_T"]),)](*args, **meta, **launch_options(router_logits.device))
    return weights, ids


# ----------------------------------------------------------------------------------------------------
# deterministic ordering by expert


@dataclass(frozen=True)
class MoeLayout:
    """Where each (token, slot) row sits in the expert-sorted, tile-padded order (module header)."""

    sorted_row_ids: torch.Tensor  # (max_tiles * block_m,) int32; padding = num_rows
    tile_expert: torch.Tensor  # (max_tiles,) int32; -1 = unused tile
    expert_counts: torch.Tensor  # (E,) int32
    num_rows: int  # R = T * K
    block_m: int
    row_positions: torch.Tensor  # (R,) int32: the sorted position of each row

    @property
    def max_tiles(self) -> int:
        return self.tile_expert.shape[0]


def max_tiles_for(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the tiles any routing of num_rows rows over num_experts experts can fill."""
    return triton.cdiv(num_rows, block_m) + min(num_experts, num_rows)


@triton.jit
def _chunk_histogram(ids_ptr, chunk, num_rows, CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr):
    """(BLOCK_E,) int32: rows of each expert among rows [chunk*CHUNK, (chunk+1)*CHUNK)."""
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), tl.int32)
    for sub in tl.range(0, CHUNK, SUB):
        rows = chunk * CHUNK + sub + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + rows, mask=rows < num_rows, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    return counts


@triton.jit
def _plan_tiles(
    expert_counts,  # (BLOCK_E,) int32 tensor: rows of each expert, all chunks
    expert_counts_ptr,  # (E,) int32 out
    tile_expert_ptr,  # (max_tiles,) int32 out
    sorted_row_ids_ptr,  # (max_tiles * BLOCK_M,) int32 out: only padding positions are written here
    num_rows,
    num_experts,
    max_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_TILES: tl.constexpr,
):
    """Pads each expert's run to BLOCK_M, writes counts, tile owners and padding; returns expert_start."""
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < num_experts
    tl.store(expert_counts_ptr + experts, expert_counts, mask=expert_ok)
    padded = (expert_counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    expert_end = tl.cumsum(padded, axis=0)
    expert_start = expert_end - padded
    real_end = expert_start + expert_counts  # positions [real_end, expert_end) are padding
    # Tile i starts at row i*BLOCK_M; its expert is the number of experts whose run ends at or before it.
    ends = tl.where(expert_ok, expert_end, 2147483647)
    lane = tl.arange(0, BLOCK_M)
    for first in range(0, max_tiles, BLOCK_TILES):
        tiles = first + tl.arange(0, BLOCK_TILES)
        owner = tl.sum((ends[None, :] <= tiles[:, None] * BLOCK_M).to(tl.int32), axis=1)
        used = owner < num_experts
        tl.store(tile_expert_ptr + tiles, tl.where(used, owner, -1), mask=tiles < max_tiles)
        owner_real_end = tl.sum(tl.where(experts[None, :] == owner[:, None], real_end[None, :], 0), axis=1)
        positions = tiles[:, None] * BLOCK_M + lane[None, :]  # (BLOCK_TILES, BLOCK_M)
        is_padding = used[:, None] & (positions >= owner_real_end[:, None])
        tl.store(
            sorted_row_ids_ptr + positions, tl.full(positions.shape, 0, tl.int32) + num_rows, mask=is_padding
        )
    return expert_start


@triton.jit
def _scatter_chunk(
    ids_ptr,
    sorted_row_ids_ptr,
    row_positions_ptr,
    next_slot,  # (BLOCK_E,) int32 tensor: sorted position of the chunk's first row of each expert
    chunk,
    num_rows,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Writes each row id of the chunk at next_slot[its expert] + (its expert's rows before it)."""
    experts = tl.arange(0, BLOCK_E)
    lane = tl.arange(0, SUB)
    earlier = lane[None, :] < lane[:, None]  # (SUB, SUB): [j, i] is i before j
    for sub in tl.range(0, CHUNK, SUB):
        rows = chunk * CHUNK + sub + lane
        row_ok = rows < num_rows
        ids = tl.load(ids_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
        one_hot = ids[:, None] == experts[None, :]  # (SUB, BLOCK_E)
        base = tl.sum(tl.where(one_hot, next_slot[None, :], 0), axis=1)
        rank = tl.sum(((ids[:, None] == ids[None, :]) & earlier).to(tl.int32), axis=1)
        tl.store(sorted_row_ids_ptr + base + rank, rows, mask=row_ok)
        tl.store(row_positions_ptr + rows, base + rank, mask=row_ok)
        next_slot += tl.sum(one_hot.to(tl.int32), axis=0)


@triton.jit
def _align_one_chunk(
    ids_ptr,  # (R,) expert of each row, R <= CHUNK
    expert_counts_ptr,  # (E,) int32 out
    tile_expert_ptr,  # (max_tiles,) int32 out
    sorted_row_ids_ptr,  # (max_tiles * BLOCK_M,) int32 out
    row_positions_ptr,  # (R,) int32 out
    num_rows,
    num_experts,
    max_tiles,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_TILES: tl.constexpr,
):
    """All three ordering steps over the one chunk of rows, in this program."""
    counts = _chunk_histogram(ids_ptr, 0, num_rows, CHUNK, SUB, BLOCK_E)
    expert_start = _plan_tiles(
        counts, expert_counts_ptr, tile_expert_ptr, sorted_row_ids_ptr, num_rows, num_experts, max_tiles,
        BLOCK_M, BLOCK_E, BLOCK_TILES,
    )  # fmt: skip
    _scatter_chunk(
        ids_ptr, sorted_row_ids_ptr, row_positions_ptr, expert_start, 0, num_rows, CHUNK, SUB, BLOCK_E
    )


@triton.jit
def _align_one_chunk_kernel(
    ids_ptr,
    expert_counts_ptr,
    tile_expert_ptr,
    sorted_row_ids_ptr,
    row_positions_ptr,
    num_rows,
    num_experts,
    max_tiles,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_TILES: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Decode-sized batches: all three steps in one program, one launch."""
    wait_for_previous(PDL)
    _align_one_chunk(
        ids_ptr, expert_counts_ptr, tile_expert_ptr, sorted_row_ids_ptr, row_positions_ptr, num_rows,
        num_experts, max_tiles, CHUNK, SUB, BLOCK_M, BLOCK_E, BLOCK_TILES,
    )  # fmt: skip


@triton.jit
def _count_chunk_kernel(
    ids_ptr,  # (R,) expert of each row, any int dtype
    chunk_counts_ptr,  # (num_chunks, E) int32 out
    num_rows,
    num_experts,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    chunk = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    counts = _chunk_histogram(ids_ptr, chunk, num_rows, CHUNK, SUB, BLOCK_E)
    tl.store(chunk_counts_ptr + chunk * num_experts + experts, counts, mask=experts < num_experts)


@triton.jit
def _scan_kernel(
    chunk_counts_ptr,  # (num_chunks, E) int32
    chunk_offsets_ptr,  # (num_chunks, E) int32 out: first sorted position of expert e's rows of a chunk
    expert_counts_ptr,  # (E,) int32 out
    tile_expert_ptr,  # (max_tiles,) int32 out
    sorted_row_ids_ptr,  # (max_tiles * BLOCK_M,) int32 out: padding positions
    num_chunks,
    num_rows,
    num_experts,
    max_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_TILES: tl.constexpr,
    BLOCK_CHUNKS: tl.constexpr,  # chunks read as one (BLOCK_CHUNKS, BLOCK_E) tile: a step, not a load each
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < num_experts
    totals = tl.zeros((BLOCK_E,), tl.int32)
    for first in range(0, num_chunks, BLOCK_CHUNKS):
        chunks = first + tl.arange(0, BLOCK_CHUNKS)
        mask = (chunks < num_chunks)[:, None] & expert_ok[None, :]
        counts = tl.load(
            chunk_counts_ptr + chunks[:, None] * num_experts + experts[None, :], mask=mask, other=0
        )
        totals += tl.sum(counts, axis=0)
    expert_start = _plan_tiles(
        totals, expert_counts_ptr, tile_expert_ptr, sorted_row_ids_ptr, num_rows, num_experts, max_tiles,
        BLOCK_M, BLOCK_E, BLOCK_TILES,
    )  # fmt: skip
    running = expert_start
    for first in range(0, num_chunks, BLOCK_CHUNKS):  # chunks in order: this is what makes the sort stable
        chunks = first + tl.arange(0, BLOCK_CHUNKS)
        mask = (chunks < num_chunks)[:, None] & expert_ok[None, :]
        offsets = chunks[:, None] * num_experts + experts[None, :]
        counts = tl.load(chunk_counts_ptr + offsets, mask=mask, other=0)
        before = tl.cumsum(counts, axis=0) - counts  # rows of the earlier chunks of this step
        tl.store(chunk_offsets_ptr + offsets, running[None, :] + before, mask=mask)
        running += tl.sum(counts, axis=0)


@triton.jit
def _scatter_kernel(
    ids_ptr,  # (R,) expert of each row
    chunk_offsets_ptr,  # (num_chunks, E) int32
    sorted_row_ids_ptr,  # (max_tiles * BLOCK_M,) int32 out: real rows
    row_positions_ptr,  # (R,) int32 out
    num_rows,
    num_experts,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    chunk = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    next_slot = tl.load(
        chunk_offsets_ptr + chunk * num_experts + experts, mask=experts < num_experts, other=0
    )
    _scatter_chunk(
        ids_ptr, sorted_row_ids_ptr, row_positions_ptr, next_slot, chunk, num_rows, CHUNK, SUB, BLOCK_E
    )


ONE_PROGRAM_ROWS = 128  # up to here one launch beats three; past it the one program's serial loops dominate


def align_chunk_rows(num_rows: int, sub: int) -> int:
    """Rows per chunk: all of them in one program for small batches, else ~64 chunks of 64..1024 rows.

    The single program walks its rows serially (~0.06 us a row on an H200: 31 us at 512 rows), so a
    decode batch of 64 sequences is faster as three launches over 8 chunks. The layout does not depend
    on the chunking (a stable sort by expert either way)."""
    if num_rows <= ONE_PROGRAM_ROWS:
        return max(sub, triton.next_power_of_2(num_rows))
    return max(sub, 64, min(1024, triton.next_power_of_2(triton.cdiv(num_rows, 64))))


def _empty_layout(num_rows: int, num_experts: int, block_m: int, device: torch.device) -> MoeLayout:
    """The layout's buffers, sized by (R, E, block_m) alone. No fill: padding positions of used tiles are
    written by _plan_tiles, real ones by the scatter, and positions of unused tiles are never read (their
    tile says -1)."""
    max_tiles = max_tiles_for(num_rows, num_experts, block_m)
    sorted_row_ids = torch.empty(max_tiles * block_m, dtype=torch.int32, device=device)
    tile_expert = torch.empty(max_tiles, dtype=torch.int32, device=device)
    expert_counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    row_positions = torch.empty(num_rows, dtype=torch.int32, device=device)
    return MoeLayout(sorted_row_ids, tile_expert, expert_counts, num_rows, block_m, row_positions)


def _align_meta(num_rows: int, num_experts: int, block_m: int) -> dict:
    """The ordering kernels' constexprs: CHUNK rows a chunk, SUB rows a step, and the plan's tiles."""
    block_e = triton.next_power_of_2(num_experts)
    sub = 32 if block_e >= 128 else 64  # keeps the (SUB, BLOCK_E) one-hot small
    return dict(
        CHUNK=align_chunk_rows(num_rows, sub),
        SUB=sub,
        BLOCK_M=block_m,
        BLOCK_E=block_e,
        BLOCK_TILES=max(16, 2048 // max(block_e, block_m)),
    )


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeLayout:
    """Deterministic expert-sorted, tile-padded order of the rows of topk_ids (T, K); see the header."""
    assert topk_ids.dim() == 2 and topk_ids.is_contiguous(), "topk_ids must be a contiguous (T, K)"
    assert not topk_ids.dtype.is_floating_point
    num_rows = topk_ids.numel()
    device = topk_ids.device
    layout = _empty_layout(num_rows, num_experts, block_m, device)
    sorted_row_ids, tile_expert, max_tiles = layout.sorted_row_ids, layout.tile_expert, layout.max_tiles
    expert_counts, row_positions = layout.expert_counts, layout.row_positions
    if num_rows == 0:
        expert_counts.zero_()
        tile_expert.fill_(-1)
        return layout
    meta = _align_meta(num_rows, num_experts, block_m)
    chunk, sub, block_e = meta["CHUNK"], meta["SUB"], meta["BLOCK_E"]
    num_chunks = triton.cdiv(num_rows, chunk)
    plan = dict(BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_TILES=meta["BLOCK_TILES"])
    if num_chunks == 1:
        _align_one_chunk_kernel[(1,)](
            topk_ids, expert_counts, tile_expert, sorted_row_ids, row_positions, num_rows, num_experts, max_tiles,
            **meta, **launch_options(topk_ids.device),
        )  # fmt: skip
        return layout
    chunk_counts = torch.empty(num_chunks, num_experts, dtype=torch.int32, device=device)
    chunk_offsets = torch.empty_like(chunk_counts)
    _count_chunk_kernel[(num_chunks,)](
        topk_ids,
        chunk_counts,
        num_rows,
        num_experts,
        CHUNK=chunk,
        SUB=sub,
        BLOCK_E=block_e,
        **launch_options(topk_ids.device),
    )
    _scan_kernel[(1,)](
        chunk_counts, chunk_offsets, expert_counts, tile_expert, sorted_row_ids, num_chunks, num_rows,
        num_experts, max_tiles, **plan, BLOCK_CHUNKS=max(1, min(16, 4096 // block_e)),
        **launch_options(chunk_counts.device),
    )  # fmt: skip
    _scatter_kernel[(num_chunks,)](
        topk_ids,
        chunk_offsets,
        sorted_row_ids,
        row_positions,
        num_rows,
        num_experts,
        CHUNK=chunk,
        SUB=sub,
        BLOCK_E=block_e,
        **launch_options(topk_ids.device),
    )
    return layout


# ----------------------------------------------------------------------------------------------------
# routing and ordering in one launch (decode-sized batches)


@triton.jit
def _route_align_kernel(
    logits_ptr,  # (T, E)
    bias_ptr,  # (E,) fp32, read only when HAS_BIAS
    weights_ptr,  # (T, K + NUM_SHARED) fp32 out
    ids_ptr,  # (T, K + NUM_SHARED) int64 out, then read back as the R = T * (K + NUM_SHARED) rows
    num_tokens,
    num_experts,  # routed experts E; the layout's experts are E + NUM_SHARED
    stride_logits,
    scale,
    expert_counts_ptr,  # (E + NUM_SHARED,) int32 out
    tile_expert_ptr,  # (max_tiles,) int32 out
    sorted_row_ids_ptr,  # (max_tiles * BLOCK_M,) int32 out
    row_positions_ptr,  # (R,) int32 out
    max_tiles,
    TOP_K: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    USE_SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,  # >= T: the route kernel's one program
    BLOCK_E: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr,  # >= R: the ordering's one chunk
    SUB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E_ALIGN: tl.constexpr,  # next power of two of E + NUM_SHARED
    BLOCK_TILES: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """_route_kernel's one program, then _align_one_chunk_kernel's on the ids it wrote: one launch."""
    wait_for_previous(PDL)
    _route_tokens(
        logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_logits, scale, TOP_K,
        NUM_SHARED, USE_SIGMOID, HAS_BIAS, NUM_GROUPS, TOPK_GROUPS, RENORMALIZE, BLOCK_T, BLOCK_E, BLOCK_G,
        BLOCK_K,
    )  # fmt: skip
    tl.debug_barrier()  # the ids' stores above are visible to every thread of the program below
    _align_one_chunk(
        ids_ptr, expert_counts_ptr, tile_expert_ptr, sorted_row_ids_ptr, row_positions_ptr,
        num_tokens * (TOP_K + NUM_SHARED), num_experts + NUM_SHARED, max_tiles, CHUNK, SUB, BLOCK_M,
        BLOCK_E_ALIGN, BLOCK_TILES,
    )  # fmt: skip


def route_align_fits(num_tokens: int, num_experts: int, top_k: int, num_shared: int = 0) -> bool:
    """Whether one program routes the whole batch (the route kernel's single program) and orders all its
    rows (the ordering's single chunk): then `moe_route_and_align` runs one kernel."""
    one_program = num_tokens <= route_tokens_per_program(num_tokens, num_experts)
    return num_tokens > 0 and one_program and num_tokens * (top_k + num_shared) <= ONE_PROGRAM_ROWS


def moe_route_and_align(
    router_logits: torch.Tensor,  # (T, E)
    bias: torch.Tensor | None,
    top_k: int,
    gating: str,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scale: float,
    num_shared: int,
    block_m: int,  # the grouped GEMMs' row tile (kernels/fused_moe.py, kernels/quant/fused_moe.py row_tile)
) -> tuple[torch.Tensor, torch.Tensor, MoeLayout]:
    """moe_routing, then moe_align of its ids over the E + num_shared experts: the same weights, ids and
    layout, bit for bit. Decode-sized batches (route_align_fits) get all three from one kernel, larger
    ones from those two functions' kernels."""
    T, E = router_logits.shape
    if not route_align_fits(T, E, top_k, num_shared):
        weights, ids = moe_routing(
            router_logits, bias, top_k, gating, num_groups, topk_groups, renormalize, scale, num_shared
        )
        return weights, ids, moe_align(ids, E + num_shared, block_m)
    weights, ids, args, meta = _prepare_routing(
        router_logits, bias, top_k, gating, num_groups, topk_groups, renormalize, scale, num_shared
    )
    layout = _empty_layout(ids.numel(), E + num_shared, block_m, router_logits.device)
    _route_align_kernel[(1,)](
        *args, layout.expert_counts, layout.tile_expert, layout.sorted_row_ids, layout.row_positions,
        layout.max_tiles, **_route_align_meta(meta, ids.numel(), E + num_shared, block_m),
        **launch_options(router_logits.device),
    )  # fmt: skip
    return weights, ids, layout


def _route_align_meta(route_meta: dict, num_rows: int, num_experts: int, block_m: int) -> dict:
    """_route_align_kernel's constexprs: the route kernel's and the one-chunk ordering's, as those two
    kernels would take them (the ordering's BLOCK_E renamed BLOCK_E_ALIGN)."""
    align = _align_meta(num_rows, num_experts, block_m)
    align["BLOCK_E_ALIGN"] = align.pop("BLOCK_E")
    return dict(route_meta, **align)
