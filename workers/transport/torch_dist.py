"""torch.distributed point-to-point between consecutive stages: NCCL on GPUs, gloo on CPU.

One process group spans the pipeline (rank = stage). The receiver knows the shape from the
micro-batch's control message, so it receives straight into a slice of a buffer allocated once.

Decode rounds send sampled tokens back from the last stage to the first over a second group: its own
NCCL communicator and stream, so tokens flowing back never queue behind activations flowing forward
(one stream for both directions would deadlock: stage 0 sending micro-batch B forward while stage 1
waits to send A's tokens back). Tokens go with isend and nobody waits on it: the first stage's
receive is what orders them.

Security: the rendezvous goes through a Ray actor (transport/ray_store.py), so there is no TCPStore
port; gloo's pair sockets and NCCL's bootstrap sockets listen on the interface of the stage's bind
address (loopback when the whole pipeline is on one node), set through GLOO_SOCKET_IFNAME and
NCCL_SOCKET_IFNAME unless the user set those. The receiver posts each receive with the exact size the
micro-batch implies, so a message of another size fails that receive and is never buffered whole.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from mlapipe.workers.transport.auth import interface_of

log = logging.getLogger("mlapipe.transport")


def bind_sockets_to(address: str) -> None:
    """gloo and NCCL take an interface, not an address: the one that holds `address`."""
    interface = interface_of(address)
    if interface is None:
        log.warning("no network interface holds %s; gloo/NCCL pick their own", address)
        return
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(variable, interface)


class TorchDistTransport:
    def __init__(
        self, backend: str, store: dist.Store, rank: int, world_size: int, timeout_s: float, device
    ):
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self._buffer: torch.Tensor | None = None
        self.bytes_sent = 0
        self._first, self._last = 0, world_size - 1
        self._back = dist.new_group([self._first, self._last]) if world_size > 1 else None
        self._sending: list = []  # (work, tensor) of token sends not yet known to be complete

    def send(self, key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        dist.send(tensor, dst=self.rank + 1)
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def recv(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        if self._buffer is None or self._buffer.numel() < numel or self._buffer.dtype != dtype:
            self._buffer = torch.empty(max(numel, 1 << 16), dtype=dtype, device=self.device)
        view = self._buffer[:numel].view(shape)
        dist.recv(view, src=self.rank - 1)
        return view

    def send_back(self, key: str, tokens: torch.Tensor) -> None:
        """Last stage: this step's tokens to the first stage. Returns at once; the tensor must not be
        written again (the caller keeps it)."""
        self._sending = [(w, t) for w, t in self._sending if not w.is_completed()]
        self._sending.append((dist.isend(tokens, dst=self._first, group=self._back), tokens))
        self.bytes_sent += tokens.numel() * tokens.element_size()

    def recv_back(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tokens = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(tokens, src=self._last, group=self._back)
        return tokens

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
