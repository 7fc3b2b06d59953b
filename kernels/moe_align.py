"""The deterministic ordering of (token, slot) rows by expert that the grouped GEMMs read.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mlapipe.kernels.pdl import launch_options, wait_for_previous


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
def align_one_chunk(
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
    align_one_chunk(
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


def empty_layout(num_rows: int, num_experts: int, block_m: int, device: torch.device) -> MoeLayout:
    """The layout's buffers, sized by (R, E, block_m) alone. No fill: padding positions of used tiles are
    written by _plan_tiles, real ones by the scatter, and positions of unused tiles are never read (their
    tile says -1)."""
    max_tiles = max_tiles_for(num_rows, num_experts, block_m)
    sorted_row_ids = torch.empty(max_tiles * block_m, dtype=torch.int32, device=device)
    tile_expert = torch.empty(max_tiles, dtype=torch.int32, device=device)
    expert_counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    row_positions = torch.empty(num_rows, dtype=torch.int32, device=device)
    return MoeLayout(sorted_row_ids, tile_expert, expert_counts, num_rows, block_m, row_positions)


def align_meta(num_rows: int, num_experts: int, block_m: int) -> dict:
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
    layout = empty_layout(num_rows, num_experts, block_m, device)
    sorted_row_ids, tile_expert, max_tiles = layout.sorted_row_ids, layout.tile_expert, layout.max_tiles
    expert_counts, row_positions = layout.expert_counts, layout.row_positions
    if num_rows == 0:
        expert_counts.zero_()
        tile_expert.fill_(-1)
        return layout
    meta = align_meta(num_rows, num_experts, block_m)
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
