"""Dense linear on GGUF blocks: out (T, N) = x (T, K) @ decode(w)^T, fp32 accumulation, out in x's dtype.

The weight stays in its block bytes (kernels/quant/tensor.py); each program decodes (BLOCK_N, BLOCK_K)
tiles in registers with the type's Triton decoder (a constexpr function: DECODE(w_ptr, rows, row_bytes,
k0, BLOCK_K, table_ptr) -> fp32 (len(rows), BLOCK_K)) and feeds them to tl.dot, cast to the compute
dtype: bf16 for bf16 activations (the same rounding as dequantizing the weight to bf16 at load), fp32 with
IEEE products otherwise (so fp32/fp16 activations match "decode to fp32, then the torch reference").

One reduction order for every batch size. K is cut into fixed chunks (`LinearPlan`: chunk_k elements,
a function of N, K, the type and the GPU's SM count, never of T). Within a chunk an fp32 accumulator
starts at zero and takes tl.dot steps in increasing k; the chunks' results are then added in chunk order
to a zero fp32 total. Two launch shapes compute exactly that:
- split (decode-sized T): grid (column blocks, chunks), BLOCK_M 16..64 rows a program, so every SM streams
  weights even when N alone gives few column blocks. Each program writes its chunk's partial (chunks, T, N)
  fp32; `_sum_chunks_kernel` adds them in chunk order. One chunk: the program writes 0 + acc itself.
- tiled (prefill-sized T): grid (row blocks x column blocks), BLOCK_M 64; each program walks the
  chunks in order, restarting a zero accumulator per chunk and adding it to its total. `quant_linear`
  runs it over a scratch: rows of w dequantized to x's dtype (at most DEFAULT_SCRATCH_MIB at a time) and
  read by a plain-float decoder (kernels/quant/scratch.py), so each weight is decoded once, not once per
  row tile; the values are the same rounded numbers, so the bits are too.
The weight tile is the dot's first operand (out^T = W x^T): wgmma reads it from registers and its 64-row
minimum falls on weight rows; the tokens are the dot's N (16 at decode). All launches give the same bits
for a row whatever T is or where the row sits in the batch, as long as the matrix instructions
accumulate a chunk the same way for every tile shape (checked on an H200 by the GPU tests:
kernels/NOTES-quant.md). No atomics anywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mlapipe.kernels.pdl import launch_options, wait_for_previous
from mlapipe.kernels.quant.dispatch import (
    MIN_TILE_K,
    compute_dtype,
    dequantize_on_device,
    kernel_type,
    largest_block_k,
    split_decoder,
    table_of,
)
from mlapipe.kernels.quant.scratch import SCRATCH_DECODERS
from mlapipe.kernels.quant.tensor import QuantTensor

SPLIT_MAX_TOKENS = 64  # up to here the split launch; past it the tiled one over a dequantized scratch
DEFAULT_SCRATCH_MIB = 1024  # bound on the scratch of the tiled launch (rows dequantized at a time)
PROGRAMS_PER_SM = 16  # split launch target: warps in flight to hide the decode latency (swept 2-16)
PROGRAMS_ENV = "MLAPIPE_QUANT_PROGRAMS_PER_SM"  # overrides it (sweeps; changes the chunks, so the bits)
# "block_m,block_n,warps,stages" pins a launch's tiles (benches, sweeps); the bits do not depend on them
SPLIT_CONFIG_ENV = "MLAPIPE_QUANT_SPLIT_CONFIG"
TILED_CONFIG_ENV = "MLAPIPE_QUANT_TILED_CONFIG"


@dataclass(frozen=True)
class LinearPlan:
    """The reduction order of one weight shape: chunks of chunk_k elements walked in BLOCK_K steps."""

    block_k: int
    chunk_k: int
    num_chunks: int


def reduction_block_k(K: int, largest: int = 64) -> int:
    """BLOCK_K of a GEMM reducing over K: the largest power of two from the decoders' 32 up to `largest`
    that divides K (a tile never straddles the row's end)."""
    if K % MIN_TILE_K:
        raise ValueError(f"quantized GEMMs need a reduction dim that is a multiple of {MIN_TILE_K}, got {K}")
    block_k = MIN_TILE_K
    while block_k < largest and K % (2 * block_k) == 0:
        block_k *= 2
    return block_k


def plan_linear(
    N: int,
    K: int,
    block_elems: int,
    num_sms: int,
    largest_block_k: int = 64,
    per_sm: int = PROGRAMS_PER_SM,
    prefetched: bool = False,
) -> LinearPlan:
    """Fixed K chunks for (N, K): as many as it takes for (column blocks x chunks) to reach PROGRAMS_PER_SM
    programs a SM in the split launch (64 columns a program), each chunk at least 4 loop iterations. Chunks
    start on block boundaries (steps of max(BLOCK_K, the type's block) values). A loop iteration is such a
    step for a whole-block decoder, and BLOCK_K values for a split decoder (`prefetched`: it loads a
    BLOCK_K tile of a larger block a step ahead), so a 256-value K-quant block is one chunk's worth there:
    Q4_K at K = 2048 gets 8 chunks, not 2 (which left 64-176 programs on 132 SMs, 16 iterations each)."""
    block_k = reduction_block_k(K, largest_block_k)
    step = max(block_k, block_elems)
    steps = K // step
    iteration = block_k if prefetched else step
    min_steps = triton.cdiv(4 * iteration, step)
    column_blocks = triton.cdiv(N, 64)
    wanted = max(1, min(triton.cdiv(per_sm * num_sms, column_blocks), steps // min_steps))
    chunk_k = triton.cdiv(steps, wanted) * step
    return LinearPlan(block_k, chunk_k, triton.cdiv(K, chunk_k))


@triton.jit
def _dot(w, xt, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(w, xt, acc, input_precision="ieee")
    return tl.dot(w, xt, acc)


@triton.jit
def prefetched_dot(
    acc, w_ptr, rows, row_bytes, xt_ptrs, token_ok, k_start, k_end, FETCH: tl.constexpr, CONVERT: tl.constexpr,
    COMPUTE: tl.constexpr, IEEE: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """decoded_dot's sum (the same dots in the same order) for a decoder split into FETCH (its loads:
    w_ptr, rows, row_bytes, k0, BLOCK_K -> quants, scales; k0 absolute) and CONVERT (its register math:
    quants, scales, k0 -> fp32 (len(rows), BLOCK_K)): each step's bytes are loaded one step ahead, before the
    current step is converted, so a warp always has a step of loads in flight instead of waiting on each
    one. The last step fetches its own bytes again (never converted): no load past k_end."""
    q, d = FETCH(w_ptr, rows, row_bytes, k_start, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        xt = tl.load(xt_ptrs + k0, mask=token_ok[None, :], other=0.0).to(COMPUTE)
        q_next, d_next = FETCH(w_ptr, rows, row_bytes, tl.minimum(k0 + BLOCK_K, k_end - BLOCK_K), BLOCK_K)
        acc = _dot(CONVERT(q, d, k0).to(COMPUTE), xt, acc, IEEE)
        q, d = q_next, d_next
    return acc


@triton.jit
def decoded_dot(
    acc, w_ptr, table_ptr, rows, row_bytes, xt_ptrs, token_ok, k_start, k_end,
    DECODE: tl.constexpr, COMPUTE: tl.constexpr, IEEE: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_ELEMS: tl.constexpr, BLOCK_BYTES: tl.constexpr, FETCH: tl.constexpr = None, CONVERT: tl.constexpr = None,
):  # fmt: skip
    """acc (BLOCK_N, BLOCK_M) + decode(w[rows, k_start:k_end]) @ xt[k_start:k_end, :] in BLOCK_K steps,
    k increasing; xt_ptrs (BLOCK_K, BLOCK_M) point at k = 0 of each column of x transposed.

    The weight tile is the dot's first operand: on Hopper wgmma takes it straight from the registers the
    decoder left it in (no shared-memory round trip), and its 64-row minimum falls on the weight rows, so
    a single token costs a 16-column x tile, not a 64-row one. Each loop step covers STEP = max(BLOCK_K,
    block) values from a pointer moved to the step's first block, and decodes its BLOCK_K tiles at
    constant offsets, so the decoder's per-value address arithmetic is the same every step (the
    compiler keeps it out of the loop) and only one scalar pointer moves. A type with a split decoder
    (FETCH / CONVERT, kernels/quant/split_decoders.py) takes prefetched_dot instead: the same sum."""
    if FETCH is not None:
        return prefetched_dot(
            acc, w_ptr, rows, row_bytes, xt_ptrs, token_ok, k_start, k_end, FETCH, CONVERT, COMPUTE, IEEE, BLOCK_K
        )  # fmt: skip
    STEP: tl.constexpr = BLOCK_K if BLOCK_K > BLOCK_ELEMS else BLOCK_ELEMS
    for k0 in range(k_start, k_end, STEP):
        w_step = w_ptr + (k0 // BLOCK_ELEMS) * BLOCK_BYTES
        for sub in tl.static_range(STEP // BLOCK_K):
            xt = tl.load(xt_ptrs + (k0 + sub * BLOCK_K), mask=token_ok[None, :], other=0.0).to(COMPUTE)
            w = DECODE(w_step, rows, row_bytes, sub * BLOCK_K, BLOCK_K, table_ptr).to(COMPUTE)
            acc = _dot(w, xt, acc, IEEE)
    return acc


@triton.jit
def _linear_split_kernel(
    x_ptr,  # (T, K)
    w_ptr,  # (N, row_bytes) uint8 blocks
    table_ptr,  # the type's lookup table (any pointer when it has none)
    partial_ptr,  # (num_chunks, T, N) fp32 out; unused when DIRECT
    out_ptr,  # (T, N) out when DIRECT
    num_tokens,
    N,
    K,
    row_bytes,
    stride_x,
    chunk_k,
    DECODE: tl.constexpr,
    COMPUTE: tl.constexpr,
    IEEE: tl.constexpr,
    DIRECT: tl.constexpr,  # one chunk: write 0 + acc in out's dtype, no partials
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_ELEMS: tl.constexpr,  # the type's values and bytes per block
    BLOCK_BYTES: tl.constexpr,  # bytes the row pointer moves per block (QuantType.step_bytes)
    FETCH: tl.constexpr = None,  # the decoder's loads and register math, where it is split (prefetched_dot)
    CONVERT: tl.constexpr = None,
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_read = tl.minimum(rows, N - 1)  # columns past N decode the last row; never stored
    chunk = tl.program_id(1)
    k_start = chunk * chunk_k
    k_end = tl.minimum(k_start + chunk_k, K)
    for m0 in range(0, num_tokens, BLOCK_M):
        tokens = m0 + tl.arange(0, BLOCK_M)
        token_ok = tokens < num_tokens
        xt_ptrs = x_ptr + tokens[None, :].to(tl.int64) * stride_x + tl.arange(0, BLOCK_K)[:, None]
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        acc = decoded_dot(
            acc, w_ptr, table_ptr, rows_read, row_bytes, xt_ptrs, token_ok, k_start, k_end,
            DECODE, COMPUTE, IEEE, BLOCK_K, BLOCK_ELEMS, BLOCK_BYTES, FETCH, CONVERT,
        )  # fmt: skip
        mask = row_ok[:, None] & token_ok[None, :]
        if DIRECT:
            total = tl.zeros((BLOCK_N, BLOCK_M), tl.float32) + acc
            offsets = tokens[None, :].to(tl.int64) * N + rows[:, None]
            tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            offsets = (chunk * num_tokens + tokens[None, :]).to(tl.int64) * N + rows[:, None]
            tl.store(partial_ptr + offsets, acc, mask=mask)


@triton.jit
def _sum_chunks_kernel(
    partial_ptr, out_ptr, numel, NUM_CHUNKS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False
):
    """out = 0 + partial[0] + partial[1] + ... in chunk order, fp32, then out's dtype. The chunks are
    unrolled so every load is in flight at once (a loop waits one memory latency a chunk)."""
    wait_for_previous(PDL)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    total = tl.zeros((BLOCK,), tl.float32)
    for chunk in tl.static_range(NUM_CHUNKS):
        total += tl.load(partial_ptr + chunk * numel + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_tiled_kernel(
    x_ptr,  # (T, K)
    w_ptr,  # (N, row_bytes) uint8 blocks
    table_ptr,
    out_ptr,  # (T, N) columns of an output with row stride stride_out
    num_tokens,
    N,
    K,
    row_bytes,
    stride_x,
    stride_out,
    chunk_k,
    num_chunks,
    DECODE: tl.constexpr,
    COMPUTE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_ELEMS: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
    FETCH: tl.constexpr = None,
    CONVERT: tl.constexpr = None,
    PDL: tl.constexpr = False,
):
    # Consecutive programs share a column block, so its weight bytes come from L2 for the row blocks.
    wait_for_previous(PDL)
    num_row_blocks = tl.cdiv(num_tokens, BLOCK_M)
    pid = tl.program_id(0)
    tokens = (pid % num_row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = (pid // num_row_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    token_ok = tokens < num_tokens
    row_ok = rows < N
    rows_read = tl.minimum(rows, N - 1)
    xt_ptrs = x_ptr + tokens[None, :].to(tl.int64) * stride_x + tl.arange(0, BLOCK_K)[:, None]
    total = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for chunk in range(num_chunks):  # in order, each from a zero accumulator: the split launch's sum
        k_start = chunk * chunk_k
        k_end = tl.minimum(k_start + chunk_k, K)
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        acc = decoded_dot(
            acc, w_ptr, table_ptr, rows_read, row_bytes, xt_ptrs, token_ok, k_start, k_end,
            DECODE, COMPUTE, IEEE, BLOCK_K, BLOCK_ELEMS, BLOCK_BYTES, FETCH, CONVERT,
        )  # fmt: skip
        total += acc
    offsets = tokens[None, :].to(tl.int64) * stride_out + rows[:, None]
    tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & token_ok[None, :])


def _interpreted(device: torch.device) -> bool:
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _num_sms(device: torch.device) -> int:
    if _interpreted(device):
        return 2  # small grids in the interpreter, still more than one chunk on odd shapes
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pinned(name: str) -> tuple[int, int, int, int] | None:
    text = os.environ.get(name)
    if not text:
        return None
    values = tuple(int(v) for v in text.split(","))
    assert len(values) == 4, f"{name} wants 4 integers (block_m,block_n,warps,stages), got {text!r}"
    return values


def _split_tiles(num_tokens: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) of the split launch."""
    if pinned := _pinned(SPLIT_CONFIG_ENV):
        return pinned
    if _interpreted(device):
        return 16, 64, 4, 1
    return max(16, min(64, triton.next_power_of_2(num_tokens))), 64, 4, 1  # stages 1: measured fastest


def _tiled_tiles(num_tokens: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) of the tiled launch."""
    if pinned := _pinned(TILED_CONFIG_ENV):
        return pinned
    if _interpreted(device):
        return 16, 64, 4, 1
    return 64, 128, 8, 3  # 128 x 128 spills: the chunk accumulator and the total are both live


def linear_plan(w: QuantTensor, device: torch.device) -> LinearPlan:
    N, K = w.shape
    widest = largest_block_k(_interpreted(device), kernel_type(w.qtype))
    per_sm = int(os.environ.get(PROGRAMS_ENV, PROGRAMS_PER_SM))
    kind = kernel_type(w.qtype)
    prefetched = split_decoder(kind)[0] is not None
    return plan_linear(N, K, kind.block_elems, _num_sms(device), widest, per_sm, prefetched)


def _check(x: torch.Tensor, w: QuantTensor) -> None:
    if not isinstance(w, QuantTensor) or len(w.shape) != 2:
        raise ValueError(f"quant_linear: w must be a 2-D QuantTensor, got {type(w).__name__}")
    kernel_type(w.qtype)
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"quant_linear: x {tuple(x.shape)} does not match w {w.shape} (T, K) x (N, K)")
    if x.device != w.device:
        raise ValueError(f"quant_linear: x on {x.device}, w on {w.device}")
    if x.stride(1) != 1 or not w.data.is_contiguous():
        raise ValueError("quant_linear: x rows and w blocks must be contiguous")


PREFETCH_BLOCK_K = 128  # a split decoder's step in the split launch, where the plan's chunks allow it


def split_block_k(plan: LinearPlan, K: int, kind) -> int:
    """BLOCK_K of the split launch: the plan's, or PREFETCH_BLOCK_K where the type's split decoder takes
    tiles that wide and every chunk is whole steps of it. A wider step puts twice the bytes in flight per
    load and changes no bits: one tl.dot over 128 values is the same chain of k16 MMAs as two over 64
    (checked on an H200: tests/test_quant_planes.py compares with the file layout's bits)."""
    wide = PREFETCH_BLOCK_K
    whole = plan.block_k < wide and plan.chunk_k % wide == 0 and K % wide == 0
    return wide if whole and split_decoder(kind, wide)[0] is not None else plan.block_k


def linear_split(x: torch.Tensor, w: QuantTensor, plan: LinearPlan, unsummed: bool = False) -> torch.Tensor:
    """The split launch (any T; chosen for decode-sized batches). unsummed: return the fp32 partials
    (num_chunks, T, N) when there are several, for a consumer that sums them in order itself."""
    T, K = x.shape
    N = w.shape[0]
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    kind, table = kernel_type(w.qtype), table_of(w.qtype, x.device)
    block_k = split_block_k(plan, K, kind)
    fetch, convert = split_decoder(kind, block_k)
    block_m, block_n, warps, stages = _split_tiles(T, x.device)
    compute = compute_dtype(x.dtype)
    direct = plan.num_chunks == 1
    partial = out if direct else torch.empty(plan.num_chunks, T, N, dtype=torch.float32, device=x.device)
    _linear_split_kernel[(triton.cdiv(N, block_n), plan.num_chunks)](
        x, w.data, table, partial, out, T, N, K, w.data.shape[-1], x.stride(0), plan.chunk_k,
        DECODE=kind.decoder, COMPUTE=compute, IEEE=compute == tl.float32, DIRECT=direct,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_ELEMS=kind.block_elems,
        BLOCK_BYTES=kind.step_bytes, FETCH=fetch, CONVERT=convert, num_warps=warps, num_stages=stages,
        **launch_options(x.device),
    )  # fmt: skip
    if not direct and unsummed:
        return partial
    if not direct:
        block = 1024
        _sum_chunks_kernel[(triton.cdiv(T * N, block),)](
            partial, out, T * N, NUM_CHUNKS=plan.num_chunks, BLOCK=block, **launch_options(partial.device)
        )
    return out


def _launch_tiled(
    x, data, decoder, table, block_elems, block_bytes, out, plan: LinearPlan, fetch=None, convert=None
) -> None:
    """Tiled launch of rows data (N, row_bytes) into out (T, N), a view with any row stride."""
    T, K = x.shape
    N = data.shape[0]
    block_m, block_n, warps, stages = _tiled_tiles(T, x.device)
    compute = compute_dtype(x.dtype)
    _linear_tiled_kernel[(triton.cdiv(T, block_m) * triton.cdiv(N, block_n),)](
        x, data, table, out, T, N, K, data.shape[-1], x.stride(0), out.stride(0), plan.chunk_k,
        plan.num_chunks, DECODE=decoder, COMPUTE=compute, IEEE=compute == tl.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=plan.block_k, BLOCK_ELEMS=block_elems,
        BLOCK_BYTES=block_bytes, FETCH=fetch, CONVERT=convert, num_warps=warps, num_stages=stages,
        **launch_options(x.device),
    )  # fmt: skip


def linear_tiled(x: torch.Tensor, w: QuantTensor, plan: LinearPlan) -> torch.Tensor:
    """The tiled launch decoding the blocks in the loop (any T)."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    if x.shape[0]:
        kind = kernel_type(w.qtype)
        table = table_of(w.qtype, x.device)
        _launch_tiled(
            x,
            w.data,
            kind.decoder,
            table,
            kind.block_elems,
            kind.step_bytes,
            out,
            plan,
            *split_decoder(kind, plan.block_k),
        )
    return out


def linear_tiled_scratch(
    x: torch.Tensor, w: QuantTensor, plan: LinearPlan, scratch_mib: float = DEFAULT_SCRATCH_MIB
) -> torch.Tensor:
    """The tiled launch over w dequantized to x's dtype, scratch_mib of rows at a time (prefill-sized T:
    each weight is decoded once instead of once per row tile). Same plan, same values: the same bits."""
    T, K = x.shape
    N = w.shape[0]
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    rows_per_slice = max(128, int(scratch_mib * (1 << 20)) // (K * x.element_size()) // 128 * 128)
    for first in range(0, N, rows_per_slice):
        last = min(N, first + rows_per_slice)
        values = dequantize_on_device(QuantTensor(w.data[first:last], w.qtype, (last - first, K)), x.dtype)
        data = values.view(torch.uint8)
        decoder = SCRATCH_DECODERS[x.dtype]
        _launch_tiled(x, data, decoder, data, 1, x.element_size(), out[:, first:last], plan)
    return out


def quant_linear(
    x: torch.Tensor,  # (T, K) bf16 / fp16 / fp32
    w: QuantTensor,  # (N, K) logical, GGUF blocks
    unsummed: bool = False,
) -> torch.Tensor:
    """x @ decode(w)^T, (T, N) in x's dtype; the same bits for a row at every T (module header).
    unsummed: a split launch may return its fp32 partials (num_chunks, T, N) instead (linear_split)."""
    _check(x, w)
    plan = linear_plan(w, x.device)
    if x.shape[0] <= SPLIT_MAX_TOKENS:
        return linear_split(x, w, plan, unsummed)
    return linear_tiled_scratch(x, w, plan)
