"""Quantized dense linear (kernels/quant/linear.py) against "decode to fp32, then the torch reference", on
odd shapes and both launch shapes; on a GPU, bf16 accuracy, determinism and batch invariance.

Without a GPU the Triton kernels run in the interpreter (fp16/fp32 only: its bf16 dot is broken)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

from mlapipe.kernels import reference  # noqa: E402
from mlapipe.kernels.quant.dispatch import dequantize, kernel_type, kernel_types, split_decoder  # noqa: E402
from mlapipe.kernels.quant.linear import (  # noqa: E402
    PROGRAMS_PER_SM,
    SPLIT_MAX_TOKENS,
    LinearPlan,
    linear_plan,
    linear_split,
    linear_tiled,
    linear_tiled_scratch,
    plan_linear,
    quant_linear,
)
from mlapipe.kernels.quant.random_blocks import random_quant_tensor  # noqa: E402
from mlapipe.kernels.quant.tensor import QuantTensor  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIRST_TYPES = [8, 12]  # Q8_0, Q4_K: every shape and dtype; the other types on one odd shape
TYPES = [pytest.param(t, id=kernel_type(t).name) for t in FIRST_TYPES]
OTHER_TYPES = [pytest.param(t, id=kernel_type(t).name) for t in kernel_types() if t not in FIRST_TYPES]


def weight(qtype: int, N: int, blocks: int, seed: int = 0) -> QuantTensor:
    """(N, blocks * block_elems) random valid blocks on DEVICE, values of std K^-0.5 (plain float types:
    blocks of 32 values)."""
    K = blocks * max(32, kernel_type(qtype).block_elems)
    return random_quant_tensor((N, K), qtype, K**-0.5, "w", seed=seed, device=DEVICE)


def assert_within_rounding(out: torch.Tensor, x: torch.Tensor, w: QuantTensor) -> None:
    """|out - ref| within fp32 dot rounding (1e-5 of sum |x||w| per element), plus one rounding of the
    output dtype when it is narrower than fp32."""
    ref = reference.quant_linear(x, w).float()
    magnitude = x.float().abs() @ dequantize(w).abs().t()
    tolerance = 1e-5 * magnitude + 1e-30
    if out.dtype != torch.float32:
        tolerance = tolerance + ref.abs() * torch.finfo(out.dtype).eps
    assert out.shape == ref.shape and out.dtype == x.dtype
    excess = ((out.float() - ref).abs() - tolerance).max().item()
    assert excess <= 0, f"off by {excess:.3g} beyond rounding"


SHAPES = [
    # (T, N, K blocks)
    pytest.param(1, 40, 1, id="T1-K-one-block"),  # one token, N over one 32-column tile
    pytest.param(3, 70, 3, id="T3-N-odd"),  # N not a multiple of the tile, odd block count
    pytest.param(17, 33, 2, id="T17"),  # T over one 16-row tile
]


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("T, N, blocks", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_matches_reference(qtype, T, N, blocks, dtype):
    w = weight(qtype, N, blocks)
    x = torch.randn(T, w.shape[1], device=DEVICE).to(dtype)
    assert_within_rounding(quant_linear(x, w), x, w)


@pytest.mark.parametrize("qtype", OTHER_TYPES)
def test_linear_other_types(qtype):
    w = weight(qtype, 33, 1)
    x = torch.randn(3, w.shape[1], device=DEVICE)
    assert_within_rounding(quant_linear(x, w), x, w)


@pytest.mark.parametrize("qtype", TYPES)
def test_both_launches_over_several_chunks(qtype):
    """A plan of 3 chunks, the last one short: the split launch's partials and sum, and the tiled launch's
    in-order chunk totals, both within rounding; and the tiled launch past SPLIT_MAX_TOKENS rows."""
    kind = kernel_type(qtype)
    w = weight(qtype, 37, 5)
    plan = LinearPlan(32, 2 * kind.block_elems, 3)  # chunks of 2, 2 and 1 blocks
    assert plan.chunk_k * (plan.num_chunks - 1) < w.shape[1] < plan.chunk_k * plan.num_chunks
    x = torch.randn(5, w.shape[1], device=DEVICE)
    assert_within_rounding(linear_split(x, w, plan), x, w)
    assert_within_rounding(linear_tiled(x, w, plan), x, w)
    x = torch.randn(SPLIT_MAX_TOKENS + 3, w.shape[1], device=DEVICE)
    assert_within_rounding(quant_linear(x, w), x, w)  # past the split launch: tiled over the scratch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unsummed_partials_summed_by_add_rms_norm_give_the_summed_bits(dtype):
    """A split launch asked for its partials returns (chunks, T, N) fp32; the layer's add_rms_norm sums
    them to the same bits as the launch's own chunk sum followed by the plain add_rms_norm."""
    from mlapipe.kernels.fused_norm_rope import add_rms_norm

    w = weight(8, 37, 5)
    plan = LinearPlan(32, 64, 3)
    x = torch.randn(2, w.shape[1], device=DEVICE).to(dtype)
    partials = linear_split(x, w, plan, unsummed=True)
    summed = linear_split(x, w, plan)
    assert partials.shape == (3, 2, 37) and partials.dtype == torch.float32
    stream = torch.randn(2, 37, device=DEVICE).to(dtype)
    norm = torch.rand(37, device=DEVICE) + 0.5
    for got, want in zip(add_rms_norm(stream, partials, norm, 1e-6), add_rms_norm(stream, summed, norm, 1e-6)):
        assert torch.equal(got, want)
    one_chunk = LinearPlan(32, w.shape[1], 1)  # nothing to sum: the output itself
    assert linear_split(x, w, one_chunk, unsummed=True).shape == (2, 37)


# the types with a split decoder (kernels/quant/split_decoders.py): 64-value tiles of 256-value blocks (the
# K-quants Q4_K Q5_K Q2_K Q6_K Q3_K), or of two 32-value blocks (Q4_0 Q4_1 Q5_0 Q5_1 IQ4_NL)
SPLIT_TYPES = [pytest.param(t, id=kernel_type(t).name) for t in (12, 13, 10, 14, 11, 2, 3, 6, 7, 20)]


@pytest.mark.parametrize("qtype", SPLIT_TYPES)
def test_split_decoder_chunks_of_one_block(qtype):
    """A split decoder (64-value tiles of a 256-value block) may take chunks of one block: 4 loop
    iterations. Its plans do (8 chunks at K = 2048 where a whole-block decoder gets 2), and such chunks
    give the split and tiled launches the same sums, within rounding of the reference; the type's plan
    and launches take the split decoder (the prefetched loop), at every tile position of a block. A 32-value
    type's plan is the same either way (a loop iteration is BLOCK_K values with or without the split)."""
    assert plan_linear(3648, 2048, 256, 132, prefetched=True).num_chunks == 8
    assert plan_linear(3648, 2048, 256, 132).num_chunks == 2
    for K in (1408, 2048, 10944):  # V2-Lite's expert intermediate, hidden and dense intermediate sizes
        assert plan_linear(2048, K, 32, 132, prefetched=True) == plan_linear(2048, K, 32, 132)
    kind = kernel_type(qtype)
    assert kind.fetch is not None and split_decoder(kind, 64) == (kind.fetch, kind.convert)
    w = weight(qtype, 70, 768 // kind.block_elems)  # K = 768: three K-quant blocks; N past one 64-row tile
    assert linear_plan(w, w.device).block_k == 64
    plan = LinearPlan(64, 256, 3)
    x = torch.randn(3, w.shape[1], device=DEVICE)
    split = linear_split(x, w, plan)
    assert_within_rounding(split, x, w)
    assert torch.equal(split, linear_tiled(x, w, plan))


def test_tiled_scratch_in_slices_gives_the_same_bits():
    """Metamorphic: rows dequantized 128 at a time (3 slices of 300) == all at once; both == the tiled
    launch decoding in its loop (the same plan and values; the interpreter's dot is exact fp32)."""
    w = weight(8, 300, 5)
    x = torch.randn(5, w.shape[1], device=DEVICE)
    plan = LinearPlan(32, 64, 3)
    sliced = linear_tiled_scratch(x, w, plan, scratch_mib=128 * w.shape[1] * 4 / (1 << 20))
    assert torch.equal(sliced, linear_tiled_scratch(x, w, plan, scratch_mib=1024))
    assert torch.equal(sliced, linear_tiled(x, w, plan))
    assert_within_rounding(sliced, x, w)


def test_plan_is_fixed_by_the_weight_shape():
    """Chunks cover K in BLOCK_K steps; enough chunks to give each of 132 SMs PROGRAMS_PER_SM programs
    where K allows."""
    target = PROGRAMS_PER_SM * 132
    for N, K in [(7168, 16384), (3072, 2048), (129280, 7168), (2048, 1408), (64, 32)]:
        plan = plan_linear(N, K, 32, 132)
        assert plan.chunk_k % plan.block_k == 0 and K % plan.block_k == 0
        assert (plan.num_chunks - 1) * plan.chunk_k < K <= plan.num_chunks * plan.chunk_k
        column_blocks = -(-N // 64)
        if K // plan.block_k >= 4 * target:
            assert (
                column_blocks * plan.num_chunks >= target or plan.num_chunks == 1 and column_blocks >= target
            )
    assert plan_linear(7168, 16384, 32, 132).num_chunks == 19  # V3 o_proj: 112 column blocks
    assert plan_linear(129280, 7168, 32, 132).num_chunks == 2  # the head: 2020 column blocks, 15 a SM
    assert plan_linear(2048, 2048, 256, 132).chunk_k % 256 == 0  # K-quant chunks start on super-blocks


def test_bad_input_names_the_problem():
    w = weight(8, 8, 2)
    with pytest.raises(ValueError, match="does not match"):
        quant_linear(torch.randn(2, w.shape[1] + 32, device=DEVICE), w)
    with pytest.raises(ValueError, match="QuantTensor"):
        quant_linear(torch.randn(2, 64, device=DEVICE), torch.randn(8, 64))
    bogus = QuantTensor(w.data, 999, w.shape)
    with pytest.raises(ValueError, match="no block decoder"):
        quant_linear(torch.randn(2, w.shape[1], device=DEVICE), bogus)


# ----------------------------------------------------------------------------------------------------
# GPU: bf16 accuracy, determinism, batch invariance (python -m pytest -m gpu tests/test_quant_linear.py)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


GPU_SHAPES = [(7168, 2048), (2048, 1408), (3072, 2048), (7168, 16384)]  # (N, K): V3/V2-Lite projections


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("N, K", GPU_SHAPES)
def test_gpu_bf16_accuracy_determinism_invariance(qtype, N, K):
    kind = kernel_type(qtype)
    if K % kind.block_elems:
        pytest.skip(f"{kind.name} rows need a multiple of {kind.block_elems}")
    w = weight(qtype, N, K // kind.block_elems)
    x = torch.randn(512, K, device="cuda", dtype=torch.bfloat16)
    for T in (1, 16, 512):
        err = relative_error(quant_linear(x[:T], w), reference.quant_linear(x[:T], w))
        assert err < 1e-2, f"T={T}: relative error {err}"
    first = quant_linear(x[:16], w)
    for _ in range(20):
        assert torch.equal(quant_linear(x[:16], w), first), "runs differ"
    plan = linear_plan(w, x.device)
    alone = linear_split(x[5:6], w, plan)
    assert torch.equal(quant_linear(x[5:6], w), alone)
    assert torch.equal(quant_linear(x, w)[5:6], alone), "a token alone differs from it among 511 others"
    assert torch.equal(linear_split(x[:40], w, plan)[5:6], alone), "split launch differs at 40 rows"
    assert torch.equal(linear_tiled(x[:100], w, plan)[5:6], alone), "tiled launch differs"
    assert torch.equal(linear_tiled_scratch(x[:100], w, plan, 64)[5:6], alone), "scratch slices differ"
