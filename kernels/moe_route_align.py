"""Routing (kernels/moe_routing.py) and the rows' order (kernels/moe_align.py) in one launch.

Both in one launch (`moe_route_and_align`, the MoE block's call): when the route kernel's one program holds
the whole batch and R <= 128 (`route_align_fits`: a decode step of up to 16 tokens on V2-Lite, 14 on V3),
`_route_align_kernel` runs the route program (the shared `route_tokens`), a CTA barrier (its ids' stores
then visible to every thread of the program), then the one-chunk ordering (`align_one_chunk`) on those
ids, with the two kernels' tiles: the same weights, ids and layout, bit for bit (a compile test checks the
route part's sm_90 layouts are the route kernel's). Larger batches run `moe_routing` then `moe_align`.
BLOCK_M is the caller's: the grouped GEMMs' row tile (`row_tile` of kernels/fused_moe.py and
kernels/quant/fused_moe.py), which take the layout as `layout=`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mlapipe.kernels.moe_align import (
    ONE_PROGRAM_ROWS,
    MoeLayout,
    align_meta,
    align_one_chunk,
    empty_layout,
    moe_align,
)
from mlapipe.kernels.moe_routing import moe_routing, prepare_routing, route_tokens, route_tokens_per_program
from mlapipe.kernels.pdl import launch_options, wait_for_previous


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
    route_tokens(
        logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_logits, scale, TOP_K,
        NUM_SHARED, USE_SIGMOID, HAS_BIAS, NUM_GROUPS, TOPK_GROUPS, RENORMALIZE, BLOCK_T, BLOCK_E, BLOCK_G,
        BLOCK_K,
    )  # fmt: skip
    tl.debug_barrier()  # the ids' stores above are visible to every thread of the program below
    align_one_chunk(
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
    weights, ids, args, meta = prepare_routing(
        router_logits, bias, top_k, gating, num_groups, topk_groups, renormalize, scale, num_shared
    )
    layout = empty_layout(ids.numel(), E + num_shared, block_m, router_logits.device)
    _route_align_kernel[(1,)](
        *args, layout.expert_counts, layout.tile_expert, layout.sorted_row_ids, layout.row_positions,
        layout.max_tiles, **_route_align_meta(meta, ids.numel(), E + num_shared, block_m),
        **launch_options(router_logits.device),
    )  # fmt: skip
    return weights, ids, layout


def _route_align_meta(route_meta: dict, num_rows: int, num_experts: int, block_m: int) -> dict:
    """_route_align_kernel's constexprs: the route kernel's and the one-chunk ordering's, as those two
    kernels would take them (the ordering's BLOCK_E renamed BLOCK_E_ALIGN)."""
    align = align_meta(num_rows, num_experts, block_m)
    align["BLOCK_E_ALIGN"] = align.pop("BLOCK_E")
    return dict(route_meta, **align)
