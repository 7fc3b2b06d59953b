"""Routed experts on GGUF blocks: kernels/fused_moe.py's two grouped GEMMs with the expert weight tiles
decoded in registers by the type's decoder (a tl.constexpr), the same ordering and slot sum.

Inputs as kernels/fused_moe.py's `fused_moe`, with QuantTensor expert stacks: w_gate_up (E, 2I, H)
(gate rows [0, I), up rows [I, 2I): gate and up concatenated by rows in block bytes, so one type) and
w_down (E, H, I) (its own type). Rows r = t*K + k are ordered by kernels/moe_align.py's `moe_align`
(stable by expert, tile-padded; tile_expert -1 = skip), or arrive ordered as `layout=` (moe_route_and_align:
with the routing in one launch at decode sizes), padded to `row_tile`.

1. `_gate_up_kernel`: program (tile, column block[, chunk]): BLOCK_N intermediate columns x BLOCK_M rows.
   Per BLOCK_K step it decodes the expert's gate and up rows (BLOCK_N, BLOCK_K) and multiplies them by the
   rows' hidden states transposed (BLOCK_K, BLOCK_M): the weight tile is the dot's first operand, so on
   Hopper wgmma reads it from the registers the decoder left it in, and the 64-row minimum of wgmma
   falls on weight columns, not on the handful of token rows of a decode step. Two fp32 accumulators
   over H (chunk order above); silu(gate) * up goes to act (P, I) at the sorted position.
2. `_down_kernel`: decoded w_down rows (BLOCK_N hidden columns, over I) times act transposed, times the
   routing weight in fp32, to slot_out (R, H) at row r.
3. kernels/fused_moe.py's `_sum_slots_kernel`: out[t] = sum over k = 0..K-1 in order, fp32. Split launches
   (below) fold it into the down combine: `down_combine_sum_kernel` finds each slot's row through the
   layout's row_positions, and its arithmetic is the two kernels' in their order.

Reduction order: the dense linear's fixed K chunks (linear.plan_linear, sized for a one-token step's
DECODE_TILES row tiles; never from T): each chunk a chain of tl.dot steps from a zero accumulator in
increasing k, the chunks added in order to a zero total. Up to SPLIT_MAX_ROWS rows the chunks are
programs of their own (grid axis 1) writing fp32 partials, summed in order by `gate_up_combine_kernel`
(then silu(gate) * up) and `down_combine_kernel` (then the routing weight); past it each program walks
its chunks. Same sums, same bits, and no atomics anywhere. Values: decoded tiles rounded to the
activations' dtype (bf16 on the GPU: what dequantize-on-load gives; fp32 with IEEE products for
fp32/fp16 activations, exact to the fp32 reference). Tiles are chosen from rows per expert, never from
T; that no tile choice changes the bits is checked on an H200 (GPU tests).

Scratch path (prefill-sized, from SCRATCH_MIN_ROWS_PER_EXPERT rows per expert): the experts are
dequantized to the activations' dtype in groups of at most scratch_mib (the amb-like bound) and the same
two kernels run over each group with a plain-bf16 decoder (tiles of other experts say -1 for that group;
all groups write one act and one slot_out, then one slot sum). The decoder's values are the same
rounded numbers, so the scratch path gives the fused path's bits: switching with T keeps invariance.

Shared experts: when their type equals the routed stack's, the loader stacks them after the routed
experts (ids E.., as kernels/moe_routing.py appends them) and they run in the same launch; a different
type cannot share the stack (one decoder per launch): the MoE block runs them as their own quantized MLP
first and hands its output, or at decode sizes its down projection's split partials, as `plus`, which the
decode launch's last kernel adds (workers/layers.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from mlapipe.kernels.fused_moe import _sum_slots_kernel, _tile_and_column, check_layout_fits
from mlapipe.kernels.moe_align import MoeLayout, moe_align
from mlapipe.kernels.pdl import launch_options, wait_for_previous
from mlapipe.kernels.quant.dispatch import (
    compute_dtype,
    dequantize_on_device,
    kernel_type,
    largest_block_k,
    split_decoder,
    table_of,
)
from mlapipe.kernels.quant.linear import LinearPlan, _dot, decoded_dot, plan_linear
from mlapipe.kernels.quant.moe_combine import (
    down_combine_kernel,
    down_combine_sum_kernel,
    gate_up_combine_kernel,
)
from mlapipe.kernels.quant.scratch import SCRATCH_DECODERS
from mlapipe.kernels.quant.tensor import QuantTensor
from mlapipe.kernels.quant.types import QuantType
from mlapipe.kernels.reference import sum_partials

# Rows per expert (T*K/E) from which dequantizing to the scratch beats decoding in the GEMMs, per gate|up
# type name (measured on an H200, V3 shapes: kernels/NOTES-quant.md); the decoders of 32-value blocks
# are the cheapest.
SCRATCH_MIN_ROWS_PER_EXPERT = {"Q8_0": 128, "Q8_0_PLANES": 128, "Q4_0": 128}
SCRATCH_MIN_ROWS_DEFAULT = 64
DECODE_TILES = 8  # row tiles of a one-token decode step (its experts), for the chunk plans
SPLIT_MAX_ROWS = 128  # up to here (T*K rows) the chunks run as programs of their own
SPLIT_ENV = "MLAPIPE_QUANT_MOE_SPLIT"  # "1" / "0" pins it (tests: the two launch shapes agree)
DEFAULT_SCRATCH_MIB = 4096
PATH_ENV = "MLAPIPE_QUANT_MOE_PATH"  # "fused" or "scratch" pins the path (tests, benches)
CONFIG_ENV = "MLAPIPE_QUANT_MOE_CONFIG"  # "block_m,block_n,warps,stages" pins the fused path's tiles


@triton.jit
def _gate_up_chunk(
    acc_gate, acc_up, w_expert, table_ptr, cols_read, inter_size, row_bytes, at_ptrs, row_ok, k_start, k_end,
    DECODE: tl.constexpr, COMPUTE: tl.constexpr, IEEE: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_ELEMS: tl.constexpr, BLOCK_BYTES: tl.constexpr, FETCH: tl.constexpr, CONVERT: tl.constexpr,
):  # fmt: skip
    """Both accumulators over hidden [k_start, k_end): linear.decoded_dot's loop with two weight tiles (and
    linear.prefetched_dot's, loading a step ahead, for a split decoder). A split decoder's step converts
    both tiles before the two dots (gate's, then up's, as ever): the tiles then go to shared memory (where
    wgmma's register operand is laid out) in one round trip, 2 barriers a step instead of 4, and fewer
    registers stay live (sm_90: Q4_K 405 -> 396 instructions a step, 96 -> 80 registers; Q8_0 planes
    317 -> 315, 128 -> 107; `python -m mlapipe.kernels.bench sass --kernel moe-gate-up`)."""
    if FETCH is not None:
        gate_q, gate_d = FETCH(w_expert, cols_read, row_bytes, k_start, BLOCK_K)
        up_q, up_d = FETCH(w_expert, cols_read + inter_size, row_bytes, k_start, BLOCK_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            at = tl.load(at_ptrs + k0, mask=row_ok[None, :], other=0.0).to(COMPUTE)
            ahead = tl.minimum(k0 + BLOCK_K, k_end - BLOCK_K)
            gate_q_next, gate_d_next = FETCH(w_expert, cols_read, row_bytes, ahead, BLOCK_K)
            up_q_next, up_d_next = FETCH(w_expert, cols_read + inter_size, row_bytes, ahead, BLOCK_K)
            gate = CONVERT(gate_q, gate_d, k0).to(COMPUTE)
            up = CONVERT(up_q, up_d, k0).to(COMPUTE)
            acc_gate = _dot(gate, at, acc_gate, IEEE)
            acc_up = _dot(up, at, acc_up, IEEE)
            gate_q, gate_d, up_q, up_d = gate_q_next, gate_d_next, up_q_next, up_d_next
        return acc_gate, acc_up
    STEP: tl.constexpr = BLOCK_K if BLOCK_K > BLOCK_ELEMS else BLOCK_ELEMS
    for k0 in range(k_start, k_end, STEP):
        w_step = w_expert + (k0 // BLOCK_ELEMS) * BLOCK_BYTES
        for sub in tl.static_range(STEP // BLOCK_K):
            at = tl.load(at_ptrs + (k0 + sub * BLOCK_K), mask=row_ok[None, :], other=0.0).to(COMPUTE)
            gate = DECODE(w_step, cols_read, row_bytes, sub * BLOCK_K, BLOCK_K, table_ptr).to(COMPUTE)
            up = DECODE(w_step, cols_read + inter_size, row_bytes, sub * BLOCK_K, BLOCK_K, table_ptr)
            up = up.to(COMPUTE)
            acc_gate = _dot(gate, at, acc_gate, IEEE)
            acc_up = _dot(up, at, acc_up, IEEE)
    return acc_gate, acc_up


@triton.jit
def _gate_up_kernel(
    hidden_ptr,  # (T, H)
    w_ptr,  # (E, 2I, row_bytes) uint8 blocks
    table_ptr,
    act_ptr,  # (P, I) out, unless SPLIT
    partial_ptr,  # (2, num_chunks, P, I) fp32 out when SPLIT: gate then up, one slab per chunk
    sorted_row_ids_ptr,  # (P,) int32
    tile_expert_ptr,  # (max_tiles,) int32
    num_rows,
    top_k,
    hidden_size,
    inter_size,
    num_tiles,
    stride_hidden_t,
    stride_w_e,  # bytes per expert
    row_bytes,
    stride_act_p,
    chunk_k,
    num_chunks,
    DECODE: tl.constexpr,
    COMPUTE: tl.constexpr,
    IEEE: tl.constexpr,
    SPLIT: tl.constexpr,  # grid axis 1 is the chunk: write its partials; else walk the chunks here
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_ELEMS: tl.constexpr,  # the type's values and bytes per block
    BLOCK_BYTES: tl.constexpr,
    GROUP_M: tl.constexpr,
    FETCH: tl.constexpr = None,  # the decoder split into loads and register math (linear.prefetched_dot)
    CONVERT: tl.constexpr = None,
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
    cols_read = tl.minimum(cols, inter_size - 1)  # past I: decode the last column, never stored
    w_expert = w_ptr + expert.to(tl.int64) * stride_w_e
    at_ptrs = (
        hidden_ptr + tokens[None, :] * stride_hidden_t + tl.arange(0, BLOCK_K)[:, None]
    )  # (BLOCK_K, BLOCK_M)
    zeros = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    if SPLIT:
        chunk = tl.program_id(1)
        k_start = chunk * chunk_k
        acc_gate, acc_up = _gate_up_chunk(
            zeros, zeros, w_expert, table_ptr, cols_read, inter_size, row_bytes, at_ptrs, row_ok, k_start,
            tl.minimum(k_start + chunk_k, hidden_size), DECODE, COMPUTE, IEEE, BLOCK_K, BLOCK_ELEMS, BLOCK_BYTES,
            FETCH, CONVERT,
        )  # fmt: skip
        slab = num_tiles * BLOCK_M * inter_size
        offsets = chunk.to(tl.int64) * slab + positions[None, :].to(tl.int64) * inter_size + cols[:, None]
        # real rows only: a decode step has one in most 16-row tiles, and the combine reads no other
        real = col_ok[:, None] & row_ok[None, :]
        tl.store(partial_ptr + offsets, acc_gate, mask=real)
        tl.store(partial_ptr + num_chunks * slab + offsets, acc_up, mask=real)
    else:
        total_gate = zeros
        total_up = zeros
        for chunk in range(num_chunks):  # in order, each from zero: the split launch's sum
            k_start = chunk * chunk_k
            acc_gate, acc_up = _gate_up_chunk(
                zeros, zeros, w_expert, table_ptr, cols_read, inter_size, row_bytes, at_ptrs, row_ok, k_start,
                tl.minimum(k_start + chunk_k, hidden_size), DECODE, COMPUTE, IEEE, BLOCK_K, BLOCK_ELEMS,
                BLOCK_BYTES, FETCH, CONVERT,
            )  # fmt: skip
            total_gate += acc_gate
            total_up += acc_up
        act = total_gate * tl.sigmoid(total_gate) * total_up  # (BLOCK_N, BLOCK_M)
        act_ptrs = act_ptr + positions[None, :].to(tl.int64) * stride_act_p + cols[:, None]
        tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _down_kernel(
    act_ptr,  # (P, I)
    w_ptr,  # (E, H, row_bytes) uint8 blocks
    table_ptr,
    slot_out_ptr,  # (R, H) out, unless SPLIT
    partial_ptr,  # (num_chunks, P, H) fp32 out when SPLIT
    sorted_row_ids_ptr,  # (P,) int32
    tile_expert_ptr,  # (max_tiles,) int32
    topk_weights_ptr,  # (R,) fp32
    num_rows,
    hidden_size,
    inter_size,
    num_tiles,
    stride_act_p,
    stride_w_e,
    row_bytes,
    stride_slot_r,
    chunk_k,
    num_chunks,
    DECODE: tl.constexpr,
    COMPUTE: tl.constexpr,
    IEEE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_ELEMS: tl.constexpr,  # the type's values and bytes per block
    BLOCK_BYTES: tl.constexpr,
    GROUP_M: tl.constexpr,
    FETCH: tl.constexpr = None,  # the decoder split into loads and register math (linear.prefetched_dot)
    CONVERT: tl.constexpr = None,
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
    cols_read = tl.minimum(cols, hidden_size - 1)
    w_expert = w_ptr + expert.to(tl.int64) * stride_w_e
    at_ptrs = act_ptr + positions[None, :].to(tl.int64) * stride_act_p + tl.arange(0, BLOCK_K)[:, None]
    zeros = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    every = positions >= 0
    if SPLIT:
        chunk = tl.program_id(1)
        k_start = chunk * chunk_k
        acc = decoded_dot(
            zeros, w_expert, table_ptr, cols_read, row_bytes, at_ptrs, every, k_start,
            tl.minimum(k_start + chunk_k, inter_size), DECODE, COMPUTE, IEEE, BLOCK_K, BLOCK_ELEMS, BLOCK_BYTES,
            FETCH, CONVERT,
        )  # fmt: skip
        slab = num_tiles * BLOCK_M * hidden_size
        offsets = chunk.to(tl.int64) * slab + positions[None, :].to(tl.int64) * hidden_size + cols[:, None]
        tl.store(partial_ptr + offsets, acc, mask=col_ok[:, None] & row_ok[None, :])  # real rows only
    else:
        total = zeros
        for chunk in range(num_chunks):
            k_start = chunk * chunk_k
            acc = decoded_dot(
                zeros, w_expert, table_ptr, cols_read, row_bytes, at_ptrs, every, k_start,
                tl.minimum(k_start + chunk_k, inter_size), DECODE, COMPUTE, IEEE, BLOCK_K, BLOCK_ELEMS,
                BLOCK_BYTES, FETCH, CONVERT,
            )  # fmt: skip
            total += acc
        routing_weight = tl.load(topk_weights_ptr + rows, mask=row_ok, other=0.0)
        out = total * routing_weight[None, :]  # (BLOCK_N, BLOCK_M)
        out_ptrs = slot_out_ptr + rows[None, :].to(tl.int64) * stride_slot_r + cols[:, None]
        tl.store(out_ptrs, out.to(slot_out_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])


def _interpreted(device: torch.device) -> bool:
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _fused_tiles(num_rows: int, num_experts: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) of the decoding GEMMs, from rows per expert (never T itself)."""
    if text := os.environ.get(CONFIG_ENV):
        values = tuple(int(v) for v in text.split(","))
        assert len(values) == 4, f"{CONFIG_ENV} wants 4 integers (block_m,block_n,warps,stages), got {text!r}"
        return values
    if _interpreted(device):
        return 16, 64, 4, 1
    rows_per_expert = num_rows / num_experts
    if rows_per_expert >= 96:
        return 128, 64, 8, 2  # 128 x 128 at 3 stages wants 360 KB of shared memory for K-quants
    if rows_per_expert > 16:
        return 64, 64, 4, 1
    return 16, 64, 4, 1  # stages 1: measured fastest at decode sizes (kernels/NOTES-quant.md)


def row_tile(num_rows: int, num_experts: int, device: torch.device) -> int:
    """BLOCK_M of quant_fused_moe's GEMMs (both paths): the tile its layout (a precomputed one too) is
    padded to."""
    return _fused_tiles(num_rows, num_experts, device)[0]


def _check(hidden, w_gate_up, w_down, topk_weights, topk_ids) -> None:
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if not isinstance(w, QuantTensor) or len(w.shape) != 3 or not w.data.is_contiguous():
            raise ValueError(f"quant_fused_moe: {name} must be a contiguous (E, rows, cols) QuantTensor")
    T, H = hidden.shape
    E, two_inter, H_w = w_gate_up.shape
    inter = two_inter // 2
    if H_w != H or two_inter != 2 * inter:
        raise ValueError(f"quant_fused_moe: w_gate_up {w_gate_up.shape} vs hidden {H}")
    if tuple(w_down.shape) != (E, H, inter):
        raise ValueError(f"quant_fused_moe: w_down {w_down.shape} must be ({E}, {H}, {inter})")
    if topk_weights.shape != topk_ids.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"quant_fused_moe: topk {tuple(topk_ids.shape)} must be ({T}, K) like its weights")
    if hidden.stride(1) != 1:
        raise ValueError("quant_fused_moe: hidden must be contiguous along its last dim")


@dataclass(frozen=True)
class ExpertBlocks:
    """One expert stack as the GEMMs read it: bytes (E, rows, row_bytes), its decoder and table."""

    data: torch.Tensor  # uint8 (E, rows, row_bytes)
    decoder: object  # @triton.jit tile decoder
    table: torch.Tensor
    block_elems: int
    block_bytes: int  # bytes the row pointer moves per block (QuantType.step_bytes)
    kind: QuantType | None = None  # the type's row (None: a dequantized scratch), for its split decoder

    @classmethod
    def of(cls, w: QuantTensor) -> ExpertBlocks:
        kind = kernel_type(w.qtype)
        table = table_of(w.qtype, w.device)
        return cls(w.data, kind.decoder, table, kind.block_elems, kind.step_bytes, kind)

    def split(self, block_k: int):
        """(fetch, convert) where the decoder is split and takes block_k tiles (dispatch.split_decoder)."""
        return (None, None) if self.kind is None else split_decoder(self.kind, block_k)


@dataclass(frozen=True)
class MoePlan:
    """The fixed reduction order of both GEMMs (linear.LinearPlan each: BLOCK_K, chunks), from the expert
    shape, the types' blocks and the SM count, never from T; and whether this call splits the chunks
    over programs (decode-sized) or walks them inside each program (the same sums)."""

    gate_up: LinearPlan
    down: LinearPlan
    split: bool


def moe_plan(w_gate_up: QuantTensor, w_down: QuantTensor, num_rows: int, device: torch.device) -> MoePlan:
    E, two_inter, H = w_gate_up.shape
    inter = two_inter // 2
    largest_k = largest_block_k(_interpreted(device), kernel_type(w_gate_up.qtype), kernel_type(w_down.qtype))
    sms = 2 if _interpreted(device) else torch.cuda.get_device_properties(device).multi_processor_count
    # a one-token decode step fills about DECODE_TILES row tiles (its experts); chunks make up the rest
    one, two = kernel_type(w_gate_up.qtype), kernel_type(w_down.qtype)
    prefetched = [split_decoder(kind)[0] is not None for kind in (one, two)]
    gate_up = plan_linear(DECODE_TILES * inter, H, one.block_elems, sms, largest_k, prefetched=prefetched[0])
    down = plan_linear(DECODE_TILES * H, inter, two.block_elems, sms, largest_k, prefetched=prefetched[1])
    pinned = os.environ.get(SPLIT_ENV)
    split = num_rows <= SPLIT_MAX_ROWS if pinned is None else pinned == "1"
    split = split and max(gate_up.num_chunks, down.num_chunks) > 1
    return MoePlan(gate_up, down, split)


def _run_gemms(
    hidden, gate_up: ExpertBlocks, down: ExpertBlocks, layout, topk_weights, act, slot_out, tiles, plan, out=None,
    plus=None,
) -> bool:
    """GEMM 1 then GEMM 2 over the layout's tiles (tiles whose expert says -1 are skipped). Returns whether
    the slots are summed into `out` already (split launches given an `out`: one kernel combines the down
    partials and sums the slots, then adds `plus` if given), else they are in slot_out."""
    H, inter, K = hidden.shape[1], act.shape[1], layout.num_rows // hidden.shape[0]
    block_m, block_n, warps, stages = tiles
    compute = compute_dtype(hidden.dtype)
    common = dict(
        COMPUTE=compute, IEEE=compute == tl.float32, SPLIT=plan.split, BLOCK_M=block_m, BLOCK_N=block_n,
        GROUP_M=8, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    positions = layout.max_tiles * block_m
    one = plan.gate_up
    gate_up_split, down_split = gate_up.split(one.block_k), down.split(plan.down.block_k)
    chunks = one.num_chunks if plan.split else 1
    partial = act
    if plan.split:
        partial = torch.empty(2, one.num_chunks, positions, inter, dtype=torch.float32, device=hidden.device)
    _gate_up_kernel[(layout.max_tiles * triton.cdiv(inter, block_n), chunks)](
        hidden, gate_up.data, gate_up.table, act, partial, layout.sorted_row_ids, layout.tile_expert,
        layout.num_rows, K, H, inter, layout.max_tiles, hidden.stride(0), gate_up.data.stride(0),
        gate_up.data.shape[-1], act.stride(0), one.chunk_k, one.num_chunks, DECODE=gate_up.decoder,
        BLOCK_K=one.block_k, BLOCK_ELEMS=gate_up.block_elems, BLOCK_BYTES=gate_up.block_bytes,
        FETCH=gate_up_split[0], CONVERT=gate_up_split[1], **common, **launch_options(hidden.device),
    )  # fmt: skip
    if plan.split:
        block_i = min(1024, triton.next_power_of_2(inter))
        gate_up_combine_kernel[(positions, triton.cdiv(inter, block_i))](
            partial,
            layout.sorted_row_ids,
            layout.tile_expert,
            act,
            layout.num_rows,
            inter,
            positions,
            NUM_CHUNKS=one.num_chunks,
            BLOCK_M=block_m,
            BLOCK_I=block_i,
            **launch_options(partial.device),
        )
    two = plan.down
    chunks = two.num_chunks if plan.split else 1
    partial = slot_out
    if plan.split:
        partial = torch.empty(two.num_chunks, positions, H, dtype=torch.float32, device=hidden.device)
    _down_kernel[(layout.max_tiles * triton.cdiv(H, block_n), chunks)](
        act, down.data, down.table, slot_out, partial, layout.sorted_row_ids, layout.tile_expert, topk_weights,
        layout.num_rows, H, inter, layout.max_tiles, act.stride(0), down.data.stride(0), down.data.shape[-1],
        slot_out.stride(0), two.chunk_k, two.num_chunks, DECODE=down.decoder, BLOCK_K=two.block_k,
        BLOCK_ELEMS=down.block_elems, BLOCK_BYTES=down.block_bytes, FETCH=down_split[0], CONVERT=down_split[1],
        **common, **launch_options(act.device),
    )  # fmt: skip
    if plan.split and out is not None:
        block_h = min(256, triton.next_power_of_2(H))  # several programs a token: a decode step has one
        plus_partials = plus is not None and plus.dim() == 3
        down_combine_sum_kernel[(hidden.shape[0], triton.cdiv(H, block_h))](
            partial, layout.row_positions, topk_weights, out, out if plus is None else plus, H, positions,
            plus.stride(0) if plus_partials else 0, TOP_K=K, NUM_CHUNKS=two.num_chunks, BLOCK_H=block_h,
            HAS_PLUS=plus is not None, NUM_PLUS_PARTIALS=plus.shape[0] if plus_partials else 0,
            **launch_options(partial.device),
        )  # fmt: skip
        return True
    if plan.split:
        block_h = min(1024, triton.next_power_of_2(H))
        down_combine_kernel[(positions, triton.cdiv(H, block_h))](
            partial, layout.sorted_row_ids, layout.tile_expert, topk_weights, slot_out, layout.num_rows, H,
            positions, slot_out.stride(0), NUM_CHUNKS=two.num_chunks, BLOCK_M=block_m, BLOCK_H=block_h,
            **launch_options(partial.device),
        )  # fmt: skip
    return False


def experts_per_group(E: int, H: int, inter: int, scratch_mib: float, element_size: int = 2) -> int:
    """Experts whose dequantized gate|up and down fit in scratch_mib together (at least one)."""
    per_expert = 3 * H * inter * element_size
    return max(1, min(E, int(scratch_mib * (1 << 20)) // per_expert))


def _scratch_blocks(w: QuantTensor, first: int, last: int, dtype: torch.dtype) -> ExpertBlocks:
    """Experts [first, last) of w dequantized to dtype, as rows the scratch decoder reads."""
    values = dequantize_on_device(w[first:last], dtype)
    data = values.view(torch.uint8).reshape(last - first, values.shape[1], -1)
    return ExpertBlocks(data, SCRATCH_DECODERS[dtype], data, 1, values.element_size())


def _run_scratch(hidden, w_gate_up, w_down, layout, topk_weights, act, slot_out, tiles, plan, scratch_mib):
    """The same GEMMs over experts dequantized group by group (at most scratch_mib of bf16 at a time)."""
    E, two_inter, H = w_gate_up.shape
    group = experts_per_group(E, H, two_inter // 2, scratch_mib, hidden.element_size())
    for first in range(0, E, group):
        last = min(E, first + group)
        owner = layout.tile_expert
        in_group = (owner >= first) & (owner < last)
        group_layout = replace(layout, tile_expert=torch.where(in_group, owner - first, -1).to(torch.int32))
        gate_up = _scratch_blocks(w_gate_up, first, last, hidden.dtype)
        down = _scratch_blocks(w_down, first, last, hidden.dtype)
        _run_gemms(hidden, gate_up, down, group_layout, topk_weights, act, slot_out, tiles, plan)


def choose_path(num_rows: int, num_experts: int, qtype: int) -> str:
    """'fused' (decode in the GEMMs) or 'scratch' (dequantize first), by rows per expert."""
    pinned = os.environ.get(PATH_ENV)
    if pinned:
        assert pinned in ("fused", "scratch"), f"{PATH_ENV} must be 'fused' or 'scratch', got {pinned!r}"
        return pinned
    threshold = SCRATCH_MIN_ROWS_PER_EXPERT.get(kernel_type(qtype).name, SCRATCH_MIN_ROWS_DEFAULT)
    return "scratch" if num_rows / num_experts >= threshold else "fused"


def quant_fused_moe(
    hidden: torch.Tensor,  # (T, Hd)
    w_gate_up: QuantTensor,  # (E, 2I, Hd): rows [0, I) gate, [I, 2I) up
    w_down: QuantTensor,  # (E, Hd, I)
    topk_weights: torch.Tensor,  # (T, K) fp32
    topk_ids: torch.Tensor,  # (T, K)
    scratch_mib: float = DEFAULT_SCRATCH_MIB,  # bound on the bf16 scratch of the prefill path
    layout: MoeLayout | None = None,  # the ids' order from moe_route_and_align; None: ordered here
    plus: torch.Tensor | None = None,  # (T, Hd) in hidden's dtype, or fp32 split partials (n, T, Hd)
) -> torch.Tensor:
    """Routed experts: sum_k w_k * down_e(silu(gate_e x) * up_e x), slots summed in order k = 0..K-1;
    then + plus (rounded as torch's add; partials summed in order and rounded first), which a decode-sized
    launch adds in its last kernel (the shared experts' MLP where it cannot join the stack)."""
    _check(hidden, w_gate_up, w_down, topk_weights, topk_ids)
    if plus is not None:
        _check_plus(plus, hidden)
    T, H = hidden.shape
    out = torch.empty_like(hidden)
    if T == 0:
        return out
    E, two_inter, _ = w_gate_up.shape
    K = topk_ids.shape[1]
    tiles = _fused_tiles(T * K, E, hidden.device)
    if layout is None:
        layout = moe_align(topk_ids.contiguous(), E, tiles[0])
    check_layout_fits(layout, T * K, E, tiles[0])
    act = torch.empty(layout.max_tiles * tiles[0], two_inter // 2, dtype=hidden.dtype, device=hidden.device)
    slot_out = torch.empty(T * K, H, dtype=hidden.dtype, device=hidden.device)
    weights = topk_weights.float().contiguous()
    plan = moe_plan(w_gate_up, w_down, T * K, hidden.device)
    if choose_path(T * K, E, w_gate_up.qtype) == "scratch":
        _run_scratch(hidden, w_gate_up, w_down, layout, weights, act, slot_out, tiles, plan, scratch_mib)
    else:
        gate_up, down = ExpertBlocks.of(w_gate_up), ExpertBlocks.of(w_down)
        if _run_gemms(hidden, gate_up, down, layout, weights, act, slot_out, tiles, plan, out=out, plus=plus):
            return out
    block_h = min(1024, triton.next_power_of_2(H))
    block_t = max(1, 2048 // block_h)
    _sum_slots_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
        slot_out, out, T, H, TOP_K=K, BLOCK_T=block_t, BLOCK_H=block_h, **launch_options(slot_out.device)
    )
    if plus is None:
        return out
    return out + (sum_partials(plus, out.dtype) if plus.dim() == 3 else plus)


def _check_plus(plus: torch.Tensor, hidden: torch.Tensor) -> None:
    partials = plus.dim() == 3
    if plus.shape[-2:] != hidden.shape or not plus.is_contiguous():
        raise ValueError(f"plus {tuple(plus.shape)} must be a contiguous (T, Hd) = {tuple(hidden.shape)} or its partials")
    if plus.dtype != (torch.float32 if partials else hidden.dtype):
        raise ValueError(f"plus must be in hidden's dtype ({hidden.dtype}), its partials fp32; got {plus.dtype}")
