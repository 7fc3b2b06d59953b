"""Valid random blocks of any type, made on the device, whose decoded values have a chosen scale.

For benchmarks and random-weight models (`--wtype`): a 671B shape never exists on the host, and its
weights should look like today's random bf16 ones (zero mean, std 1/sqrt(fan_in)).
Recipe per type: every byte uniformly random (all quant, index, sign and sub-scale patterns occur),
then the scale fields overwritten (`write_scales`). The values are linear in the block's "d" and "dmin"
(v = d*A + dmin*B per value), so the pair that gives zero mean and unit std is found once per type by
decoding a fixed calibration sample with the torch reference; a tensor's blocks get
d = std * d_unit * u with u uniform in [0.5, 1.5) per block (real files vary their scales too), and a
random sign where the type has no dmin.
Seeded per tensor name (crc32), like workers/model_runner.py's random_shard_weights.
"""

from __future__ import annotations

import functools
import math
import zlib

import torch

from mlapipe.kernels.quant import reference
from mlapipe.kernels.quant.tensor import QuantTensor
from mlapipe.kernels.quant.types import quant_type

CALIBRATION_BLOCKS = 4096
PLAIN_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def write_scales(
    blocks: torch.Tensor,
    qtype: int,
    d: torch.Tensor,
    dmin: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
):
    """Overwrite the scales of uint8 blocks (n, block_bytes) in place with d (and dmin), (n,):
    - the fp16 fields of the table row (d, then dmin / m);
    - IQ1_M: the fp16 d spread over the top nibbles of its four scale words (bytes 49, 51, 53, 55);
    - MXFP4 (its e8m0 byte: powers of two) and NVFP4 (its four ue4m3 bytes, all alike): |d| rounded to
      one of the two nearest representable scales, at random with the odds that keep E[d^2] (so the
      std holds); without a generator, to the one nearer in d^2."""
    row = quant_type(qtype)
    n = blocks.shape[0]
    if row.name == "IQ1_M":
        bits = d.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
        for word in range(4):
            nibble = ((bits >> (4 * word)) & 0xF).to(torch.uint8)
            byte = 49 + 2 * word
            blocks[:, byte] = (blocks[:, byte] & 0x0F) | (nibble << 4)
        return
    if row.name in ("MXFP4", "NVFP4"):
        byte = _round_to_scale_bytes(qtype, d.abs().float(), generator)
        blocks[:, : 1 if row.name == "MXFP4" else 4] = byte.reshape(n, 1)
        return
    values = [d] if dmin is None else [d, dmin]
    assert len(values) <= len(row.fp16_fields), f"{row.name} has {len(row.fp16_fields)} fp16 scale fields"
    for offset, value in zip(row.fp16_fields, values):
        blocks[:, offset : offset + 2] = value.to(torch.float16).reshape(n, 1).view(torch.uint8)


def _round_to_scale_bytes(qtype: int, d: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """uint8 scale bytes of MXFP4 / NVFP4 for the values d >= 0 (stochastic rounding, see write_scales)."""
    codes = torch.arange(0, 255 if quant_type(qtype).name == "MXFP4" else 0x7F, device=d.device)
    if quant_type(qtype).name == "MXFP4":
        grid = (
            torch.where(codes < 2, 0x00200000 << codes, (codes - 1) << 23).to(torch.int32).view(torch.float32)
        )
    else:
        codes = codes[1:]  # 0 and 0x7F decode to 0
        grid = reference.ue4m3_half(codes)
    index = (torch.searchsorted(grid, d.contiguous(), right=True) - 1).clamp(0, grid.numel() - 2)
    low, high = grid[index], grid[index + 1]
    p_high = ((d * d - low * low) / (high * high - low * low)).clamp(0, 1)
    draw = 0.5 if generator is None else torch.rand(d.shape, generator=generator, device=d.device)
    return codes[index + (draw < p_high).long()].to(torch.uint8)


def _uniform_bytes(n: int, block_bytes: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randint(0, 256, (n, block_bytes), dtype=torch.uint8, generator=generator, device=device)


@functools.cache
def unit_scales(qtype: int) -> tuple[float, float]:
    """(d, dmin) for uniformly random bytes to decode to mean 0, std 1 (dmin 0 for types without one)."""
    row = quant_type(qtype)
    if row.block_elems == 1:
        return 1.0, 0.0  # plain floats are written as values, not scaled blocks
    generator = torch.Generator().manual_seed(int(qtype))
    blocks = _uniform_bytes(CALIBRATION_BLOCKS, row.block_bytes, generator, "cpu")
    ones, zeros = torch.ones(CALIBRATION_BLOCKS), torch.zeros(CALIBRATION_BLOCKS)
    has_min = len(row.fp16_fields) == 2

    def decode(d, dmin):
        b = blocks.clone()
        write_scales(b, qtype, d, dmin if has_min else None)
        return row.reference(b).double()

    a = decode(ones, zeros)  # the d part of every value
    dmin = 0.0
    if has_min:
        b = decode(zeros, ones)
        dmin = -a.mean().item() / b.mean().item()
    # the root mean square, not the std: a random sign per block turns a block's mean into spread too
    rms = decode(ones, torch.full_like(ones, dmin)).pow(2).mean().sqrt().item()
    return 1.0 / rms, dmin / rms


def random_quant_tensor(
    shape: tuple[int, ...], qtype: int, std: float, name: str, seed: int = 0, device="cpu"
) -> QuantTensor:
    """A QuantTensor of torch-order `shape` (*lead, rows, cols) whose values have mean ~0 and the given
    std, deterministic in (name, seed) on a given device type."""
    row = quant_type(qtype)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    cols = shape[-1]
    if cols % row.block_elems:
        raise ValueError(f"{name}: {row.name} rows hold multiples of {row.block_elems} values, not {cols}")
    if row.name in PLAIN_DTYPES:
        values = torch.empty(shape, device=device).normal_(0.0, std, generator=generator)
        data = values.to(PLAIN_DTYPES[row.name]).view(torch.uint8).reshape(*shape[:-1], -1)
        return QuantTensor(data.contiguous(), row.code, tuple(shape))
    n = math.prod(shape) // row.block_elems
    blocks = _uniform_bytes(n, row.block_bytes, generator, device)
    d_unit, dmin_unit = unit_scales(row.code)
    u = torch.empty(n, device=device).uniform_(0.5, 1.5, generator=generator)
    u = u / math.sqrt(13 / 12)  # E[u^2] = 13/12: keep the std as asked
    if len(row.fp16_fields) == 2:
        write_scales(blocks, row.code, u * (std * d_unit), u * (std * dmin_unit))
    else:
        # a random sign per block (gguf's Q4_0 quantizer makes negative d too) cancels the bias of
        # asymmetric ranges like Q4_0's -8..7 or IQ4_NL's values
        sign = torch.randint(0, 2, (n,), generator=generator, device=device, dtype=torch.int8) * 2 - 1
        write_scales(blocks, row.code, sign * u * (std * d_unit), generator=generator)
    data = blocks.reshape(*shape[:-1], cols // row.block_elems * row.block_bytes)
    return QuantTensor(data, row.code, tuple(shape))
