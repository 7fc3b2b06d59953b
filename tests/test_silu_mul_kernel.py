"""The SiLU*up kernel (kernels/silu_mul.py) against the torch form, on random data of odd widths.
Without a GPU it runs in the interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

from mlapipe.kernels import reference, silu_mul  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 2, 7), (5, 2, 2, 1408), (3, 2, 1500), (9, 1, 2, 2048)])
def test_silu_mul_matches_torch(shape, dtype):
    x = (torch.randn(shape, device=DEVICE) * 4).to(dtype)
    ours, ref = silu_mul.silu_mul(x), reference.silu_mul(x)
    assert ours.shape == ref.shape == shape[:-2] + shape[-1:] and ours.dtype == dtype
    # the same two roundings as torch; exp and the division may differ in their last fp32 bits (a few
    # fp32 ulps), which rounding to a half type almost always hides: at most 4 ulps of the dtype
    # fp32 outputs show exp's error itself: a GPU's exp2.approx after the x * log2(e) rounding, ~6 ulps at |x| ~ 12
    ulps = 4 if dtype != torch.float32 or DEVICE == "cpu" else 64
    ulp = torch.finfo(dtype).eps * ref.float().abs().clamp_min(torch.finfo(dtype).tiny)
    assert bool(((ours.float() - ref.float()).abs() <= ulps * ulp + 1e-30).all())


def test_silu_mul_refuses_a_strided_input():
    x = torch.randn(4, 2, 2, 16, device=DEVICE)[:, :, :, :8]
    with pytest.raises(ValueError, match="contiguous"):
        silu_mul.silu_mul(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, num_partials", [((1, 2, 7), 1), ((3, 2, 1408), 8), ((2, 1, 2, 40), 3)])
def test_silu_mul_sums_a_split_linears_partials_first(shape, num_partials, dtype):
    """x as a quantized gate|up linear's fp32 partials (n, ..., 2, I): the bits of its chunk sum, then the
    kernel on the summed tensor."""
    partials = torch.randn((num_partials, *shape), device=DEVICE) * 3
    summed = reference.sum_partials(partials, dtype)
    ours = silu_mul.silu_mul(partials, partials_dtype=dtype)
    assert ours.dtype == dtype and ours.shape == shape[:-2] + shape[-1:]
    assert torch.equal(ours, silu_mul.silu_mul(summed))
    assert torch.equal(reference.silu_mul(partials, dtype), reference.silu_mul(summed))
    with pytest.raises(ValueError, match="partials"):
        silu_mul.silu_mul(partials.half(), partials_dtype=dtype)
