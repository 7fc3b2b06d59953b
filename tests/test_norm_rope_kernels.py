"""Triton RMSNorm and pairwise rope against their torch references, on random data of odd shapes and
strided inputs (the column slices the model passes). Without a GPU they run in the interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

from kernels import fused_norm_rope, norm_rope, reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def close(ours, ref, dtype):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype and ours.is_contiguous()
    scale = ref.float().abs().max().clamp_min(1e-6)
    assert float((ours.float() - ref.float()).abs().max() / scale) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (5, 512), (3, 4, 100), (9, 2048)])
def test_rms_norm_matches_reference(shape, dtype):
    x = (torch.randn(shape, device=DEVICE) * 3 + 0.5).to(dtype)
    weight = torch.rand(shape[-1], device=DEVICE) + 0.5  # fp32, as the model keeps 1-D weights
    close(fused_norm_rope.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_a_column_slice(dtype):
    """The kv norm reads latent[:, :C] out of a (T, C + R) projection: rows strided by C + R."""
    latent = torch.randn(6, 40 + 8, device=DEVICE).to(dtype)
    weight = torch.rand(40, device=DEVICE) + 0.5
    x = latent[:, :40]
    assert not x.is_contiguous()
    close(fused_norm_rope.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), dtype)


def tables(T: int, half: int):
    positions = torch.randint(0, 5000, (T,), device=DEVICE)
    inv_freq = norm_rope.yarn_inv_freq(2 * half, 10000.0, 40.0, 4096).to(DEVICE)
    return norm_rope.rope_cos_sin(positions, inv_freq)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, heads, R", [(1, 1, 64), (5, 16, 64), (3, 20, 8), (4, 3, 6)])
def test_rope_matches_reference(T, heads, R, dtype):
    x = torch.randn(T, heads, R, device=DEVICE).to(dtype)
    cos, sin = tables(T, R // 2)
    close(fused_norm_rope.apply_rope_pairs(x, cos, sin), reference.apply_rope_pairs(x, cos, sin), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_of_the_models_slices(dtype):
    """q[..., N:] of a (T, H, N + R) query, and latent[:, None, C:] of a (T, C + R) projection."""
    T, H, N, R, C = 7, 5, 24, 16, 40
    cos, sin = tables(T, R // 2)
    q = torch.randn(T, H, N + R, device=DEVICE).to(dtype)
    close(
        fused_norm_rope.apply_rope_pairs(q[..., N:], cos, sin),
        reference.apply_rope_pairs(q[..., N:], cos, sin),
        dtype,
    )
    latent = torch.randn(T, C + R, device=DEVICE).to(dtype)
    k = latent[:, None, C:]
    close(fused_norm_rope.apply_rope_pairs(k, cos, sin), reference.apply_rope_pairs(k, cos, sin), dtype)
