"""QuantTensor: a weight kept in the GGUF block bytes the file holds, on its device.

The contract every quantized kernel, the loader and the layers share:
- `data` is uint8 of shape (*lead, rows, row_bytes): row r of the logical matrix is the concatenation
  of its blocks as the file stores them (llama.cpp rows are contiguous runs of blocks along the last,
  "K", dimension), so a torch-order weight (*lead, rows, cols) has row_bytes = cols / block_elems *
  block_bytes. Expert stacks keep their leading expert dimension.
- `qtype` is the ggml type code (gguf.GGMLQuantizationType value), a plain int so the object pickles
  and crosses Ray without gguf.
- `shape` is the logical torch-order shape (*lead, rows, cols) of the decoded values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantTensor:
    data: torch.Tensor  # uint8 (*lead, rows, row_bytes)
    qtype: int  # ggml type code
    shape: tuple[int, ...]  # logical (*lead, rows, cols)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def __getitem__(self, index) -> QuantTensor:
        """Index or slice the leading dimensions (an expert, a range of experts); rows stay whole."""
        data = self.data[index]
        lead = len(self.shape) - 2
        return QuantTensor(data, self.qtype, tuple(data.shape[: data.dim() - 2]) + self.shape[lead:])
