"""Quantized fused MoE (kernels/quant/fused_moe.py) against "decode to fp32, then the torch reference", both
paths (decode in the GEMMs; bf16 scratch + today's kernels), bounded scratch; on a GPU, bf16 accuracy,
determinism, batch invariance across the paths, and equality with the bf16 kernel on dequantized experts.

Without a GPU the Triton kernels run in the interpreter (fp16/fp32 only: its bf16 dot is broken)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

from mlapipe.kernels import reference  # noqa: E402
from mlapipe.kernels.fused_moe import fused_moe  # noqa: E402
from mlapipe.kernels.quant.dispatch import dequantize, kernel_type  # noqa: E402
from mlapipe.kernels.quant.fused_moe import (  # noqa: E402
    PATH_ENV,
    SPLIT_ENV,
    experts_per_group,
    moe_plan,
    quant_fused_moe,
)
from mlapipe.kernels.quant.random_blocks import random_quant_tensor  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL = 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 20
FIRST_TYPES = [Q8_0, Q4_K]  # both paths, every T and dtype; the other types once
TYPES = [pytest.param(t, id=kernel_type(t).name) for t in FIRST_TYPES]
# the other types with a split decoder (the prefetched gate|up and down loops: K-quants, then 32-value
# types), one table (grid) type, a plain float type; the linear tests take them all
SPLIT_TYPES = (Q6_K, Q5_K, Q2_K, Q3_K, Q5_0, IQ4_NL, Q4_0, Q5_1, Q4_1)
OTHER_TYPES = [pytest.param(t, id=kernel_type(t).name) for t in (*SPLIT_TYPES, 16, 30)]


def experts(gate_up_type: int, down_type: int, E: int, H: int, inter: int, seed: int = 0):
    """Random valid expert stacks on DEVICE, values of std 1/sqrt(fan in)."""
    gate_up = random_quant_tensor((E, 2 * inter, H), gate_up_type, H**-0.5, "gate_up", seed, DEVICE)
    down = random_quant_tensor((E, H, inter), down_type, inter**-0.5, "down", seed, DEVICE)
    return gate_up, down


def routing(T: int, K: int, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(DEVICE)
    return torch.rand(T, K, device=DEVICE), ids


def assert_close_to_reference(out, hidden, gate_up, down, weights, ids):
    """fp32: within fp32 rounding of the reference; fp16: the kernels keep act and each slot in the
    activations' dtype (as the bf16 kernel does), so a few fp16 roundings."""
    ref = reference.quant_fused_moe(hidden, gate_up, down, weights, ids).float()
    assert out.shape == ref.shape and out.dtype == hidden.dtype
    scale = ref.abs().max().item()
    atol = 2e-5 * scale if hidden.dtype == torch.float32 else 4e-3 * scale
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=atol)


class _env:
    """Sets an environment variable for a block (the kernels read their pins at call time)."""

    def __init__(self, name, value):
        self.name, self.value = name, value

    def __enter__(self):
        self.old = os.environ.get(self.name)
        os.environ[self.name] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(self.name)
        else:
            os.environ[self.name] = self.old


def dims(qtype: int, down_qtype: int) -> tuple[int, int]:
    """(H, I): H over the gate|up type's blocks (GEMM 1 reduces over H: two 32-value blocks, or one
    256-value super-block), I one block of the down type (GEMM 2 reduces over I: K = one block), or the
    tile of its split decoder where that is wider (two 32-value blocks), so the down loop takes it too."""
    h_block, i_block = (max(32, kernel_type(t).block_elems) for t in (qtype, down_qtype))
    return max(64, h_block), max(kernel_type(down_qtype).fetch_block_k, i_block)


MOE_CASES = [
    # (T, dtype, path)
    pytest.param(1, torch.float32, "fused", id="T1-fp32-fused"),  # one token: one row in one tile
    pytest.param(3, torch.float16, "fused", id="T3-fp16-fused"),
    pytest.param(17, torch.float32, "fused", id="T17-fp32-fused"),  # over one 16-row tile
    pytest.param(3, torch.float32, "scratch", id="T3-fp32-scratch"),
    pytest.param(3, torch.float16, "scratch", id="T3-fp16-scratch"),
]


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("T, dtype, path", MOE_CASES)
def test_moe_matches_reference(qtype, T, dtype, path):
    if path == "scratch" and qtype != Q8_0:
        pytest.skip("the scratch path is the type's dequantize (tested there) + Q8_0's case: slow here")
    E, K = 5, 2  # prime expert count
    H, inter = dims(qtype, qtype)
    gate_up, down = experts(qtype, qtype, E, H, inter)
    weights, ids = routing(T, K, E)
    hidden = torch.randn(T, H, device=DEVICE).to(dtype)
    with _env(PATH_ENV, path):
        out = quant_fused_moe(hidden, gate_up, down, weights, ids)
    assert_close_to_reference(out, hidden, gate_up, down, weights, ids)


@pytest.mark.parametrize("qtype", OTHER_TYPES)
def test_moe_other_types(qtype):
    E, K = 3, 2
    H, inter = dims(qtype, qtype)
    gate_up, down = experts(qtype, qtype, E, H, inter)
    weights, ids = routing(3, K, E)
    hidden = torch.randn(3, H, device=DEVICE)
    out = quant_fused_moe(hidden, gate_up, down, weights, ids)
    assert_close_to_reference(out, hidden, gate_up, down, weights, ids)


@pytest.mark.parametrize("down_type", [pytest.param(t, id=kernel_type(t).name) for t in (Q8_0, Q5_0)])
def test_moe_gate_up_and_down_of_different_types(down_type):
    """V2-Lite's case: K-quant gate|up over H, 32-value blocks for down over I = 1408 (llama.cpp's Q4_K
    files fall back to Q5_0 there, its Q6_K ones to Q8_0)."""
    gate_up_type = Q4_K
    H, inter = dims(gate_up_type, down_type)
    gate_up, down = experts(gate_up_type, down_type, 3, H, inter)
    weights, ids = routing(4, 2, 3)
    hidden = torch.randn(4, H, device=DEVICE)
    assert_close_to_reference(
        quant_fused_moe(hidden, gate_up, down, weights, ids), hidden, gate_up, down, weights, ids
    )


def test_split_chunks_give_the_walked_chunks_bits():
    """H = 2048 makes two chunks of GEMM 1 in the interpreter's plan (more on a GPU): chunks as programs of
    their own (partials, then the combine kernels) == chunks walked inside each program, and both ==
    reference."""
    E, H, inter = 3, 2048, 32
    gate_up, down = experts(Q8_0, Q8_0, E, H, inter)
    weights, ids = routing(3, 2, E)
    hidden = torch.randn(3, H, device=DEVICE)
    assert moe_plan(gate_up, down, 6, hidden.device).gate_up.num_chunks >= 2  # 2 on 2 SMs, more on a GPU
    with _env(SPLIT_ENV, "1"):
        split = quant_fused_moe(hidden, gate_up, down, weights, ids)
    with _env(SPLIT_ENV, "0"):
        walked = quant_fused_moe(hidden, gate_up, down, weights, ids)
    assert torch.equal(split, walked)
    assert_close_to_reference(split, hidden, gate_up, down, weights, ids)


def test_bounded_scratch_gives_the_same_bits():
    """Metamorphic: experts dequantized two at a time (3 groups of 5) == all at once."""
    qtype = Q8_0
    E, H, inter = 5, *dims(qtype, qtype)
    gate_up, down = experts(qtype, qtype, E, H, inter)
    weights, ids = routing(6, 2, E)
    hidden = torch.randn(6, H, device=DEVICE)
    two_experts_mib = 2 * 3 * H * inter * 4 / (1 << 20)
    assert experts_per_group(E, H, inter, two_experts_mib, hidden.element_size()) == 2
    with _env(PATH_ENV, "scratch"):
        bounded = quant_fused_moe(hidden, gate_up, down, weights, ids, scratch_mib=two_experts_mib)
        unbounded = quant_fused_moe(hidden, gate_up, down, weights, ids, scratch_mib=1 << 20)
    assert torch.equal(bounded, unbounded)


def test_shared_experts_of_another_type_as_a_second_call():
    """Shared experts whose type differs from the routed stack run as a second call, every token routed
    to all of them at weight 1; the sum equals the reference of routed + shared."""
    routed_type, shared_type = Q4_K, Q6_K
    H, inter = dims(routed_type, shared_type)
    gate_up, down = experts(routed_type, routed_type, 4, H, inter, seed=1)
    shared_gate_up, shared_down = experts(shared_type, shared_type, 2, H, inter, seed=2)
    weights, ids = routing(3, 2, 4)
    hidden = torch.randn(3, H, device=DEVICE)
    ones, all_shared = torch.ones(3, 2, device=DEVICE), torch.arange(2, device=DEVICE).expand(3, 2)
    out = quant_fused_moe(hidden, gate_up, down, weights, ids)
    out = out + quant_fused_moe(hidden, shared_gate_up, shared_down, ones, all_shared.contiguous())
    ref = reference.quant_fused_moe(hidden, gate_up, down, weights, ids)
    ref = ref + reference.quant_fused_moe(hidden, shared_gate_up, shared_down, ones, all_shared)
    torch.testing.assert_close(out, ref, rtol=0, atol=4e-5 * ref.abs().max().item())


def test_bad_input_names_the_problem():
    qtype = Q8_0
    H, inter = dims(qtype, qtype)
    gate_up, down = experts(qtype, qtype, 3, H, inter)
    weights, ids = routing(2, 2, 3)
    with pytest.raises(ValueError, match="w_down"):
        quant_fused_moe(torch.randn(2, H, device=DEVICE), gate_up, gate_up, weights, ids)
    with pytest.raises(ValueError, match="hidden"):
        quant_fused_moe(torch.randn(2, H + 32, device=DEVICE), gate_up, down, weights, ids)


# ----------------------------------------------------------------------------------------------------
# GPU (python -m pytest -m gpu tests/test_quant_moe.py)

V2_LITE = dict(E=64, K=6, H=2048, inter=1408)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", TYPES)
def test_gpu_moe_bf16_accuracy_determinism_invariance(qtype):
    m = V2_LITE
    kind = kernel_type(qtype)
    down_type = qtype if m["inter"] % kind.block_elems == 0 else Q8_0  # 1408: 32-value blocks only
    gate_up, down = experts(qtype, down_type, m["E"], m["H"], m["inter"])
    weights, ids = routing(4096, m["K"], m["E"])
    hidden = torch.randn(4096, m["H"], device="cuda", dtype=torch.bfloat16)
    for T in (1, 16, 512):
        out = quant_fused_moe(hidden[:T], gate_up, down, weights[:T], ids[:T])
        err = relative_error(out, reference.quant_fused_moe(hidden[:T], gate_up, down, weights[:T], ids[:T]))
        assert err < 1e-2, f"T={T}: relative error {err}"
    first = quant_fused_moe(hidden[:16], gate_up, down, weights[:16], ids[:16])
    for _ in range(20):
        assert torch.equal(quant_fused_moe(hidden[:16], gate_up, down, weights[:16], ids[:16]), first)
    alone = quant_fused_moe(hidden[7:8], gate_up, down, weights[7:8], ids[7:8])
    for T in (512, 4096):  # 512: the fused path's prefill tiles; 4096: the bf16 scratch path
        batch = quant_fused_moe(hidden[:T], gate_up, down, weights[:T], ids[:T])
        assert torch.equal(batch[7:8], alone), f"a token alone differs from it among {T - 1} others"
    with _env(SPLIT_ENV, "0"):
        walked = quant_fused_moe(hidden[:16], gate_up, down, weights[:16], ids[:16])
    assert torch.equal(walked, first), "chunks walked in each program differ from the split launch"
    for path in ("fused", "scratch"):
        with _env(PATH_ENV, path):
            out = quant_fused_moe(hidden[:600], gate_up, down, weights[:600], ids[:600])
        assert torch.equal(out[7:8], alone), f"{path} path differs"
    bf16 = fused_moe(
        hidden[:16],
        dequantize(gate_up, torch.bfloat16),
        dequantize(down, torch.bfloat16),
        weights[:16],
        ids[:16],
    )
    print("same bits as the bf16 kernel on the dequantized experts:", torch.equal(first, bf16))
    assert relative_error(first, bf16) < 1e-2
