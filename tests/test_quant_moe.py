"""Quantized fused MoE (kernels/quant/fused_moe.py) against "decode to fp32, then the torch reference", both
paths (decode in the GEMMs; bf16 scratch + today's kernels), bounded scratch; on a GPU, bf16 accuracy,
determinism, batch invariance across the paths, and equality with the bf16 kernel on dequantized experts.

Without a GPU the Triton kernels run in the interpreter (fp16/fp32 only: its bf16 dot is broken)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mlapipe.kernels.fused_moe import fused_moe  # noqa: E402
from mlapipe.kernels import reference  # noqa: E402
from mlapipe.kernels.quant.dispatch import dequantize, kernel_types, quant_type  # noqa: E402
from mlapipe.kernels.quant.fused_moe import PATH_ENV, experts_per_group, quant_fused_moe  # noqa: E402
from mlapipe.kernels.quant.tensor import QuantTensor  # noqa: E402
from tests.quant_random import random_quant  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TYPES = [pytest.param(t, id=quant_type(t).name) for t in kernel_types()]


def experts(gate_up_type: int, down_type: int, E: int, H: int, inter: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    gate_up = random_quant(gate_up_type, (E, 2 * inter, H), rng, H**-0.5)
    down = random_quant(down_type, (E, H, inter), rng, inter**-0.5)
    return tuple(QuantTensor(w.data.to(DEVICE), w.qtype, w.shape) for w in (gate_up, down))


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
    """(H, I): H two blocks of the gate|up type (GEMM 1 reduces over H), I one block of the down type
    (GEMM 2 reduces over I: K = one block)."""
    return 2 * quant_type(qtype).block_elems, quant_type(down_qtype).block_elems


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("T", [1, 3, 17])  # one token; odd; over a 16-row tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", ["fused", "scratch"])
def test_moe_matches_reference(qtype, T, dtype, path):
    E, K = 5, 2  # prime expert count
    H, inter = dims(qtype, qtype)
    gate_up, down = experts(qtype, qtype, E, H, inter)
    weights, ids = routing(T, K, E)
    hidden = torch.randn(T, H, device=DEVICE).to(dtype)
    with _env(PATH_ENV, path):
        out = quant_fused_moe(hidden, gate_up, down, weights, ids)
    assert_close_to_reference(out, hidden, gate_up, down, weights, ids)


def test_moe_gate_up_and_down_of_different_types():
    types = kernel_types()
    gate_up_type, down_type = types[-1], types[0]
    H, inter = dims(gate_up_type, down_type)
    gate_up, down = experts(gate_up_type, down_type, 3, H, inter)
    weights, ids = routing(4, 2, 3)
    hidden = torch.randn(4, H, device=DEVICE)
    assert_close_to_reference(
        quant_fused_moe(hidden, gate_up, down, weights, ids), hidden, gate_up, down, weights, ids
    )


def test_bounded_scratch_gives_the_same_bits():
    """Metamorphic: experts dequantized two at a time (3 groups of 5) == all at once."""
    qtype = kernel_types()[0]
    E, H, inter = 5, *dims(qtype, qtype)
    gate_up, down = experts(qtype, qtype, E, H, inter)
    weights, ids = routing(6, 2, E)
    hidden = torch.randn(6, H, device=DEVICE)
    two_experts_mib = 2 * 3 * H * inter * 4 / (1 << 20)
    assert experts_per_group(E, H, inter, two_experts_mib / 2) == 2  # bf16 scratch: half the bytes
    with _env(PATH_ENV, "scratch"):
        bounded = quant_fused_moe(hidden, gate_up, down, weights, ids, scratch_mib=two_experts_mib / 2)
        unbounded = quant_fused_moe(hidden, gate_up, down, weights, ids, scratch_mib=1 << 20)
    assert torch.equal(bounded, unbounded)


def test_shared_experts_of_another_type_as_a_second_call():
    """Shared experts whose type differs from the routed stack run as a second call, every token routed
    to all of them at weight 1; the sum equals the reference of routed + shared."""
    types = kernel_types()
    routed_type, shared_type = types[0], types[-1]
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
    qtype = kernel_types()[0]
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
    kind = quant_type(qtype)
    down_type = qtype if m["inter"] % kind.block_elems == 0 else kernel_types()[0]  # 1408: 32-blocks only
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
    bf16 = fused_moe(
        hidden[:16],
        dequantize(gate_up, torch.bfloat16),
        dequantize(down, torch.bfloat16),
        weights[:16],
        ids[:16],
    )
    assert torch.equal(first, bf16), "fused path differs from the bf16 kernel on the dequantized experts"
