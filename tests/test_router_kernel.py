"""Triton router logits (kernels/router.py) against the torch reference, on random data of odd shapes and
a strided x; batch invariance (a token alone = the same token in any batch, bit for bit) and config
invariance (every tile gives the same bits). Without a GPU they run in the interpreter (fp32 and fp16 x;
its bf16 is not trusted), and the bf16 model-shape tests are GPU-only."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

from mlapipe.kernels import reference  # noqa: E402
from mlapipe.kernels.router import _config, router_logits  # noqa: E402
from mlapipe.workers import ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V2_LITE = dict(E=64, hidden=2048)
V3 = dict(E=256, hidden=7168)


def problem(T: int, E: int, hidden: int, dtype=torch.float32, device=DEVICE):
    """Random x (never zeros; an offset so that logits are not all near 0) and an fp32 router."""
    x = (torch.randn(T, hidden, device=device) + 0.25).to(dtype)
    router = torch.randn(E, hidden, device=device) / hidden**0.5
    return x, router


def assert_matches_reference(ours: torch.Tensor, x: torch.Tensor, router: torch.Tensor) -> None:
    """Only the summation order differs from the reference (computed on the CPU, so no TF32 setting can
    touch it): rtol 1e-5, plus 1e-5 of the largest logit for the logits that cancel to ~0."""
    ref = reference.router_logits(x.cpu(), router.cpu())
    assert ours.dtype == torch.float32 and ours.shape == ref.shape and ours.is_contiguous()
    atol = 1e-5 * float(ref.abs().max().clamp_min(1e-6))
    torch.testing.assert_close(ours.cpu(), ref, rtol=1e-5, atol=atol)


# (T, E, hidden): every T of 1, 3, 17, 70, E of 5, 64, 66 and hidden of 24, 100, 2048 (odd tails of T,
# E and hidden; T=70 spans several row tiles of the large-batch config), without the full product
SHAPES = [
    (1, 64, 2048),
    (1, 5, 100),
    (3, 66, 24),
    (3, 5, 2048),
    (17, 66, 100),
    (17, 64, 24),
    (70, 66, 2048),
    (70, 5, 100),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T, E, hidden", SHAPES)
def test_matches_reference(T, E, hidden, dtype):
    x, router = problem(T, E, hidden, dtype)
    assert_matches_reference(router_logits(x, router), x, router)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_column_slice_of_a_wider_tensor(dtype):
    """Rows strided by 300 (a column slice), unit stride along hidden."""
    wide = (torch.randn(9, 300, device=DEVICE) - 0.5).to(dtype)
    x = wide[:, 37 : 37 + 200]
    assert not x.is_contiguous() and x.stride(-1) == 1
    _, router = problem(1, 66, 200)
    assert_matches_reference(router_logits(x, router), x, router)


def test_token_alone_equals_token_in_batch():
    """Row j of a 70-token batch (large-batch tiles) = row j of its first 20 (mid tiles) = token j
    alone (T=1 tiles), bit for bit."""
    x, router = problem(70, 66, 300)
    batch, first20 = router_logits(x, router), router_logits(x[:20], router)
    for j in (0, 5, 16, 19, 33, 69):
        alone = router_logits(x[j : j + 1], router)[0]
        assert torch.equal(alone, batch[j]), f"token {j}: alone vs 70"
        if j < 20:
            assert torch.equal(first20[j], batch[j]), f"token {j}: 20 vs 70"


# (BLOCK_T, BLOCK_E, num_warps, num_stages): the decode, mid and large-batch picks and others
CONFIGS = [
    (1, 1, 4, 5),
    (2, 2, 4, 5),
    (8, 2, 4, 5),
    (16, 2, 8, 4),
    (16, 4, 8, 3),
    (4, 8, 4, 2),
    (32, 1, 4, 3),
]


def test_every_config_gives_the_same_bits():
    """The tile, warps and pipelining never change a logit: each is a fixed-order sum of its own."""
    x, router = problem(19, 10, 600, torch.float16)  # tails in T, E and hidden for every tile
    first = router_logits(x, router)
    for config in CONFIGS:
        assert torch.equal(router_logits(x, router, config=config), first), config


def test_configs_are_in_bounds():
    for T in (1, 2, 3, 8, 9, 32, 33, 256, 8192):
        for E in (64, 160, 256):
            block_t, block_e, num_warps, _ = _config(T, E)
            assert block_t & (block_t - 1) == 0 and block_e & (block_e - 1) == 0
            assert block_t * block_e * 256 <= 64 * 32 * num_warps  # <= 64 accumulators a thread


def test_empty_batch():
    x, router = problem(0, 64, 128)
    out = router_logits(x, router)
    assert out.shape == (0, 64) and out.dtype == torch.float32


def test_ops_on_cpu_is_the_reference():
    x, router = problem(4, 6, 40, torch.float16, device="cpu")
    assert torch.equal(ops.router_logits(x, router), reference.router_logits(x, router))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [V2_LITE, V3], ids=["v2-lite", "v3"])
def test_bf16_model_shapes(shape):
    """bf16 hidden states at the models' router shapes: the reference's logits, and each token's bits
    the same alone, in a 64-token batch and in a 300-token batch."""
    x, router = problem(300, **shape, dtype=torch.bfloat16)
    results = {T: router_logits(x[:T], router) for T in (1, 64, 300)}
    for T, out in results.items():
        assert_matches_reference(out, x[:T], router)
    for j in (0, 1, 31, 63):
        alone = router_logits(x[j : j + 1], router)[0]
        assert torch.equal(alone, results[64][j]), f"token {j}: alone vs 64"
        assert torch.equal(alone, results[300][j]), f"token {j}: alone vs 300"
    for j in (64, 200, 299):
        assert torch.equal(router_logits(x[j : j + 1], router)[0], results[300][j]), f"token {j}"


@pytest.mark.gpu
def test_bf16_every_config_gives_the_same_bits():
    x, router = problem(300, **V3, dtype=torch.bfloat16)
    first = router_logits(x, router)
    for config in CONFIGS:
        assert torch.equal(router_logits(x, router, config=config), first), config
