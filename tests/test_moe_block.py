"""The MoE block's two forms (decode-sized: shared experts inside the fused launch; prefill-sized: a
dense shared MLP) against the plain composition: routed experts plus the shared SwiGLU MLP of width n*I,
built from the unstacked weights. CPU, fp32, the kernels' torch references."""

from dataclasses import replace

import pytest
import torch

from mlapipe.kernels import reference
from mlapipe.runtime.shapes import SHAPES
from mlapipe.workers.layers import FUSED_SHARED_MAX_TOKENS, MoEBlock


def small_config(shape: str, shared: int):
    """The named shape's routing (gating, groups, scale), at a hidden size and expert count a CPU runs."""
    cfg = SHAPES[shape]
    experts = 16 if cfg.num_expert_groups == 1 else 32
    return replace(
        cfg, hidden_size=64, num_experts=experts, num_shared_experts=shared, expert_intermediate_size=24
    )


def random_weights(cfg, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    E, inter, hidden, n = (
        cfg.num_experts,
        cfg.expert_intermediate_size,
        cfg.hidden_size,
        cfg.num_shared_experts,
    )
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    weights = {
        "moe.router": rand(E, hidden),
        "moe.w_gate": rand(E, inter, hidden),
        "moe.w_up": rand(E, inter, hidden),
        "moe.w_down": rand(E, hidden, inter),
    }
    if cfg.gating == "sigmoid":
        weights["moe.router_bias"] = rand(E)
    if n:
        weights |= {
            "shared.w_gate": rand(n * inter, hidden),
            "shared.w_up": rand(n * inter, hidden),
            "shared.w_down": rand(hidden, n * inter),
        }
    return weights


def unfused(cfg, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    routing = reference.moe_routing(
        x @ weights["moe.router"].t(), weights.get("moe.router_bias"), cfg.num_experts_per_token, cfg.gating,
        cfg.num_expert_groups, cfg.num_expert_groups_used, cfg.expert_weights_norm, cfg.expert_weights_scale,
    )  # fmt: skip
    w_gate_up = torch.cat((weights["moe.w_gate"], weights["moe.w_up"]), dim=1)
    out = reference.fused_moe(x, w_gate_up, weights["moe.w_down"], *routing)
    if cfg.num_shared_experts:
        out = out + reference.dense_mlp(
            x, weights["shared.w_gate"], weights["shared.w_up"], weights["shared.w_down"]
        )
    return out


@pytest.mark.parametrize("shape, shared", [("v2-lite", 2), ("v3", 1), ("v2-lite", 0)])
def test_both_forms_equal_the_plain_composition(shape, shared):
    cfg = small_config(shape, shared)
    weights = random_weights(cfg, seed=3)
    block = MoEBlock(cfg, dict(weights))
    x = torch.randn(FUSED_SHARED_MAX_TOKENS + 9, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    expected = unfused(cfg, weights, x)
    prefill_form = block.forward(x)  # more tokens than the fused form takes
    decode_form = torch.cat([block.forward(x[i : i + 16]) for i in range(0, x.shape[0], 16)])
    for got in (prefill_form, decode_form):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(expected, torch.zeros_like(expected))
