"""The engine's link secret: who may put activations into a stage, and where stages listen.

Each engine draws a random 32-byte secret when it builds its pipeline and hands it to its stages as a
Ray call argument (Ray's own authenticated control plane; never a command line, an environment
variable or a log line: `LinkSecret` prints as `LinkSecret(<redacted>)`).

- gRPC: every stream carries `HMAC-SHA256(secret, key | dtype | shape)` in its metadata, next to the
  header it signs. The receiver checks it in the server's dispatch thread, before a worker thread is
  taken or a byte of the stream is read. The tag is bound to its key, so a tag seen on the wire is
  good for that one micro-batch step, which has then already arrived (a replay is a duplicate). The
  payload itself is not hashed (tens of MiB per micro-batch); links that cross untrusted networks
  add mutual TLS (transport/tls.py), which authenticates and encrypts every byte.
- torch.distributed: the rendezvous goes through a Ray actor (transport/ray_store.py) instead of a
  TCPStore, so there is no rendezvous port at all; every store call carries the secret's tag too.

Stages bind their listeners to the address Ray uses for their node, or to loopback when every stage
runs on one node (`bind_address`), never to the wildcard.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

LOOPBACK = "127.0.0.1"


class LinkSecret:
    """32 random bytes that never print."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes | None = None):
        self._value = value if value is not None else secrets.token_bytes(32)

    def tag(self, *parts: str) -> str:
        message = "\x1f".join(parts).encode()
        return hmac.new(self._value, message, hashlib.sha256).hexdigest()

    def verify(self, tag: str | None, *parts: str) -> bool:
        return tag is not None and hmac.compare_digest(tag, self.tag(*parts))

    def __repr__(self) -> str:
        return "LinkSecret(<redacted>)"

    __str__ = __repr__

    def __reduce__(self):  # pickled only as a Ray call argument, to the engine's own stages
        return (LinkSecret, (self._value,))


def bind_address(node_ip: str, stage_node_ids: list[str]) -> str:
    """Where a stage listens: loopback when every stage shares one node (nothing off the node can
    connect), else the address Ray uses for the stage's node."""
    return LOOPBACK if len(set(stage_node_ids)) == 1 else node_ip


def interface_of(address: str) -> str | None:
    """The network interface holding `address` (gloo and NCCL take interface names, not addresses)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == address for a in addresses):
            return name
    return None
