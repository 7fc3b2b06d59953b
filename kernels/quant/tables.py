"""Lookup tables of the IQ types, built from gguf's own quants.py (never typed by hand).

Each table-reading type gets one flat int16 tensor; its Triton decoder knows the layout:
- IQ4_NL, IQ4_XS: the 16 non-linear values (kvalues_iq4nl).
- MXFP4, NVFP4: the 16 e2m1 values, doubled (kvalues_mxfp4).
- IQ2_XXS, IQ2_XS, IQ3_XXS: the grid (G rows of W values, row-major), then the 128 `ksigns` bytes at
  offset G*W (7 sign bits -> 8 signs with even parity).
- IQ2_S, IQ3_S: the grid alone (their signs are stored bit by bit in the block).
- IQ1_S, IQ1_M: the 2048 x 8 grid of -1 / 0 / 1.
Every other type gets a one-element dummy, so a shared kernel passes a table whatever the type.
The tables are constants: memoized per (type, device) so a launch does not copy them again.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from mlapipe.kernels.quant.types import REPACKED_TYPES

# type -> (gguf class that holds the grid, whether its ksigns follow the grid)
_GRIDS = {
    Q.IQ2_XXS: ("IQ2_XXS", True),
    Q.IQ2_XS: ("IQ2_XS", True),
    Q.IQ2_S: ("IQ2_S", False),
    Q.IQ3_XXS: ("IQ3_XXS", True),
    Q.IQ3_S: ("IQ3_S", False),
    Q.IQ1_S: ("IQ1_S", False),
    Q.IQ1_M: ("IQ1_M", False),
}
_KVALUES = (Q.IQ4_NL, Q.IQ4_XS)


@functools.cache
def grid(qtype: int) -> np.ndarray:
    """The type's grid as gguf builds it: float32 (G, W) with small integer values."""
    cls = getattr(gguf_quants, _GRIDS[Q(qtype)][0])
    cls.init_grid()
    return np.ascontiguousarray(cls.grid.reshape(cls.grid_shape), dtype=np.float32)


@functools.cache
def ksigns() -> np.ndarray:
    """uint8 (128,): gguf's ksigns_iq2xs, shared by IQ2_XXS, IQ2_XS and IQ3_XXS."""
    return np.frombuffer(gguf_quants.IQ2_XXS.ksigns, dtype=np.uint8).copy()


@functools.cache
def kvalues() -> np.ndarray:
    """int8 (16,): gguf's kvalues_iq4nl, the non-linear 4-bit values of IQ4_NL and IQ4_XS."""
    return np.array(gguf_quants.IQ4_NL.kvalues, dtype=np.int8)


@functools.cache
def kvalues_mxfp4() -> np.ndarray:
    """int8 (16,): gguf's MXFP4 values (e2m1, doubled), shared by MXFP4 and NVFP4."""
    return np.array(gguf_quants.MXFP4.kvalues, dtype=np.int8)


def host_table(qtype: int) -> torch.Tensor:
    """The flat int16 table of `qtype` (layouts in the module docstring), on the CPU."""
    if int(qtype) in REPACKED_TYPES:  # the loader's repacked layouts read no table
        return torch.zeros(1, dtype=torch.int16)
    qtype = Q(int(qtype))
    if qtype in _KVALUES:
        parts = [kvalues()]
    elif qtype in (Q.MXFP4, Q.NVFP4):
        parts = [kvalues_mxfp4()]
    elif qtype in _GRIDS:
        parts = [grid(qtype).reshape(-1)]
        if _GRIDS[qtype][1]:
            parts.append(ksigns())
    else:
        parts = [np.zeros(1)]
    return torch.from_numpy(np.concatenate([p.astype(np.int16) for p in parts]))


@functools.lru_cache(maxsize=64)
def _device_table(qtype: int, device: str) -> torch.Tensor:
    return host_table(qtype).to(device)


def release_device_tables() -> None:
    """Drops the device copies, so a closed engine leaves nothing on the device (Engine.close())."""
    _device_table.cache_clear()


def device_table(qtype: int, device: torch.device | str) -> torch.Tensor:
    """The table a Triton decoder of `qtype` reads, on `device` (made once per device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _device_table(int(qtype), str(device))
