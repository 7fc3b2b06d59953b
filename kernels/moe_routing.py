"""DeepSeek MoE routing: each token's experts and their weights. The rows' order for the grouped GEMMs is
kernels/moe_align.py; both in one launch at decode sizes, kernels/moe_route_align.py.

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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mlapipe.kernels.pdl import launch_options, wait_for_previous


@triton.jit
def route_tokens(
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
    route_tokens(
        logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_logits, scale, TOP_K,
        NUM_SHARED, USE_SIGMOID, HAS_BIAS, NUM_GROUPS, TOPK_GROUPS, RENORMALIZE, BLOCK_T, BLOCK_E, BLOCK_G,
        BLOCK_K,
    )  # fmt: skip


def route_tokens_per_program(num_tokens: int, num_experts: int) -> int:
    """BLOCK_T of the route kernel: fewer tokens a program as E grows, to keep the (BLOCK_T, BLOCK_E) tile
    in registers."""
    return max(1, min(16, 4096 // triton.next_power_of_2(num_experts), triton.next_power_of_2(num_tokens)))


def prepare_routing(
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
    weights, ids, args, meta = prepare_routing(
        router_logits, bias, top_k, gating, num_groups, topk_groups, renormalize, scale, num_shared
    )
    T = router_logits.shape[0]
    if T == 0:
        return weights, ids
    _route_kernel[(triton.cdiv(T, meta["BLOCK_T"]),)](*args, **meta, **launch_options(router_logits.device))
    return weights, ids
