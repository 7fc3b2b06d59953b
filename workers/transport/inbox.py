"""Which activation messages a stage accepts now, and the ones that came until the stage takes them.

The driver tells each stage, when it submits micro-batches, which keys (one per step of each
micro-batch) will arrive and their exact dtype and shape (`expect`). A stream is admitted only for an
expected key not yet filled, with exactly that header; its buffer is then allocated at exactly that
size, and the bytes are counted into it as they come. Anything else is dropped with a log line and a
count by reason, before any buffer exists. A key not taken by its deadline (its micro-batch was
abandoned) is forgotten and its buffer freed, so nothing a peer sends can pin memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch

log = logging.getLogger("mlapipe.transport")

# Why a stream was dropped (the labels of the stage_transport_rejected metric).
UNAUTHENTICATED = "unauthenticated"
UNKNOWN_KEY = "unknown_key"
BAD_HEADER = "bad_header"  # dtype or shape other than the micro-batch's
OVERSIZE = "oversize"  # more bytes than the header's shape
TRUNCATED = "truncated"  # fewer bytes than the header's shape
DUPLICATE = "duplicate"
EXPIRED = "expired"  # expected, never taken before the deadline


@dataclass
class _Slot:
    shape: tuple[int, ...]
    dtype: torch.dtype
    deadline: float
    tensor: torch.Tensor | None = None


class Inbox:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._slots: dict[str, _Slot] = {}
        self._cond = threading.Condition()
        self.rejected: Counter[str] = Counter()

    def expect(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        with self._cond:
            self._sweep()
            if key not in self._slots:
                self._slots[key] = _Slot(tuple(shape), dtype, time.monotonic() + self.timeout_s)

    def admit(self, key: str, dtype: str, shape: tuple[int, ...]) -> tuple[str | None, int]:
        """Whether a stream with this header may fill its key: (None, bytes to read) or (reason, 0)."""
        with self._cond:
            self._sweep()
            slot = self._slots.get(key)
            if slot is None:
                return self.reject(UNKNOWN_KEY, key, "no micro-batch step expects it now"), 0
            if slot.tensor is not None:
                return self.reject(DUPLICATE, key, "already arrived"), 0
            if str(slot.dtype) != dtype or slot.shape != tuple(shape):
                return self.reject(
                    BAD_HEADER, key, f"header says {dtype} {tuple(shape)}, expected {slot.dtype} {slot.shape}"
                ), 0
            return None, _nbytes(slot.shape, slot.dtype)

    def deliver(self, key: str, data: torch.Tensor) -> None:
        """A stream's bytes (uint8, exactly the admitted size) for its key."""
        with self._cond:
            slot = self._slots.get(key)
            if slot is None or slot.tensor is not None:  # expired or filled while the bytes came
                self.reject(DUPLICATE if slot else EXPIRED, key, "arrived too late")
                return
            slot.tensor = data.view(slot.dtype).view(slot.shape)
            self._cond.notify_all()

    def take(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Waits for the key's tensor (expecting it if the driver has not said so yet)."""
        self.expect(key, shape, dtype)
        with self._cond:
            slot = self._slots[key]
            if slot.shape != tuple(shape) or slot.dtype != dtype:
                raise RuntimeError(f"micro-batch step {key}: expected both {slot.shape} and {tuple(shape)}")
            slot.deadline = float("inf")  # being waited for: this wait's own timeout applies
            if not self._cond.wait_for(lambda: slot.tensor is not None, timeout=self.timeout_s):
                self._slots.pop(key, None)
                raise TimeoutError(f"nothing arrived for micro-batch step {key} within {self.timeout_s:.0f} s")
            del self._slots[key]
            return slot.tensor

    def reject(self, reason: str, key: str, detail: str) -> str:
        with self._cond:  # re-entrant: admit() and the sweep call this holding it
            self.rejected[reason] += 1
        log.warning("activation stream %r dropped (%s): %s", key[:64], reason, detail[:200])
        return reason

    def sweep(self) -> None:
        with self._cond:
            self._sweep()

    def _sweep(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self._slots.items() if s.deadline < now]:
            if self._slots.pop(key).tensor is not None:
                self.reject(EXPIRED, key, "never taken; its buffer is freed")

    @property
    def buffered_bytes(self) -> int:
        with self._cond:
            return sum(_nbytes(s.shape, s.dtype) for s in self._slots.values() if s.tensor is not None)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for d in shape:
        count *= d
    return count * torch.empty((), dtype=dtype).element_size()
