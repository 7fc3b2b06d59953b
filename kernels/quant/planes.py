"""Q8_0 planes: the loader's lossless repacking of Q8_0 weights for the GPU GEMMs.

A Q8_0 block is fp16 d | int8 qs[32], 34 bytes, so in the file's layout every run of quants starts at
an odd offset (2 mod 34) and the decoder loads it a byte at a time, then converts each int8 with a
quarter-rate I2F: ~12 instructions per weight in the GEMM loop, which made the decode GEMVs issue-bound
at 9-33% of the copy bandwidth (kernels/NOTES-quant.md, v4). Planes hold the same bytes regrouped, 16
rows at a time, each group one contiguous run of 16 * row_bytes bytes:

    [16 rows x K int8 quants, row after row][K/32 blocks x 16 rows x fp16 d]

so a row's quants are one 16-byte-aligned run (wide loads) and the 16 rows' scales of a block sit side
by side. The tensor keeps its shape (*lead, rows, row_bytes) and its bytes per row, so slicing whole
groups (an expert of a stack, a range of 128 rows) stays a valid planes tensor; its type code is
types.Q8_0_PLANES. In both planes a value's offset grows by one byte per value along K, so the GEMMs move
their row pointer by 32 bytes per block (QuantType.step_bytes) and the decoder adds the same offsets
to both planes. `pack` and `unpack` are exact inverses, so decoding stays bit-identical with gguf.
"""

from __future__ import annotations

import os

import torch
from gguf import GGMLQuantizationType

from mlapipe.kernels.quant.tensor import QuantTensor
from mlapipe.kernels.quant.types import Q8_0_PLANES

GROUP_ROWS = 16
Q8_0 = int(GGMLQuantizationType.Q8_0)
LAYOUT_ENV = "MLAPIPE_QUANT_LAYOUT"  # "file" keeps the file's blocks on the GPU (benches: file vs planes)
PACK_CHUNK_BYTES = 64 << 20  # groups repacked at a time: the transient memory of packing in place


def packable(w) -> bool:
    """Whether w is a Q8_0 QuantTensor whose rows come in whole groups of 16."""
    return (
        isinstance(w, QuantTensor)
        and w.qtype == Q8_0
        and len(w.shape) >= 2
        and w.shape[-2] % GROUP_ROWS == 0
        and w.data.is_contiguous()
    )


def for_gemm(w):
    """What the loader keeps on the device for a GEMM weight: Q8_0 on a GPU as planes (repacked in place,
    so `w`'s bytes are consumed), anything else as it is."""
    if not packable(w) or w.device.type != "cuda" or os.environ.get(LAYOUT_ENV, "planes") == "file":
        return w
    return pack_in_place(w)


def _pack_groups(groups: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """(G, 16 * row_bytes) Q8_0 rows -> the same bytes as planes."""
    G, blocks = groups.shape[0], row_bytes // 34
    cells = groups.view(G, GROUP_ROWS, blocks, 34)
    quants = cells[..., 2:].reshape(G, GROUP_ROWS * blocks * 32)
    scales = cells[..., :2].permute(0, 2, 1, 3).reshape(G, blocks * GROUP_ROWS * 2)
    return torch.cat((quants, scales), dim=1)


def _unpack_groups(groups: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """(G, 16 * row_bytes) planes -> the Q8_0 rows they came from."""
    G, blocks = groups.shape[0], row_bytes // 34
    cols = blocks * 32
    quants = groups[:, : GROUP_ROWS * cols].reshape(G, GROUP_ROWS, blocks, 32)
    scales = groups[:, GROUP_ROWS * cols :].reshape(G, blocks, GROUP_ROWS, 2).permute(0, 2, 1, 3)
    return torch.cat((scales, quants), dim=-1).reshape(G, GROUP_ROWS * row_bytes)


def _groups(data: torch.Tensor, what: str) -> torch.Tensor:
    rows, row_bytes = data.shape[-2], data.shape[-1]
    assert data.dtype == torch.uint8 and data.is_contiguous(), f"{what}: contiguous uint8 blocks"
    assert rows % GROUP_ROWS == 0 and row_bytes % 34 == 0, (
        f"{what}: Q8_0 planes need rows in groups of {GROUP_ROWS} and whole blocks, got {list(data.shape)}"
    )
    return data.view(-1, GROUP_ROWS * row_bytes)


def pack_in_place(w: QuantTensor) -> QuantTensor:
    """w's Q8_0 bytes rewritten as planes in their own storage, a chunk of groups at a time (each group
    keeps its byte range), so packing needs no second copy of the tensor."""
    assert packable(w), f"Q8_0 planes: not a packable Q8_0 tensor (type {w.qtype}, shape {list(w.shape)})"
    row_bytes = w.data.shape[-1]
    groups = _groups(w.data, "pack")
    step = max(1, PACK_CHUNK_BYTES // groups.shape[1])
    for first in range(0, groups.shape[0], step):
        chunk = groups[first : first + step]
        chunk.copy_(_pack_groups(chunk, row_bytes))
    return QuantTensor(w.data, Q8_0_PLANES, w.shape)


def pack(w: QuantTensor) -> QuantTensor:
    """A planes copy of a Q8_0 QuantTensor (w unchanged)."""
    copy = QuantTensor(w.data.clone(), w.qtype, w.shape)
    return pack_in_place(copy)


def unpack_rows(data: torch.Tensor) -> torch.Tensor:
    """Planes bytes (..., rows, row_bytes) -> a new tensor of the Q8_0 blocks they hold, same shape."""
    row_bytes = data.shape[-1]
    return _unpack_groups(_groups(data, "unpack"), row_bytes).view(data.shape)


def unpack(w: QuantTensor) -> QuantTensor:
    assert w.qtype == Q8_0_PLANES, f"unpack: not Q8_0 planes (type {w.qtype})"
    return QuantTensor(unpack_rows(w.data), Q8_0, w.shape)
