"""Rope tables: YaRN inverse frequencies as llama.cpp and HF compute them for deepseek2, and cos/sin."""

from __future__ import annotations

import math

import torch


def _correction_dim(num_rotations: float, dim: int, base: float, original_context: int) -> float:
    return (dim * math.log(original_context / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_inv_freq(
    dim: int,
    base: float,
    factor: float,
    original_context: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> torch.Tensor:
    """(dim/2,) fp32 inverse frequencies. factor <= 1 gives plain rope.

    YaRN keeps high frequencies (many rotations over the original context) as they are, divides low
    ones by `factor`, and blends linearly in between; the blend range comes from beta_fast/beta_slow
    rotations, floored/ceiled as both llama.cpp (ggml_rope_yarn_corr_dims) and HF do.
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    extrapolated = 1.0 / (base**exponents)
    if factor <= 1.0:
        return extrapolated
    interpolated = extrapolated / factor
    low = max(math.floor(_correction_dim(beta_fast, dim, base, original_context)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, base, original_context)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_extrapolated = 1 - ramp
    return interpolated * (1 - keep_extrapolated) + extrapolated * keep_extrapolated


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (T,) -> cos, sin (T, dim/2) fp32."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return torch.cos(angles), torch.sin(angles)

