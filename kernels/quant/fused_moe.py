"""Routed experts on GGUF blocks: kernels/fused_moe.py's two grouped GEMMs with the weight tiles decoded in
registers, or, for prefill-sized batches, its bf16 kernels over experts dequantized into a bounded scratch.

Inputs as kernels/fused_moe.py's `fused_moe`, with QuantTensor expert stacks: w_gate_up (E, 2I, H)
(gate rows [0, I), up rows [I, 2I): gate and up concatenated by rows in block bytes, so one type) and
w_down (E, H, I) (its own type). Rows r = t*K + k are ordered by kernels/moe_routing.py's `moe_align`.

1. `_gate_up_kernel`: program (tile, column block), BLOCK_M sorted rows x BLOCK_N intermediate columns;
   decodes the tile's expert's gate and up rows (BLOCK_N, BLOCK_K) per step and runs two fp32 tl.dot
   accumulators over all of H in increasing k; writes silu(gate) * up to act (P, I) at the sorted position.
2. `_down_kernel`: act tile times the decoded w_down rows over all of I, times the routing weight in fp32,
   to slot_out (R, H) at row r.
3. kernels/fused_moe.py's `_sum_slots_kernel`: out[t] = sum over k = 0..K-1 in order, fp32.

The arithmetic is the bf16 kernel's, step for step: the decoded fp32 tile is rounded to the activations'
dtype (bf16 on the GPU, as dequantize-on-load rounds it) and chained through tl.dot from a zero
accumulator in increasing k, no split over the reduction dimension, no atomics. So the fused path gives
the bits of `kernels.fused_moe.fused_moe` on the bf16-dequantized experts, as long as the matrix
instructions accumulate the same way at every row tile (checked on an H200: kernels/NOTES-quant.md), and
the scratch path (prefill) is exactly that computation: switching paths with T keeps batch invariance.

Scratch path (`SCRATCH_MIN_ROWS_PER_EXPERT` and up): the layer's experts are dequantized to bf16 in groups
of at most scratch_mib (the amb-like bound), each group's tiles run through the bf16 GEMMs (tiles of
other experts say -1 for that group), all groups write one slot_out, then one slot sum.

Shared experts: when their type equals the routed stack's, the loader stacks them after the routed
experts (ids E.., as kernels/moe_routing.py appends them) and they run in the same launch; a different
type cannot share the stack (one decoder per launch): call this function a second time on the shared
stack with every token routed to all of them at weight 1, and add the two outputs.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
import triton
import triton.language as tl

from mlapipe.kernels import fused_moe as bf16_moe
from mlapipe.kernels.fused_moe import _sum_slots_kernel, _tile_and_column
from mlapipe.kernels.moe_routing import moe_align
from mlapipe.kernels.quant.dispatch import compute_dtype, quant_type, table_of
from mlapipe.kernels.quant.tensor import QuantTensor

# Rows per expert (T*K/E) from which dequantizing to the bf16 scratch beats decoding in the GEMMs
# (measured on an H200: kernels/NOTES-quant.md).
SCRATCH_MIN_ROWS_PER_EXPERT = 256
DEFAULT_SCRATCH_MIB = 4096
PATH_ENV = "MLAPIPE_QUANT_MOE_PATH"  # "fused" or "scratch" pins the path (tests, benches)
CONFIG_ENV = "MLAPIPE_QUANT_MOE_CONFIG"  # "block_m,block_n,warps,stages" pins the fused path's tiles


@triton.jit
def _gate_up_kernel(
    hidden_ptr,  # (T, H)
    w_ptr,  # (E, 2I, row_bytes) uint8 blocks
    table_ptr,
    act_ptr,  # (P, I) out
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
    DECODE: tl.constexpr,
    COMPUTE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
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
    ks = tl.arange(0, BLOCK_K)
    w_expert = w_ptr + expert.to(tl.int64) * stride_w_e
    at_ptrs = hidden_ptr + tokens[None, :] * stride_hidden_t + ks[:, None]  # (BLOCK_K, BLOCK_M)
    acc_gate = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        at = tl.load(at_ptrs + k0, mask=row_ok[None, :], other=0.0).to(COMPUTE)
        gate = DECODE(w_expert, cols_read, row_bytes, k0, BLOCK_K, table_ptr).to(COMPUTE)
        up = DECODE(w_expert, cols_read + inter_size, row_bytes, k0, BLOCK_K, table_ptr).to(COMPUTE)
        if IEEE:
            acc_gate = tl.dot(gate, at, acc_gate, input_precision="ieee")
            acc_up = tl.dot(up, at, acc_up, input_precision="ieee")
        else:
            acc_gate = tl.dot(gate, at, acc_gate)
            acc_up = tl.dot(up, at, acc_up)
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up  # (BLOCK_N, BLOCK_M)
    act_ptrs = act_ptr + positions[None, :].to(tl.int64) * stride_act_p + cols[:, None]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _down_kernel(
    act_ptr,  # (P, I)
    w_ptr,  # (E, H, row_bytes) uint8 blocks
    table_ptr,
    slot_out_ptr,  # (R, H) out
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
    DECODE: tl.constexpr,
    COMPUTE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
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
    ks = tl.arange(0, BLOCK_K)
    w_expert = w_ptr + expert.to(tl.int64) * stride_w_e
    at_ptrs = act_ptr + positions[None, :].to(tl.int64) * stride_act_p + ks[:, None]  # (BLOCK_K, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k0 in range(0, inter_size, BLOCK_K):
        at = tl.load(at_ptrs + k0).to(COMPUTE)
        w = DECODE(w_expert, cols_read, row_bytes, k0, BLOCK_K, table_ptr).to(COMPUTE)
        if IEEE:
            acc = tl.dot(w, at, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, at, acc)
    routing_weight = tl.load(topk_weights_ptr + rows, mask=row_ok, other=0.0)
    out = acc * routing_weight[None, :]  # (BLOCK_N, BLOCK_M)
    out_ptrs = slot_out_ptr + rows[None, :].to(tl.int64) * stride_slot_r + cols[:, None]
    tl.store(out_ptrs, out.to(slot_out_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])


@triton.jit
def _dequantize_rows_kernel(
    w_ptr,  # (rows, row_bytes) uint8 blocks
    table_ptr,
    out_ptr,  # (rows, cols) out
    num_rows,
    cols,
    row_bytes,
    DECODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    rows_read = tl.minimum(rows, num_rows - 1)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, cols, BLOCK_K):
        values = DECODE(w_ptr, rows_read, row_bytes, k0, BLOCK_K, table_ptr)
        offsets = rows[:, None].to(tl.int64) * cols + k0 + ks[None, :]
        tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _block_k(cols: int, tile_k: int, largest: int = 64) -> int:
    """Largest power-of-two multiple of the type's tile up to `largest` that divides the reduction dim."""
    assert cols % tile_k == 0, f"{cols} columns are not a multiple of the type's {tile_k}-element tile"
    block_k = tile_k
    while block_k < largest and cols % (2 * block_k) == 0:
        block_k *= 2
    return block_k


def dequantize_into(w: QuantTensor, out: torch.Tensor) -> torch.Tensor:
    """Decode w (*lead, rows, cols) into out (same logical shape, any float dtype) on w's device."""
    kind = quant_type(w.qtype)
    cols = w.shape[-1]
    rows = w.data.numel() // w.data.shape[-1]
    assert out.shape == tuple(w.shape) and out.is_contiguous()
    if rows == 0:
        return out
    block_n = 32 if _interpreted(w.device) else 64
    _dequantize_rows_kernel[(triton.cdiv(rows, block_n),)](
        w.data, table_of(w.qtype, w.device), out, rows, cols, w.data.shape[-1],
        DECODE=kind.decode, BLOCK_N=block_n, BLOCK_K=_block_k(cols, kind.tile_k),
    )  # fmt: skip
    return out


def _interpreted(device: torch.device) -> bool:
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _fused_tiles(num_rows: int, num_experts: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) of the decoding GEMMs, from rows per expert (never T itself)."""
    if text := os.environ.get(CONFIG_ENV):
        values = tuple(int(v) for v in text.split(","))
        assert len(values) == 4, f"{CONFIG_ENV} wants 4 integers (block_m,block_n,warps,stages), got {text!r}"
        return values
    if _interpreted(device):
        return 16, 32, 4, 1
    rows_per_expert = num_rows / num_experts
    if rows_per_expert >= 96:
        return 128, 128, 8, 3
    if rows_per_expert > 16:
        return 64, 64, 4, 3
    return 16, 64, 4, 3


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


def _fused_path(hidden, w_gate_up, w_down, topk_weights, topk_ids, slot_out) -> None:
    T, H = hidden.shape
    E, two_inter, _ = w_gate_up.shape
    inter, K = two_inter // 2, topk_ids.shape[1]
    block_m, block_n, warps, stages = _fused_tiles(T * K, E, hidden.device)
    layout = moe_align(topk_ids.contiguous(), E, block_m)
    compute = compute_dtype(hidden.dtype)
    common = dict(COMPUTE=compute, IEEE=compute == tl.float32, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=8)
    launch = dict(num_warps=warps, num_stages=stages)
    gate_up_type, down_type = quant_type(w_gate_up.qtype), quant_type(w_down.qtype)
    act = torch.empty(layout.max_tiles * block_m, inter, dtype=hidden.dtype, device=hidden.device)
    _gate_up_kernel[(layout.max_tiles * triton.cdiv(inter, block_n),)](
        hidden, w_gate_up.data, table_of(w_gate_up.qtype, hidden.device), act, layout.sorted_row_ids,
        layout.tile_expert, layout.num_rows, K, H, inter, layout.max_tiles, hidden.stride(0),
        w_gate_up.data.stride(0), w_gate_up.data.shape[-1], act.stride(0),
        DECODE=gate_up_type.decode, BLOCK_K=_block_k(H, gate_up_type.tile_k), **common, **launch,
    )  # fmt: skip
    weights = topk_weights.float().contiguous()
    _down_kernel[(layout.max_tiles * triton.cdiv(H, block_n),)](
        act, w_down.data, table_of(w_down.qtype, hidden.device), slot_out, layout.sorted_row_ids,
        layout.tile_expert, weights, layout.num_rows, H, inter, layout.max_tiles, act.stride(0),
        w_down.data.stride(0), w_down.data.shape[-1], slot_out.stride(0),
        DECODE=down_type.decode, BLOCK_K=_block_k(inter, down_type.tile_k), **common, **launch,
    )  # fmt: skip


def experts_per_group(E: int, H: int, inter: int, scratch_mib: float) -> int:
    """Experts whose bf16 gate|up and down fit in scratch_mib together (at least one)."""
    per_expert = 3 * H * inter * 2
    return max(1, min(E, int(scratch_mib * (1 << 20)) // per_expert))


def _scratch_path(hidden, w_gate_up, w_down, topk_weights, topk_ids, slot_out, scratch_mib) -> None:
    """The bf16 kernels of kernels/fused_moe.py over experts dequantized group by group into a scratch."""
    E, two_inter, H = w_gate_up.shape
    inter, K = two_inter // 2, topk_ids.shape[1]
    tiles = bf16_moe.pinned_tiles(hidden.device)
    batch_invariant = os.environ.get(bf16_moe.BATCH_INVARIANT_ENV, "1") != "0"
    block_m = tiles.block_m if tiles else bf16_moe.choose_block_m(topk_ids.numel(), E, batch_invariant)
    layout = moe_align(topk_ids.contiguous(), E, block_m)
    group = experts_per_group(E, H, inter, scratch_mib)
    gate_up = torch.empty(group, two_inter, H, dtype=hidden.dtype, device=hidden.device)
    down = torch.empty(group, H, inter, dtype=hidden.dtype, device=hidden.device)
    for first in range(0, E, group):
        last = min(E, first + group)
        n = last - first
        dequantize_into(w_gate_up[first:last], gate_up[:n])
        dequantize_into(w_down[first:last], down[:n])
        owner = layout.tile_expert
        in_group = (owner >= first) & (owner < last)
        group_layout = replace(layout, tile_expert=torch.where(in_group, owner - first, -1).to(torch.int32))
        act = bf16_moe.gate_up_silu(hidden, gate_up[:n], group_layout, K, tiles)
        bf16_moe.down_weighted(act, down[:n], group_layout, topk_weights, tiles, slot_out=slot_out)


def choose_path(num_rows: int, num_experts: int, activation_dtype: torch.dtype) -> str:
    """'fused' (decode in the GEMMs) or 'scratch' (dequantize, then the bf16 kernels), by rows per expert."""
    pinned = os.environ.get(PATH_ENV)
    if pinned:
        assert pinned in ("fused", "scratch"), f"{PATH_ENV} must be 'fused' or 'scratch', got {pinned!r}"
        return pinned
    if activation_dtype != torch.bfloat16:
        return "fused"  # the bf16 kernels take the activations' dtype; fp32/fp16 stay exact in the fused path
    return "scratch" if num_rows / num_experts >= SCRATCH_MIN_ROWS_PER_EXPERT else "fused"


def quant_fused_moe(
    hidden: torch.Tensor,  # (T, Hd)
    w_gate_up: QuantTensor,  # (E, 2I, Hd): rows [0, I) gate, [I, 2I) up
    w_down: QuantTensor,  # (E, Hd, I)
    topk_weights: torch.Tensor,  # (T, K) fp32
    topk_ids: torch.Tensor,  # (T, K)
    scratch_mib: float = DEFAULT_SCRATCH_MIB,  # bound on the bf16 scratch of the prefill path
) -> torch.Tensor:
    """Routed experts: sum_k w_k * down_e(silu(gate_e x) * up_e x), slots summed in order k = 0..K-1."""
    _check(hidden, w_gate_up, w_down, topk_weights, topk_ids)
    T, H = hidden.shape
    out = torch.empty_like(hidden)
    if T == 0:
        return out
    K = topk_ids.shape[1]
    slot_out = torch.empty(T * K, H, dtype=hidden.dtype, device=hidden.device)
    path = choose_path(T * K, w_gate_up.shape[0], hidden.dtype)
    if path == "scratch":
        _scratch_path(hidden, w_gate_up, w_down, topk_weights, topk_ids, slot_out, scratch_mib)
    else:
        _fused_path(hidden, w_gate_up, w_down, topk_weights, topk_ids, slot_out)
    block_h = min(1024, triton.next_power_of_2(H))
    block_t = max(1, 2048 // block_h)
    _sum_slots_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
        slot_out, out, T, H, TOP_K=K, BLOCK_T=block_t, BLOCK_H=block_h
    )
    return out
