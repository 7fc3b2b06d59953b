"""Routed experts as two grouped GEMMs over the expert-sorted rows, and a fixed-order sum over slots.

Inputs: hidden (T, H), w_gate_up (E, 2I, H) with gate rows [0, I) and up rows [I, 2I), w_down (E, H, I),
topk_weights (T, K) fp32, topk_ids (T, K). Rows are r = t*K + k, R = T*K of them (kernels/moe_align.py
sorts them by expert, stable, padded per expert to BLOCK_M: sorted_row_ids (P,), P = max_tiles*BLOCK_M,
padding = R; tile_expert (max_tiles,), -1 = unused tile).

1. `_gate_up_kernel`: program (tile, column block) of BLOCK_M sorted rows x BLOCK_N intermediate columns.
   Gathers the rows' tokens from hidden, multiplies by the tile's expert's gate and up columns (two fp32
   accumulators), and writes silu(gate) * up to act (P, I) at the sorted position (so GEMM 2 reads act
   tiles contiguously). Padding rows read zeros and write zeros.
2. `_down_kernel`: program (tile, column block): act tile times the expert's w_down rows, scaled by each
   row's routing weight in fp32, written to slot_out (R, H) at row r (token-major, slot-minor).
3. `_sum_slots_kernel`: out[t] = sum over k = 0..K-1 of slot_out[t*K + k], in that order, in fp32.

Determinism and batch invariance. No atomics and no split over the reduction dimension: every output
element is one program's fp32 dot over H (GEMM 1) or I (GEMM 2) in increasing order, then the fixed
slot sum. A row's bits therefore depend only on its own token, its expert's weights and the tile
config, never on the other rows of the batch. The configs the launcher can pick (both autotune spaces,
BLOCK_M 64 or 128) were checked on an H200 to give identical bits (a GPU test pins a spread of them), so
neither the batch size nor autotune's timing-dependent pick changes the result. MLAPIPE_MOE_BATCH_INVARIANT=0
allows a BLOCK_M=16 decode tile (mma.sync rather than wgmma), which the numerics do not promise to match;
on the H200 it matched too and was no faster (kernels/NOTES-moe.md).

A caller that has the rows' order already (moe_route_align.moe_route_and_align, one launch with the routing at
decode sizes) passes it as `layout=`, padded to `row_tile` (checked).

Tiles: BLOCK_M is chosen from rows per expert (decode-sized 64, prefill-sized 128); BLOCK_N, BLOCK_K,
warps and stages are autotuned keyed on (H, I, BLOCK_M, log2 of the row tiles up to 64), never on T
itself. MLAPIPE_MOE_CONFIG = "block_m,block_n,block_k,num_warps,num_stages" pins one config for both
GEMMs (CI, tests, benches).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mlapipe.kernels.moe_align import MoeLayout, moe_align
from mlapipe.kernels.pdl import launch_options, wait_for_previous

CONFIG_ENV = "MLAPIPE_MOE_CONFIG"
BATCH_INVARIANT_ENV = "MLAPIPE_MOE_BATCH_INVARIANT"


@dataclass(frozen=True)
class MoeTiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8

    @classmethod
    def parse(cls, text: str) -> MoeTiles:
        """'block_m,block_n,block_k,num_warps,num_stages', as MLAPIPE_MOE_CONFIG holds it."""
        values = [int(v) for v in text.split(",")]
        assert len(values) == 5, f"{CONFIG_ENV} wants 5 integers, got {text!r}"
        return cls(*values)

    def meta(self) -> dict:
        return dict(
            BLOCK_N=self.block_n,
            BLOCK_K=self.block_k,
            GROUP_M=self.group_m,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )


# Small tiles for the CPU interpreter, where autotuning cannot time anything.
INTERPRETER_TILES = MoeTiles(16, 32, 32, 4, 1)


def choose_block_m(num_rows: int, num_experts: int, batch_invariant: bool) -> int:
    """Decode-sized or prefill-sized row tile, from the average rows per expert."""
    rows_per_expert = num_rows / num_experts
    if rows_per_expert >= 96:
        return 128
    if batch_invariant or rows_per_expert > 16:
        return 64
    return 16


def _configs(pairs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config(dict(BLOCK_N=n, BLOCK_K=k, GROUP_M=8), num_warps=w, num_stages=s)
        for n, k, w, s in pairs
    ]


def gate_up_configs() -> list[triton.Config]:
    """GEMM 1 space (BLOCK_N, BLOCK_K, warps, stages); each program holds two B tiles (gate and up)."""
    return _configs([(32, 64, 4, 4), (64, 64, 4, 4), (64, 128, 4, 4), (128, 64, 8, 3), (256, 64, 8, 3)])


def down_configs() -> list[triton.Config]:
    """GEMM 2 space (BLOCK_N, BLOCK_K, warps, stages)."""
    return _configs([(32, 64, 4, 4), (64, 64, 4, 4), (64, 128, 4, 4), (128, 64, 8, 4), (256, 64, 8, 3)])


def tiles_bucket(num_tiles: int) -> int:
    """Autotune key for the grid's size: log2 of the row tiles, capped at 64 tiles. A decode step of one
    sequence (~9 tiles) wants narrow column blocks to fill the GPU, a batch of 64 (~74) wide ones; all
    configs give the same bits, so keying on this keeps batch invariance."""
    return min(num_tiles, 64).bit_length()


@triton.jit
def _tile_and_column(pid, num_tiles, num_column_blocks, GROUP_M: tl.constexpr):
    """Grouped launch order: GROUP_M consecutive tiles (mostly one expert) share each weight column block
    while it sits in L2."""
    per_group = GROUP_M * num_column_blocks
    first_tile = (pid // per_group) * GROUP_M
    tiles_in_group = min(num_tiles - first_tile, GROUP_M)
    tile = first_tile + (pid % per_group) % tiles_in_group
    column = (pid % per_group) // tiles_in_group
    return tile, column


@triton.jit
def _gate_up_kernel(
    hidden_ptr,  # (T, H)
    w_gate_up_ptr,  # (E, 2I, H)
    act_ptr,  # (P, I) out: silu(gate) * up at each sorted position
    sorted_row_ids_ptr,  # (P,) int32
    tile_expert_ptr,  # (max_tiles,) int32
    num_rows,  # R = T*K; padding rows hold R
    top_k,
    hidden_size,
    inter_size,
    num_tiles,
    stride_hidden_t,
    stride_w_e,
    stride_w_n,
    stride_act_p,
    tiles_bucket,  # autotune key only
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # the reduction dim is a multiple of BLOCK_K (set by the heuristics below)
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    tile, column = _tile_and_column(tl.program_id(0), num_tiles, tl.cdiv(inter_size, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    positions = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_row_ids_ptr + positions)
    row_ok = rows < num_rows
    tokens = (rows // top_k).to(tl.int64)
    cols = column * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter_size
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = hidden_ptr + tokens[:, None] * stride_hidden_t + ks[None, :]  # (BLOCK_M, BLOCK_K)
    gate_ptrs = w_gate_up_ptr + expert.to(tl.int64) * stride_w_e + cols[None, :] * stride_w_n + ks[:, None]
    up_ptrs = gate_ptrs + inter_size * stride_w_n  # (BLOCK_K, BLOCK_N) each
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        if EVEN_K:  # no mask along the reduction: the loop's loads stay simple
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            gate = tl.load(gate_ptrs, mask=col_ok[None, :], other=0.0)
            up = tl.load(up_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = ks < hidden_size - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            gate = tl.load(gate_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            up = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_gate = tl.dot(a, gate, acc_gate)
        acc_up = tl.dot(a, up, acc_up)
        a_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    act_ptrs = act_ptr + positions[:, None].to(tl.int64) * stride_act_p + cols[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr,  # (P, I)
    w_down_ptr,  # (E, H, I)
    slot_out_ptr,  # (R, H) out: weight * down(act) of each row
    sorted_row_ids_ptr,  # (P,) int32
    tile_expert_ptr,  # (max_tiles,) int32
    topk_weights_ptr,  # (R,) fp32
    num_rows,
    hidden_size,
    inter_size,
    num_tiles,
    stride_act_p,
    stride_w_e,
    stride_w_n,
    stride_slot_r,
    tiles_bucket,  # autotune key only
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # the reduction dim is a multiple of BLOCK_K (set by the heuristics below)
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    tile, column = _tile_and_column(tl.program_id(0), num_tiles, tl.cdiv(hidden_size, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    positions = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_row_ids_ptr + positions)
    row_ok = rows < num_rows
    cols = column * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden_size
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = act_ptr + positions[:, None].to(tl.int64) * stride_act_p + ks[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_down_ptr + expert.to(tl.int64) * stride_w_e + cols[None, :] * stride_w_n + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, inter_size, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = ks < inter_size - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    routing_weight = tl.load(topk_weights_ptr + rows, mask=row_ok, other=0.0)
    out = acc * routing_weight[:, None]
    out_ptrs = slot_out_ptr + rows[:, None].to(tl.int64) * stride_slot_r + cols[None, :]
    tl.store(out_ptrs, out.to(slot_out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sum_slots_kernel(
    slot_out_ptr,  # (T*K, H)
    out_ptr,  # (T, H)
    num_tokens,
    hidden_size,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (tokens < num_tokens)[:, None] & (cols < hidden_size)[None, :]
    first_row = tokens.to(tl.int64) * TOP_K
    acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for k in tl.static_range(TOP_K):  # slot order 0..K-1, as the reference sums
        acc += tl.load(slot_out_ptr + (first_row + k)[:, None] * hidden_size + cols[None, :], mask=mask)
    tl.store(out_ptr + tokens[:, None].to(tl.int64) * hidden_size + cols[None, :], acc, mask=mask)


_gate_up_kernel = triton.heuristics({"EVEN_K": lambda args: args["hidden_size"] % args["BLOCK_K"] == 0})(
    _gate_up_kernel
)
_down_kernel = triton.heuristics({"EVEN_K": lambda args: args["inter_size"] % args["BLOCK_K"] == 0})(
    _down_kernel
)
_gate_up_autotuned = triton.autotune(
    configs=gate_up_configs(), key=["hidden_size", "inter_size", "BLOCK_M", "tiles_bucket"]
)(_gate_up_kernel)
_down_autotuned = triton.autotune(
    configs=down_configs(), key=["hidden_size", "inter_size", "BLOCK_M", "tiles_bucket"]
)(_down_kernel)


def pinned_tiles(device: torch.device) -> MoeTiles | None:
    """The config MLAPIPE_MOE_CONFIG pins, the interpreter's small tiles, or None (autotune)."""
    text = os.environ.get(CONFIG_ENV)
    if text:
        return MoeTiles.parse(text)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return INTERPRETER_TILES
    return None


def row_tile(num_rows: int, num_experts: int, device: torch.device) -> int:
    """BLOCK_M of fused_moe's GEMMs for num_rows rows over num_experts experts: the tile its layout (a
    precomputed one too) is padded to. The pinned config's, else chosen from rows per expert."""
    tiles = pinned_tiles(device)
    if tiles:
        return tiles.block_m
    batch_invariant = os.environ.get(BATCH_INVARIANT_ENV, "1") != "0"
    return choose_block_m(num_rows, num_experts, batch_invariant)


def check_layout_fits(layout: MoeLayout, num_rows: int, num_experts: int, block_m: int) -> None:
    """A precomputed layout (moe_route_align.moe_route_and_align) must order these rows over these experts,
    padded to the GEMMs' row tile."""
    got = (layout.num_rows, layout.expert_counts.shape[0], layout.block_m)
    want = (num_rows, num_experts, block_m)
    assert got == want, f"layout for (rows, experts, block_m) {got}, the GEMMs want {want}"


def gate_up_silu(
    hidden: torch.Tensor,  # (T, H)
    w_gate_up: torch.Tensor,  # (E, 2I, H)
    layout: MoeLayout,
    top_k: int,
    tiles: MoeTiles | None,  # None: autotune
) -> torch.Tensor:
    """GEMM 1: act (P, I) = silu(gate) * up of every sorted row (zeros on padding)."""
    inter = w_gate_up.shape[1] // 2
    num_tiles, block_m = layout.max_tiles, layout.block_m
    act = torch.empty(num_tiles * block_m, inter, dtype=hidden.dtype, device=hidden.device)
    args = (
        hidden, w_gate_up, act, layout.sorted_row_ids, layout.tile_expert, layout.num_rows, top_k,
        hidden.shape[1], inter, num_tiles, hidden.stride(0), w_gate_up.stride(0), w_gate_up.stride(1),
        act.stride(0), tiles_bucket(num_tiles),
    )  # fmt: skip
    if tiles:
        assert tiles.block_m == block_m, "the layout's tile and the GEMM's row tile must agree"
        _gate_up_kernel[(num_tiles * triton.cdiv(inter, tiles.block_n),)](
            *args, BLOCK_M=block_m, **tiles.meta(), **launch_options(hidden.device)
        )
    else:
        grid = lambda meta: (num_tiles * triton.cdiv(inter, meta["BLOCK_N"]),)
        _gate_up_autotuned[grid](*args, BLOCK_M=block_m, **launch_options(hidden.device))
    return act


def down_weighted(
    act: torch.Tensor,  # (P, I)
    w_down: torch.Tensor,  # (E, H, I)
    layout: MoeLayout,
    topk_weights: torch.Tensor,  # (T, K)
    tiles: MoeTiles | None,  # None: autotune
) -> torch.Tensor:
    """GEMM 2: slot_out (R, H) = routing weight * down(act) of every real row, at its row id."""
    H, inter = w_down.shape[1], w_down.shape[2]
    num_tiles, block_m = layout.max_tiles, layout.block_m
    slot_out = torch.empty(layout.num_rows, H, dtype=act.dtype, device=act.device)
    weights = topk_weights.float().contiguous()
    args = (
        act, w_down, slot_out, layout.sorted_row_ids, layout.tile_expert, weights, layout.num_rows, H, inter,
        num_tiles, act.stride(0), w_down.stride(0), w_down.stride(1), slot_out.stride(0),
        tiles_bucket(num_tiles),
    )  # fmt: skip
    if tiles:
        assert tiles.block_m == block_m, "the layout's tile and the GEMM's row tile must agree"
        grid = (num_tiles * triton.cdiv(H, tiles.block_n),)
        _down_kernel[grid](*args, BLOCK_M=block_m, **tiles.meta(), **launch_options(act.device))
    else:
        grid = lambda meta: (num_tiles * triton.cdiv(H, meta["BLOCK_N"]),)
        _down_autotuned[grid](*args, BLOCK_M=block_m, **launch_options(act.device))
    return slot_out


def fused_moe(
    hidden: torch.Tensor,  # (T, Hd)
    w_gate_up: torch.Tensor,  # (E, 2I, Hd): rows [0, I) gate, [I, 2I) up
    w_down: torch.Tensor,  # (E, Hd, I)
    topk_weights: torch.Tensor,  # (T, K) fp32
    topk_ids: torch.Tensor,  # (T, K)
    layout: MoeLayout | None = None,  # the ids' order from moe_route_and_align; None: ordered here
) -> torch.Tensor:
    """Routed experts: sum_k w_k * down_e(silu(gate_e x) * up_e x), slots summed in order k = 0..K-1."""
    T, H = hidden.shape
    E, two_inter, H_w = w_gate_up.shape
    inter = two_inter // 2
    K = topk_ids.shape[1]
    assert H_w == H and two_inter == 2 * inter, f"w_gate_up {tuple(w_gate_up.shape)} vs hidden {H}"
    assert w_down.shape == (E, H, inter), f"w_down {tuple(w_down.shape)} must be ({E}, {H}, {inter})"
    assert topk_weights.shape == topk_ids.shape == (T, K)
    assert hidden.dtype == w_gate_up.dtype == w_down.dtype, "hidden and expert weights share one dtype"
    for name, t in (("hidden", hidden), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        assert t.stride(-1) == 1, f"{name} must be contiguous along its last dim"
    out = torch.empty_like(hidden)
    if T == 0:
        return out

    tiles = pinned_tiles(hidden.device)
    block_m = row_tile(T * K, E, hidden.device)
    if layout is None:
        layout = moe_align(topk_ids.contiguous(), E, block_m)
    check_layout_fits(layout, T * K, E, block_m)
    act = gate_up_silu(hidden, w_gate_up, layout, K, tiles)
    slot_out = down_weighted(act, w_down, layout, topk_weights, tiles)
    block_h = min(1024, triton.next_power_of_2(H))
    block_t = max(1, 2048 // block_h)
    _sum_slots_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
        slot_out, out, T, H, TOP_K=K, BLOCK_T=block_t, BLOCK_H=block_h, **launch_options(slot_out.device)
    )
    return out


def selected_configs() -> dict[str, dict]:
    """What autotune chose so far, per key (for the bench's log); empty before the first GPU call."""
    chosen = {}
    for name, tuner in (("gate_up", _gate_up_autotuned), ("down", _down_autotuned)):
        for key, config in tuner.cache.items():
            chosen[f"{name}{key}"] = dict(
                config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
            )
    return chosen
