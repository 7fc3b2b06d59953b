"""Mutual TLS for the gRPC activation links (`--transport-tls CERT,KEY,CA[,SERVER_NAME]`).

Every stage serves with CERT/KEY and accepts only clients whose certificate CA signed; every stage
connects presenting CERT/KEY and accepts only a server certificate CA signed, issued for the address it
dials (an IP SAN: 127.0.0.1 on one node, the node's address on a cluster) or for SERVER_NAME when given
(one certificate for every node, e.g. DNS:mlapipe-stage). The paths are read by each stage on its own
node, so a cluster mounts them at the same path everywhere (deploy/README.md). The link secret's tag
is still checked on top (transport/auth.py): TLS says "a machine of this cluster", the tag says "a
stage of this engine".
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


class TlsConfigError(ValueError):
    """--transport-tls is malformed or a file it names cannot be read."""


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    ca: str
    server_name: str | None = None

    @classmethod
    def parse(cls, text: str) -> TlsFiles:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) not in (3, 4) or not all(parts):
            raise TlsConfigError(f"--transport-tls takes CERT,KEY,CA[,SERVER_NAME], got {text!r}")
        return cls(*parts)

    def _read(self, what: str, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise TlsConfigError(f"--transport-tls: cannot read the {what} {path}: {e.strerror}") from None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self._read("key", self.key), self._read("certificate", self.cert))],
            root_certificates=self._read("CA", self.ca),
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._read("CA", self.ca),
            private_key=self._read("key", self.key),
            certificate_chain=self._read("certificate", self.cert),
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
