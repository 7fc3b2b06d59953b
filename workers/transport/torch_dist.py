"""torch.distributed point-to-point between consecutive stages: NCCL on GPUs, gloo on CPU.

One process group spans the pipeline (rank = stage). The receiver knows the shape from the
micro-batch's control message, so it receives straight into a slice of a buffer allocated once.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist


def free_tcp_port(host: str = "") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TorchDistTransport:
    def __init__(self, backend: str, master: str, rank: int, world_size: int, timeout_s: float, device):
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self._buffer: torch.Tensor | None = None
        self.bytes_sent = 0

    def send(self, batch_id: int, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        dist.send(tensor, dst=self.rank + 1)
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def recv(self, batch_id: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        if self._buffer is None or self._buffer.numel() < numel or self._buffer.dtype != dtype:
            self._buffer = torch.empty(max(numel, 1 << 16), dtype=dtype, device=self.device)
        view = self._buffer[:numel].view(shape)
        dist.recv(view, src=self.rank - 1)
        return view

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
