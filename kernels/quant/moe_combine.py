"""The combine kernels of kernels/quant/fused_moe.py's split launches (decode sizes): its GEMMs leave one fp32
partial per fixed K chunk, and these add them in chunk order (the walked launch's sums, so the same bits).

- `gate_up_combine_kernel`: act = silu(g) * u at the positions of real rows.
- `down_combine_kernel`: slot_out[row] = sum of the chunks times the routing weight.
- `down_combine_sum_kernel`: the down combine and the slot sum in one launch (through the layout's
  row_positions), optionally adding the shared experts' MLP that could not join the launch.
Chunks (and slots) are unrolled over constexpr counts: every partial load is in flight at once, one memory
latency instead of one a chunk.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mlapipe.kernels.partials import load_summed
from mlapipe.kernels.pdl import wait_for_previous


@triton.jit
def gate_up_combine_kernel(
    partial_ptr,  # (2, num_chunks, P, I) fp32
    sorted_row_ids_ptr,
    tile_expert_ptr,
    act_ptr,  # (P, I) out
    num_rows,
    inter_size,
    num_positions,
    NUM_CHUNKS: tl.constexpr,  # unrolled: every partial's load in flight at once, not one latency a chunk
    BLOCK_M: tl.constexpr,  # the GEMMs' row tile
    BLOCK_I: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """act = silu(g) * u with g, u = 0 + chunk 0 + chunk 1 + ... (the non-split launch's sums), at the
    positions of real rows. A decode step has one row in most of its 16-row tiles: the padding positions'
    act stays unwritten, and the down GEMM's columns for them (each a column of its own in the MMA) are
    never stored."""
    wait_for_previous(PDL)
    position = tl.program_id(0)
    if tl.load(tile_expert_ptr + position // BLOCK_M) < 0:
        return
    if tl.load(sorted_row_ids_ptr + position) >= num_rows:
        return
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = cols < inter_size
    slab = num_positions * inter_size
    offsets = position.to(tl.int64) * inter_size + cols
    gate = tl.zeros((BLOCK_I,), tl.float32)
    up = tl.zeros((BLOCK_I,), tl.float32)
    for chunk in tl.static_range(NUM_CHUNKS):  # in order: the same sums as a loop
        gate += tl.load(partial_ptr + chunk * slab + offsets, mask=mask, other=0.0)
        up += tl.load(partial_ptr + (NUM_CHUNKS + chunk) * slab + offsets, mask=mask, other=0.0)
    act = gate * tl.sigmoid(gate) * up
    tl.store(act_ptr + offsets, act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def down_combine_kernel(
    partial_ptr,  # (num_chunks, P, H) fp32
    sorted_row_ids_ptr,
    tile_expert_ptr,
    topk_weights_ptr,
    slot_out_ptr,  # (R, H) out
    num_rows,
    hidden_size,
    num_positions,
    stride_slot_r,
    NUM_CHUNKS: tl.constexpr,  # unrolled, as in gate_up_combine_kernel
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """slot_out[row] = (0 + chunk 0 + chunk 1 + ...) * routing weight, for the real row at each position."""
    wait_for_previous(PDL)
    position = tl.program_id(0)
    if tl.load(tile_expert_ptr + position // BLOCK_M) < 0:
        return
    row = tl.load(sorted_row_ids_ptr + position)
    if row >= num_rows:
        return
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < hidden_size
    slab = num_positions * hidden_size
    offsets = position.to(tl.int64) * hidden_size + cols
    total = tl.zeros((BLOCK_H,), tl.float32)
    for chunk in tl.static_range(NUM_CHUNKS):
        total += tl.load(partial_ptr + chunk * slab + offsets, mask=mask, other=0.0)
    out = total * tl.load(topk_weights_ptr + row)
    tl.store(
        slot_out_ptr + row.to(tl.int64) * stride_slot_r + cols,
        out.to(slot_out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def down_combine_sum_kernel(
    partial_ptr,  # (NUM_CHUNKS, P, H) fp32
    row_positions_ptr,  # (R,) int32: sorted position of each row
    topk_weights_ptr,  # (R,) fp32
    out_ptr,  # (T, H) out
    plus_ptr,  # (T, H) in out's dtype, or (NUM_PLUS_PARTIALS, T, H) fp32: added last (HAS_PLUS)
    hidden_size,
    num_positions,
    plus_partial_stride,
    TOP_K: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_PLUS: tl.constexpr = False,
    NUM_PLUS_PARTIALS: tl.constexpr = 0,
    PDL: tl.constexpr = False,
):
    """out[t] = sum over slots k = 0..K-1 of round((0 + chunk 0 + chunk 1 + ...) * weight): the down combine
    and the slot sum in one launch, with down_combine_kernel's and _sum_slots_kernel's arithmetic in their
    order (each slot rounded to out's dtype, as slot_out holds it, then summed in fp32), so the same bits.
    Every partial of the token is an independent load (slots and chunks unrolled): one memory latency.
    HAS_PLUS: then out[t] = round(round(that) + plus[t]), torch's add of the two (plus's partials summed in
    order and rounded first: kernels/partials.py), the shared experts' MLP that could not join the launch."""
    wait_for_previous(PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < hidden_size
    slab = num_positions * hidden_size
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for k in tl.static_range(TOP_K):
        row = token * TOP_K + k
        offsets = tl.load(row_positions_ptr + row).to(tl.int64) * hidden_size + cols
        total = tl.zeros((BLOCK_H,), tl.float32)
        for chunk in tl.static_range(NUM_CHUNKS):
            total += tl.load(partial_ptr + chunk * slab + offsets, mask=mask, other=0.0)
        acc += (total * tl.load(topk_weights_ptr + row)).to(out_ptr.dtype.element_ty)
    routed = acc.to(out_ptr.dtype.element_ty)
    if HAS_PLUS:
        plus = load_summed(
            plus_ptr + token * hidden_size, cols, mask, plus_partial_stride, NUM_PLUS_PARTIALS,
            out_ptr.dtype.element_ty,
        )  # fmt: skip
        routed = (routed.to(tl.float32) + plus).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + token * hidden_size + cols, routed, mask=mask)
