"""gRPC client streams of raw bytes between consecutive stages, for links without NCCL.

Each receiving stage serves one generic stream-unary method; the sender puts the stream's header (key,
dtype, shape) and its HMAC tag (transport/auth.py) in the call's metadata and streams the tensor's
bytes in ~1 MiB messages. No protobuf schema: bytes in, bytes out. A key names one step of one
micro-batch, so the receiver matches streams to steps whatever order they arrive in. The last stage
also opens a channel back to the first stage's server, for decode-round tokens.

The receiver decides in the server's dispatch thread, from the metadata alone, before a worker
thread is taken or a byte is read: no valid tag, refused (UNAUTHENTICATED); a key the stage does not
expect now, a header other than the micro-batch's, or a key already filled, dropped
(transport/inbox.py). An admitted stream is read into a buffer of exactly its expected size; one
byte more, and it is dropped. Messages over 2 MiB are refused by gRPC itself. So a peer without the
secret cannot buffer anything, and an idle connection holds no thread.

The driver's `expect` for a micro-batch can reach this stage a moment after the previous stage's
stream (two actors, two Ray calls); the sender retries a stream refused as not expected yet
(FAILED_PRECONDITION) until its deadline.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import numpy as np
import torch

from mlapipe.workers.transport import inbox as reasons
from mlapipe.workers.transport.auth import LinkSecret
from mlapipe.workers.transport.inbox import Inbox
from mlapipe.workers.transport.tls import TlsFiles

CHUNK_BYTES = 1 << 20
SERVICE, METHOD_NAME = "mlapipe.Activations", "Send"
METHOD = f"/{SERVICE}/{METHOD_NAME}"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 2 * CHUNK_BYTES),
    ("grpc.max_receive_message_length", 2 * CHUNK_BYTES),
]
SERVER_THREADS = 16  # streams being read at once; refusals and idle connections take none
MAX_CONCURRENT_STREAMS = 64  # beyond this, gRPC answers RESOURCE_EXHAUSTED without a thread
DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int64)}
KEY_HEADER, TENSOR_HEADER, TAG_HEADER = "x-mlapipe-key", "x-mlapipe-tensor", "x-mlapipe-tag"
REFUSAL_CODES = {
    reasons.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    reasons.UNKNOWN_KEY: grpc.StatusCode.FAILED_PRECONDITION,
    reasons.BAD_HEADER: grpc.StatusCode.INVALID_ARGUMENT,
    reasons.DUPLICATE: grpc.StatusCode.ALREADY_EXISTS,
}


def tensor_header(dtype: str, shape) -> str:
    return f"{dtype}:{','.join(str(int(d)) for d in shape)}"


def parse_tensor_header(text: str) -> tuple[str, tuple[int, ...]]:
    dtype, _, dims = text.partition(":")
    return dtype, tuple(int(d) for d in dims.split(",") if d)


class _Gate(grpc.GenericRpcHandler):
    """Runs in the server's dispatch thread: admits or refuses a stream from its metadata alone."""

    def __init__(self, transport: GrpcTransport):
        self.transport = transport

    def service(self, details):
        if details.method != METHOD:
            return None
        metadata = dict(details.invocation_metadata or ())
        key, header, tag = metadata.get(KEY_HEADER), metadata.get(TENSOR_HEADER), metadata.get(TAG_HEADER)
        inbox = self.transport.inbox
        if key is None or header is None or not self.transport.secret.verify(tag, key, header):
            return _refusal(inbox.reject(reasons.UNAUTHENTICATED, str(key), "no valid link tag"))
        try:
            dtype, shape = parse_tensor_header(header)
        except ValueError:
            return _refusal(inbox.reject(reasons.BAD_HEADER, key, f"unreadable header {header[:64]!r}"))
        refused, nbytes = inbox.admit(key, dtype, shape)
        if refused is not None:
            return _refusal(refused)
        return grpc.stream_unary_rpc_method_handler(
            lambda chunks, context: self.transport.read_stream(key, nbytes, chunks, context)
        )


def _refusal(reason: str):
    def refuse(chunks, context):
        context.abort(REFUSAL_CODES[reason], f"activation stream refused: {reason}")

    return grpc.stream_unary_rpc_method_handler(refuse)


class GrpcTransport:
    def __init__(self, device, timeout_s: float, secret: LinkSecret, tls: TlsFiles | None = None):
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.secret = secret
        self.tls = tls
        self.inbox = Inbox(timeout_s)
        self._server: grpc.Server | None = None
        self._channels: list[grpc.Channel] = []
        self._send = None
        self._send_first = None
        self.bytes_sent = 0
        self._stopping = threading.Event()

    # receiving side -----------------------------------------------------------------------------
    def serve(self, host: str) -> str:
        """Starts this stage's server on a free port of `host`; returns host:port for the previous stage."""
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=SERVER_THREADS, thread_name_prefix="activations"),
            handlers=(_Gate(self),),
            options=CHANNEL_OPTIONS,
            maximum_concurrent_rpcs=MAX_CONCURRENT_STREAMS,
        )
        address = f"{host}:0"
        if self.tls is None:
            port = self._server.add_insecure_port(address)
        else:
            port = self._server.add_secure_port(address, self.tls.server_credentials())
        self._server.start()
        threading.Thread(target=self._sweep_abandoned, daemon=True, name="inbox-sweep").start()
        return f"{host}:{port}"

    def read_stream(self, key: str, nbytes: int, chunks, context) -> bytes:
        """An admitted stream's bytes, straight into a buffer of exactly the expected size."""
        data = torch.empty(nbytes, dtype=torch.uint8)
        view = data.numpy()
        filled = 0
        for chunk in chunks:
            if filled + len(chunk) > nbytes:
                del data, view  # freed before the refusal goes out
                self.inbox.reject(reasons.OVERSIZE, key, f"more than the expected {nbytes} bytes")
                context.abort(grpc.StatusCode.OUT_OF_RANGE, "activation stream longer than its header")
            view[filled : filled + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            filled += len(chunk)
        if filled != nbytes:
            self.inbox.reject(reasons.TRUNCATED, key, f"{filled} of {nbytes} bytes")
            context.abort(grpc.StatusCode.OUT_OF_RANGE, "activation stream shorter than its header")
        self.inbox.deliver(key, data)
        return b""

    def expect(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.inbox.expect(key, shape, dtype)

    def expect_back(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.inbox.expect(f"back:{key}", shape, dtype)

    def recv(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.inbox.take(key, tuple(shape), dtype).to(self.device)

    def recv_back(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.recv(f"back:{key}", shape, dtype)

    def _sweep_abandoned(self) -> None:
        while not self._stopping.wait(min(5.0, self.timeout_s / 4)):
            self.inbox.sweep()

    # sending side -------------------------------------------------------------------------------
    def _open(self, address: str):
        if self.tls is None:
            channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            options = CHANNEL_OPTIONS + self.tls.channel_options()
            channel = grpc.secure_channel(address, self.tls.channel_credentials(), options=options)
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
        header = tensor_header(str(tensor.dtype), tensor.shape)
        metadata = ((KEY_HEADER, key), (TENSOR_HEADER, header), (TAG_HEADER, self.secret.tag(key, header)))

        def messages():
            for start in range(0, len(payload), CHUNK_BYTES):
                yield payload[start : start + CHUNK_BYTES]

        deadline = time.monotonic() + self.timeout_s
        pause = 0.002
        while True:
            try:
                method(messages(), timeout=max(0.1, deadline - time.monotonic()), metadata=metadata)
                break
            except grpc.RpcError as e:  # not expected yet: the driver's expect is still on its way
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(2 * pause, 0.1)
        self.bytes_sent += len(payload)

    def close(self) -> None:
        self._stopping.set()
        for channel in self._channels:
            channel.close()
        if self._server is not None:
            self._server.stop(grace=None)
