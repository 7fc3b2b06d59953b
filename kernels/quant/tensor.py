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

from dataclasses import dataclass, field

import torch


@dataclass
class QuantTensor:
    data: torch.Tensor  # uint8 (*lead, rows, row_bytes)
    qtype: int  # ggml type code
    shape: tuple[int, ...]  # logical (*lead, rows, cols)
    # split-K launches count the chunks that arrived per output tile here (kernels/quant/split_k.py)
    _counters: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def arrival_counters(self, n: int) -> torch.Tensor:
        """At least n int32 zeros on the weight's device, kept with it: each split-K launch over this
        weight counts its chunks in them and leaves them zero. Made (or grown) by the first launch that
        needs them: in a CUDA-graph flow that is a warm-up run, never the capture."""
        if self._counters is None or self._counters.numel() < n:
            self._counters = torch.zeros(n, dtype=torch.int32, device=self.device)
        return self._counters

    def __getitem__(self, index) -> QuantTensor:
        """Index or slice the leading dimensions (an expert, a range of experts); rows stay whole."""
        data = self.data[index]
        lead = len(self.shape) - 2
        return QuantTensor(data, self.qtype, tuple(data.shape[: data.dim() - 2]) + self.shape[lead:])
