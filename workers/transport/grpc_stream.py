"""gRPC client streams of raw bytes between consecutive stages, for links without NCCL.

Each receiving stage serves one generic stream-unary method; the sender streams a small header
(key, dtype, shape) and then the tensor's bytes in ~1 MiB chunks. No protobuf schema: the messages
are bytes in and bytes out, with the message limits raised above the chunk size. A key names one step
of one micro-batch, so the receiver matches messages to steps whatever order they arrive in. The last
stage also opens a channel back to the first stage's server, for decode-round tokens.
"""

from __future__ import annotations

import json
import threading
from concurrent import futures

import grpc
import torch

CHUNK_BYTES = 1 << 20
METHOD = "/mlapipe.Activations/Send"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]
DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int64)}


class GrpcTransport:
    def __init__(self, device, timeout_s: float):
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self._arrived: dict[str, torch.Tensor] = {}
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None
        self._channels: list[grpc.Channel] = []
        self._send = None
        self._send_first = None
        self.bytes_sent = 0

    # receiving side -----------------------------------------------------------------------------
    def serve(self, host: str) -> str:
        """Starts this stage's server on a free port; returns host:port for the previous stage."""
        handler = grpc.method_handlers_generic_handler(
            "mlapipe.Activations", {"Send": grpc.stream_unary_rpc_method_handler(self._on_stream)}
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=CHANNEL_OPTIONS)
        self._server.add_generic_rpc_handlers((handler,))
        port = self._server.add_insecure_port(f"{host}:0")
        self._server.start()
        return f"{host}:{port}"

    def _on_stream(self, chunks, context) -> bytes:
        header = json.loads(next(chunks))
        data = bytearray()
        for chunk in chunks:
            data += chunk
        tensor = torch.frombuffer(data, dtype=DTYPES[header["dtype"]]).view(header["shape"])
        with self._cond:
            self._arrived[header["key"]] = tensor
            self._cond.notify_all()
        return b""

    def recv(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._arrived, timeout=self.timeout_s):
                raise TimeoutError(f"nothing arrived for micro-batch step {key} within {self.timeout_s:.0f} s")
            tensor = self._arrived.pop(key)
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(
                f"micro-batch step {key}: got {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {tuple(shape)} {dtype}"
            )
        return tensor.to(self.device)

    def recv_back(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.recv(f"back:{key}", shape, dtype)

    # sending side -------------------------------------------------------------------------------
    def _open(self, address: str):
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        grpc.channel_ready_future(channel).result(timeout=self.timeout_s)
        self._channels.append(channel)
        return channel.stream_unary(METHOD)

    def connect(self, address: str) -> None:
        """The next stage's server: activations go there."""
        self._send = self._open(address)

    def connect_back(self, address: str) -> None:
        """The first stage's server: the last stage's decode-round tokens go there."""
        self._send_first = self._open(address)

    def send(self, key: str, tensor: torch.Tensor) -> None:
        self._stream(self._send, key, tensor)

    def send_back(self, key: str, tokens: torch.Tensor) -> None:
        self._stream(self._send_first, f"back:{key}", tokens)

    def _stream(self, method, key: str, tensor: torch.Tensor) -> None:
        payload = tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
        header = json.dumps({"key": key, "dtype": str(tensor.dtype), "shape": list(tensor.shape)})

        def messages():
            yield header.encode()
            for start in range(0, len(payload), CHUNK_BYTES):
                yield payload[start : start + CHUNK_BYTES]

        method(messages(), timeout=self.timeout_s)
        self.bytes_sent += len(payload)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        if self._server is not None:
            self._server.stop(grace=None)
