"""StageWorker: one pipeline stage, one device. Ray makes it an actor (runtime/pipeline.py).

The constructor only stores the stage's rank; the driver then calls init_device, load_layers,
allocate_kv_cache and connect in turn (so that Ray has set CUDA_VISIBLE_DEVICES before any CUDA work,
and a plan that does not fit is refused before any weight is read). After that, each micro-batch is
one run_batch call: receive the previous stage's hidden state, run this stage's layers, send it on;
the last stage returns sampled tokens instead.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque


class StageWorker:
    def __init__(self, stage: int, num_stages: int):
        self.stage = stage
        self.num_stages = num_stages
        self.runner = None
        self.transport = None
        self.device = "cpu"
        self.forward_seconds = 0.0
        self._pending_timings: deque = deque()  # (start, end) CUDA events of batches still running
        self.transport_wait_seconds = 0.0
        self.batches_done = 0

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def init_device(self, use_gpu: bool, cpu_threads: int = 1) -> dict:
        """Picks the device; returns what the planner needs to know about it."""
        import torch

        if use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError(f"stage {self.stage}: asked for a GPU but CUDA is not available here")
            torch.cuda.set_device(0)  # Ray exposes this actor's GPU as device 0
            free, total = torch.cuda.mem_get_info()
            self.device = "cuda"
            name = torch.cuda.get_device_name(0)
        else:
            torch.set_num_threads(cpu_threads)
            free = total = _available_host_memory()
            name = "cpu"
        host = socket.gethostname()
        return {
            "stage": self.stage,
            "device": f"{name} on {host}",
            "free_bytes": free,
            "total_bytes": total,
            "ip": _node_ip(),
            "node_id": _node_id(),
            "pid": os.getpid(),
        }

    def load_layers(self, model_path: str, first_layer: int, end_layer: int, **runner_options) -> int:
        """Reads only this stage's tensors from the GGUF; returns the number of layers loaded."""
        from workers.model_runner import ModelRunner, open_model

        model = open_model(model_path)
        self.runner = ModelRunner(model, first_layer, end_layer, device=self.device, **runner_options)
        self.hidden_size = model.config.hidden_size
        return end_layer - first_layer

    def allocate_kv_cache(self, num_blocks: int, block_size: int, max_seq_len: int | None = None) -> int:
        return self.runner.allocate_kv_cache(num_blocks, block_size, max_seq_len)

    # transports ---------------------------------------------------------------------------------
    def free_port(self) -> int:
        from workers.transport.torch_dist import free_tcp_port

        return free_tcp_port()

    def connect_torch(self, backend: str, master: str, timeout_s: float) -> None:
        """Joins the pipeline's process group; blocks until every stage has joined."""
        from workers.transport.torch_dist import TorchDistTransport

        self.transport = TorchDistTransport(
            backend, master, self.stage, self.num_stages, timeout_s, self.device
        )

    def serve_grpc(self, timeout_s: float) -> str:
        from workers.transport.grpc_stream import GrpcTransport

        self.transport = GrpcTransport(self.device, timeout_s)
        return self.transport.serve(_node_ip())

    def connect_grpc(self, next_address: str) -> None:
        self.transport.connect(next_address)

    # the run loop: one call per micro-batch -----------------------------------------------------
    def run_batch(self, batch):
        runner = self.runner
        hidden_in = None
        if not self.is_first:
            started = time.perf_counter()
            hidden_in = self.transport.recv(
                batch.batch_id, (batch.num_tokens, self.hidden_size), runner.dtype
            )
            self.transport_wait_seconds += time.perf_counter() - started
        started = time.perf_counter()
        timing = self._gpu_timing_start()
        hidden = runner.forward(batch, hidden_in)
        output = runner.finish(batch, hidden) if self.is_last else None
        if timing is None:
            self.forward_seconds += time.perf_counter() - started
        else:  # no host sync: the next batch's launches overlap this one's GPU work
            timing[1].record()
            self._pending_timings.append(timing)
            self._collect_gpu_timings()
        if not self.is_last:
            started = time.perf_counter()
            self.transport.send(batch.batch_id, hidden)
            self.transport_wait_seconds += time.perf_counter() - started
        self.batches_done += 1
        return output

    def _gpu_timing_start(self):
        if self.device != "cuda":
            return None
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        return start, end

    def _collect_gpu_timings(self) -> None:
        """Adds the forward time of batches whose GPU work has finished (never waits for the others)."""
        while self._pending_timings and self._pending_timings[0][1].query():
            start, end = self._pending_timings.popleft()
            self.forward_seconds += start.elapsed_time(end) / 1e3

    def stats(self) -> dict:
        self._collect_gpu_timings()
        return {
            "stage": self.stage,
            "forward_seconds": self.forward_seconds,
            "transport_wait_seconds": self.transport_wait_seconds,
            "batches": self.batches_done,
            "bytes_sent": getattr(self.transport, "bytes_sent", 0),
            "amb_steps": amb_steps_taken(self.runner),
        }

    def ping(self) -> int:
        return self.stage

    def shutdown(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


def amb_steps_taken(runner) -> int:
    """Attention head steps the runner's layers took on the decompressed (prefill) path."""
    if runner is None:
        return 0
    return sum(layer.attention.amb_steps_taken for layer in runner.shard.layers)


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"
