"""The weight stacks the layers build (gate|up per expert, shared experts appended, q|latent, a quantized
embedding) are what the quantized Triton kernels take: the kernels give the torch path's values on them.
Without a GPU the kernels run in the interpreter (fp32 activations)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from mlapipe.kernels import reference  # noqa: E402
from mlapipe.kernels.quant.dequantize import quant_embedding  # noqa: E402
from mlapipe.kernels.quant.fused_moe import quant_fused_moe  # noqa: E402
from mlapipe.kernels.quant.linear import quant_linear  # noqa: E402
from mlapipe.kernels.quant.random_blocks import random_quant_tensor  # noqa: E402
from mlapipe.runtime.shapes import SHAPES  # noqa: E402
from mlapipe.workers import ops, stacking  # noqa: E402
from mlapipe.workers.layers import MoEBlock  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOLERANCE = 2e-2 if DEVICE == "cuda" else 1e-5


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def _torch_path(fn, *args):
    """The same ops call with the torch reference forced (as on a CPU)."""
    previous = os.environ.get("MLAPIPE_REFERENCE_KERNELS")
    os.environ["MLAPIPE_REFERENCE_KERNELS"] = "1"
    try:
        return fn(*args)
    finally:
        if previous is None:
            del os.environ["MLAPIPE_REFERENCE_KERNELS"]
        else:
            os.environ["MLAPIPE_REFERENCE_KERNELS"] = previous


@pytest.mark.parametrize("types, joined", [((Q.Q8_0,) * 4, True), ((Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q6_K), False)])
def test_moe_stacks_run_in_the_quantized_kernels(types, joined):
    E, H, inter, n = 4, 256, 128, 2
    cfg = replace(
        SHAPES["v2-lite"], hidden_size=H, num_experts=E, num_experts_per_token=2, num_shared_experts=n,
        expert_intermediate_size=inter,
    )  # fmt: skip
    shapes = {
        "moe.w_gate": ((E, inter, H), types[0]),
        "moe.w_up": ((E, inter, H), types[0]),
        "moe.w_down": ((E, H, inter), types[1]),
        "shared.w_gate": ((n * inter, H), types[2]),
        "shared.w_up": ((n * inter, H), types[2]),
        "shared.w_down": ((H, n * inter), types[3]),
    }
    weights = {
        k: random_quant_tensor(s, int(t), s[-1] ** -0.5, k, device=DEVICE) for k, (s, t) in shapes.items()
    }
    weights["moe.router"] = torch.randn(E, H, device=DEVICE) * H**-0.5
    block = MoEBlock(cfg, weights)
    assert block.shared_in_stack == joined
    x = torch.randn(3, H, device=DEVICE).to(DTYPE)
    shared = n if joined else 0
    routing = reference.moe_routing(
        reference.router_logits(x, block.router), None, 2, "softmax", 1, 1, False, 1.0, shared
    )
    stacks = (block.w_gate_up[: E + shared], block.w_down[: E + shared])
    kernel = quant_fused_moe(x, *stacks, *routing)
    assert _relative(kernel, _torch_path(ops.fused_moe, x, *stacks, *routing)) <= TOLERANCE
    if not joined:  # the shared experts' own MLP: linears on the stacked gate|up and the down projection
        mlp = block.shared_mlp
        for w, inputs in ((mlp.gate_up, x), (mlp.down, torch.randn(3, n * inter, device=DEVICE).to(DTYPE))):
            assert _relative(quant_linear(inputs, w), _torch_path(ops.linear, inputs, w)) <= TOLERANCE


def test_q_latent_stack_and_embedding_run_in_the_quantized_kernels():
    wq_a = random_quant_tensor((256, 512), int(Q.Q4_K), 512**-0.5, "q_a", device=DEVICE)
    wkv_a = random_quant_tensor((320, 512), int(Q.Q4_K), 512**-0.5, "kv_a", device=DEVICE)
    stacked = stacking.cat_rows([wq_a, wkv_a])
    x = torch.randn(5, 512, device=DEVICE).to(DTYPE)
    assert _relative(quant_linear(x, stacked), _torch_path(ops.linear, x, stacked)) <= TOLERANCE
    assert stacking.cat_rows([wq_a, random_quant_tensor((320, 512), int(Q.Q6_K), 0.04, "x")]) is None
    table = random_quant_tensor((64, 256), int(Q.Q4_K), 1.0, "embed", device=DEVICE)
    ids = torch.tensor([0, 7, 63, 7], device=DEVICE)
    got = quant_embedding(ids, table, DTYPE)
    assert torch.equal(got, _torch_path(ops.embedding, ids, table, DTYPE))
