"""The torch.distributed rendezvous through a Ray actor instead of a TCPStore.

Why not a TCPStore: its server listens on every interface, has no authentication, and lets any client
list, read, overwrite and delete keys (`list_keys`, `set`, `delete_key`). The rendezvous keys are the
gloo pair addresses and the NCCL unique id, so a process that reaches the port could point a stage at
itself. A secret-derived key prefix does not help (`list_keys` shows it), and binding to the node's
address still leaves every process on the node able to connect.

This store has no port at all: the store lives in a small async actor that the pipeline creates and
kills with its stages, reachable only through Ray (which authenticates its own clients) and only by
holders of its handle, and every call also carries a tag of the engine's link secret
(transport/auth.py). Rendezvous traffic is a few dozen small calls per process group, so Ray's
per-call latency does not matter.
"""

from __future__ import annotations

import asyncio
import datetime

import torch.distributed as dist

from mlapipe.workers.transport.auth import LinkSecret

STORE_TAG = "rendezvous-store"


class RendezvousStoreActor:
    """A key-value store with torch's Store semantics (get and wait block until the keys are set)."""

    def __init__(self, secret: LinkSecret):
        self._tag = secret.tag(STORE_TAG)
        self._data: dict[str, bytes] = {}
        self._changed: asyncio.Condition | None = None  # made in the actor's event loop

    def _check(self, tag: str) -> asyncio.Condition:
        import hmac

        if not hmac.compare_digest(tag, self._tag):
            raise PermissionError("rendezvous store: call without the engine's link secret refused")
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def set(self, tag: str, key: str, value: bytes) -> None:
        changed = self._check(tag)
        async with changed:
            self._data[key] = value
            changed.notify_all()

    async def get(self, tag: str, key: str, timeout_s: float) -> bytes:
        await self.wait(tag, [key], timeout_s)
        return self._data[key]

    async def wait(self, tag: str, keys: list[str], timeout_s: float) -> None:
        changed = self._check(tag)
        async with changed:
            try:
                await asyncio.wait_for(
                    changed.wait_for(lambda: all(k in self._data for k in keys)), timeout_s
                )
            except asyncio.TimeoutError:
                missing = [k for k in keys if k not in self._data]
                raise TimeoutError(f"rendezvous: keys {missing} not set within {timeout_s:.0f} s") from None

    async def add(self, tag: str, key: str, amount: int) -> int:
        changed = self._check(tag)
        async with changed:
            value = int(self._data.get(key, b"0")) + amount
            self._data[key] = str(value).encode()
            changed.notify_all()
            return value

    async def compare_set(self, tag: str, key: str, expected: bytes, desired: bytes) -> bytes:
        changed = self._check(tag)
        async with changed:
            current = self._data.get(key)
            if (current is None and expected == b"") or current == expected:
                self._data[key] = desired
                changed.notify_all()
                return desired
            return expected if current is None else current

    async def check(self, tag: str, keys: list[str]) -> bool:
        self._check(tag)
        return all(k in self._data for k in keys)

    async def delete_key(self, tag: str, key: str) -> bool:
        self._check(tag)
        return self._data.pop(key, None) is not None

    async def num_keys(self, tag: str) -> int:
        self._check(tag)
        return len(self._data)


class RayStore(dist.Store):
    """torch.distributed.Store over a RendezvousStoreActor handle."""

    def __init__(self, actor, secret: LinkSecret, timeout_s: float):
        super().__init__()
        self._actor, self._secret, self._timeout_s = actor, secret, timeout_s
        self._tag = secret.tag(STORE_TAG)

    def _call(self, method: str, *args):
        import ray

        return ray.get(getattr(self._actor, method).remote(self._tag, *args))

    def set(self, key: str, value) -> None:
        self._call("set", key, value.encode() if isinstance(value, str) else bytes(value))

    def get(self, key: str) -> bytes:
        return self._call("get", key, self._timeout_s)

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        seconds = timeout.total_seconds() if timeout is not None else self._timeout_s
        self._call("wait", list(keys), seconds)

    def add(self, key: str, amount: int) -> int:
        return self._call("add", key, amount)

    def compare_set(self, key: str, expected, desired) -> bytes:
        return self._call("compare_set", key, bytes(expected), bytes(desired))

    def check(self, keys: list[str]) -> bool:
        return self._call("check", list(keys))

    def delete_key(self, key: str) -> bool:
        return self._call("delete_key", key)

    def num_keys(self) -> int:
        return self._call("num_keys")

    def clone(self) -> RayStore:
        return RayStore(self._actor, self._secret, self._timeout_s)
