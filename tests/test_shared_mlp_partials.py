"""Shared experts that cannot join the routed launch (another quant type) at decode sizes: their gate|up
partials go to the SiLU*up kernel and their down partials to the routed launch's last kernel, which adds
them (kernels/partials.py). The MoE block's output keeps the bits of the summed path and stays the torch
path's values. Without a GPU the Triton kernels run in the interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import textwrap  # noqa: E402
from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from mlapipe.kernels import reference  # noqa: E402
from mlapipe.kernels.quant import linear  # noqa: E402
from mlapipe.kernels.quant.fused_moe import quant_fused_moe  # noqa: E402
from mlapipe.kernels.quant.random_blocks import random_quant_tensor  # noqa: E402
from mlapipe.runtime.shapes import SHAPES  # noqa: E402
from mlapipe.workers.layers import MoEBlock  # noqa: E402
from tests.kernel_paths import take_path  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOLERANCE = 2e-2 if DEVICE == "cuda" else 1e-5


def _block(routed=Q.Q8_0, shared=Q.Q4_0):
    E, H, inter, n = 4, 2048, 512, 4  # K of 2048 (hidden, n * inter): the interpreter's plans split it
    cfg = replace(
        SHAPES["v2-lite"], hidden_size=H, num_experts=E, num_experts_per_token=2, num_shared_experts=n,
        expert_intermediate_size=inter,
    )  # fmt: skip
    shapes = {
        "moe.w_gate": ((E, inter, H), routed),
        "moe.w_up": ((E, inter, H), routed),
        "moe.w_down": ((E, H, inter), routed),
        "shared.w_gate": ((n * inter, H), shared),
        "shared.w_up": ((n * inter, H), shared),
        "shared.w_down": ((H, n * inter), shared),
    }
    weights = {k: random_quant_tensor(s, int(t), s[-1] ** -0.5, k, device=DEVICE) for k, (s, t) in shapes.items()}
    weights["moe.router"] = torch.randn(E, H, device=DEVICE) * H**-0.5
    block = MoEBlock(cfg, weights)
    assert block.shared_mlp is not None  # two types: the shared experts run on their own
    return block


def _forward(block, x, monkeypatch, kernels: str):
    """The block's output through the Triton kernels ('partials': as the model runs; 'summed': every split
    linear sums its own partials) or the torch references, and the ranks the linears returned."""
    ranks = take_path(monkeypatch, kernels)
    return block.forward(x), ranks


@pytest.mark.parametrize("T", [3])
def test_decode_moe_adds_the_shared_mlps_partials_in_the_routed_launch(T, monkeypatch):
    monkeypatch.setenv(linear.PROGRAMS_ENV, "64")  # more programs a SM: the 4096-row gate|up splits K too
    block = _block()
    x = torch.randn(T, block.cfg.hidden_size, generator=torch.Generator().manual_seed(T)).to(DEVICE, DTYPE)
    ours, ranks = _forward(block, x, monkeypatch, "partials")
    assert ranks == [3, 3], ranks  # the shared gate|up and down projections handed over their partials
    summed, summed_ranks = _forward(block, x, monkeypatch, "summed")
    assert summed_ranks == [2, 2]
    assert torch.equal(ours.view(torch.uint8), summed.view(torch.uint8))
    torch_path, _ = _forward(block, x, monkeypatch, "torch")
    assert float((ours.float() - torch_path.float()).abs().max() / torch_path.float().abs().max()) < TOLERANCE


def test_plus_of_the_fused_moe_is_torchs_add():
    """quant_fused_moe(..., plus=): the decode launch's kernel adds a (T, H) tensor or its partials with the
    bits of `out + plus` (partials summed first); the prefill-sized path adds them after its slot sum."""
    block = _block()
    T, H = 2, block.cfg.hidden_size
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(T, H, generator=generator).to(DEVICE, DTYPE)
    weights = torch.rand(T, 2, generator=generator).to(DEVICE)
    ids = torch.tensor([[0, 3], [3, 1]], device=DEVICE)
    stacks = (block.w_gate_up, block.w_down)
    routed = quant_fused_moe(x, *stacks, weights, ids)
    partials = torch.randn(3, T, H, generator=generator).to(DEVICE) * 0.1
    plain = reference.sum_partials(partials, DTYPE)
    for plus in (plain, partials):
        assert torch.equal(quant_fused_moe(x, *stacks, weights, ids, plus=plus), routed + plain)
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as patch:  # the walked launch and its slot sum
        patch.setenv("MLAPIPE_QUANT_MOE_SPLIT", "0")
        assert torch.equal(quant_fused_moe(x, *stacks, weights, ids, plus=partials), routed + plain)
    for bad in (partials[:, :, :8], partials.half()):  # not (T, H) wide; partials not fp32
        with pytest.raises(ValueError, match="plus"):
            quant_fused_moe(x, *stacks, weights, ids, plus=bad)


def test_the_partials_forms_compile_for_hopper():
    """The routed launch's last kernel adding 4 partials and the SiLU*up kernel summing 8 compile for sm_90
    (Triton's bundled ptxas; no GPU needed)."""
    from tests.hopper_compile import compile_script_output

    script = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from mlapipe.kernels.quant.moe_combine import down_combine_sum_kernel
        from mlapipe.kernels.silu_mul import _silu_mul_kernel
        def compile(fn, types, constexprs):
            sig = dict(types, **{name: "constexpr" for name in constexprs})
            src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
            return "griddepcontrol.wait" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        print(compile(down_combine_sum_kernel,
                      {"partial_ptr": "*fp32", "row_positions_ptr": "*i32", "topk_weights_ptr": "*fp32",
                       "out_ptr": "*bf16", "plus_ptr": "*fp32", "hidden_size": "i32", "num_positions": "i32",
                       "plus_partial_stride": "i32"},
                      {"TOP_K": 8, "NUM_CHUNKS": 5, "BLOCK_H": 256, "HAS_PLUS": True, "NUM_PLUS_PARTIALS": 4,
                       "PDL": True}))
        print(compile(_silu_mul_kernel, {"x_ptr": "*fp32", "out_ptr": "*bf16", "inter": "i32", "partial_stride": "i32"},
                      {"BLOCK": 1024, "NUM_PARTIALS": 8, "PDL": True}))
        """
    )
    assert compile_script_output(script) == ["True", "True"]
