"""Triton MoE router logits: x (T, hidden) @ router (E, hidden).T in exact fp32, batch-invariant, one kernel.

The torch path (`x.float() @ router.t()`) takes a cast copy plus a cuBLAS GEMV or sgemm: ~3 launches per
layer at decode, and cuBLAS may pick a different reduction order at a different T, so a token's logits
(and with them its discrete expert choice) could depend on which other tokens share its batch.

Here one program computes a (BLOCK_T tokens, BLOCK_E experts) tile of logits with CUDA-core fma (never
tl.dot, whose tf32 would round the inputs), x upcast to fp32 as it is loaded. Every logit gets the same
arithmetic whatever the tile, the warps or the pipelining:
  - lane j of BLOCK_K (a module constant) accumulates x[k] * w[k] for k = j, j + BLOCK_K, j + 2 BLOCK_K,
    ... in that order, one fma per step into its own fp32 accumulator (products are never rounded
    apart from the sum, and no reduction runs across threads inside the loop);
  - after the loop the BLOCK_K lanes are summed by a fixed pairwise tree: (0+1), (2+3), ... then pairs
    of those, each step a reshape to (..., 2) + split + add. A two-term sum is commutative in IEEE, so
    the tree's bits cannot depend on how the compiler lays lanes out over threads -- unlike tl.sum,
    whose order follows the layout, which follows the tile shape and num_warps.
So a logit's bits depend on (x row, router row, hidden, BLOCK_K) only, and `_config` is free to pick the
tile from T for speed; tests/test_router_kernel.py checks (on a GPU) that every config gives the same bits.

Sizes (decode on an H100/H200, 132 SMs): the router is E * hidden * 4 bytes (512 KB for V2-Lite, 7 MB
for V3), read once per BLOCK_T rows. At T=1 the kernel is bound by how many bytes are in flight: one
loop step reads E * BLOCK_K * 4 bytes over all programs, so small T takes a narrow expert tile (many
programs, most SMs busy) and a deep load pipeline (tl.range num_stages: loads of later steps in flight
while this one's fmas run). Larger T takes a taller tile so that the router is re-read from L2 fewer times.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mlapipe.kernels.pdl import launch_options, wait_for_previous

BLOCK_K = 256  # fixes each logit's summation order: changing it changes bits, never batch invariance
LOG2_BLOCK_K = BLOCK_K.bit_length() - 1


@triton.jit
def _router_logits_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    T,
    E,
    hidden,
    x_row_stride,
    w_row_stride,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOG2_BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + t.to(tl.int64)[:, None] * x_row_stride
    w_rows = w_ptr + e.to(tl.int64)[:, None] * w_row_stride
    t_mask = (t < T)[:, None]
    e_mask = (e < E)[:, None]
    # lane accumulators: acc[i, j, l] sums x[t_i, l + n BLOCK_K] * w[e_j, l + n BLOCK_K] over n, in order
    acc = tl.zeros((BLOCK_T, BLOCK_E, BLOCK_K), tl.float32)
    for k0 in tl.range(0, hidden, BLOCK_K, num_stages=NUM_STAGES):
        cols = k0 + k
        k_mask = (cols < hidden)[None, :]
        xs = tl.load(x_rows + cols[None, :], mask=t_mask & k_mask, other=0.0).to(tl.float32)
        ws = tl.load(w_rows + cols[None, :], mask=e_mask & k_mask, other=0.0).to(tl.float32)
        acc = tl.fma(xs[:, None, :], ws[None, :, :], acc)  # masked lanes add 0 * 0
    # fixed pairwise tree over the lanes: (2i, 2i+1) at every level, whatever the layout
    for _ in tl.static_range(LOG2_BLOCK_K):
        left, right = tl.split(tl.reshape(acc, (BLOCK_T, BLOCK_E, acc.shape[2] // 2, 2)))
        acc = left + right
    logits = tl.reshape(acc, (BLOCK_T, BLOCK_E))
    out = out_ptr + t.to(tl.int64)[:, None] * E + e[None, :]
    tl.store(out, logits, mask=t_mask & (e < E)[None, :])


def _config(T: int, E: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps, num_stages) for a T-token batch of E experts. Speed only: the bits
    are the same for every config. The (BLOCK_T, BLOCK_E, BLOCK_K) accumulator takes at most 64 fp32
    registers a thread; compiled for sm_90 (Triton 3.9) these take 32 to 152 registers, never spilling."""
    if T <= 8:
        # decode: the router read dominates; 2 experts a program puts E=256 on 128 programs (1 puts
        # E=64 on 64), each keeping 4 steps of router loads in flight (~1 MB over the grid at E=256)
        return triton.next_power_of_2(T), (1 if E <= 64 else 2), 4, 5
    if T <= 32:
        return 16, 2, 8, 4
    # larger batches: a 16 x 4 tile re-reads the router from L2 once per 16 tokens and x once per 4
    # experts (0.75 bytes of L2 traffic per fma)
    return 16, 4, 8, 3


def router_logits(
    x: torch.Tensor, router: torch.Tensor, *, config: tuple[int, int, int, int] | None = None
) -> torch.Tensor:
    """x (T, hidden) any float dtype, unit stride on the last dim; router (E, hidden) fp32 -> (T, E) fp32
    logits, x upcast to fp32, fp32 products and sums. Each logit is one program's sum over hidden in a
    fixed order, so a token's logits do not depend on the other tokens of the batch (batch-invariant).

    `config` (BLOCK_T, BLOCK_E, num_warps, num_stages) overrides the tile for tests; it never changes
    the result."""
    T, hidden = x.shape
    E = router.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if router.stride(-1) != 1:
        router = router.contiguous()
    out = torch.empty((T, E), dtype=torch.float32, device=x.device)
    if T and E:
        block_t, block_e, num_warps, num_stages = config or _config(T, E)
        grid = (triton.cdiv(T, block_t), triton.cdiv(E, block_e))
        _router_logits_kernel[grid](
            x, router, out, T, E, hidden, x.stride(0), router.stride(0),
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=BLOCK_K, LOG2_BLOCK_K=LOG2_BLOCK_K,
            NUM_STAGES=num_stages, num_warps=num_warps, **launch_options(x.device),
        )  # fmt: skip
    return out
