"""StageWorker: one pipeline stage, one device. Ray makes it an actor (runtime/pipeline.py).

The constructor only stores the stage's rank; the driver then calls init_device, load_layers,
allocate_kv_cache and connect in turn (so that Ray has set CUDA_VISIBLE_DEVICES before any CUDA work,
and a plan that does not fit is refused before any weight is read). After that, each micro-batch is
one run_batch call: receive the previous stage's hidden state, run this stage's layers, send it on;
the last stage returns sampled tokens instead.

A decode round (micro-batches of num_steps > 1, submitted together) is one run_round call per stage.
The stages then run the round's steps among themselves, step k of every micro-batch before step k+1,
so that while one micro-batch is on a later stage the first stage works on another. The last stage
sends each step's sampled tokens straight back to the first stage over the transport; the driver
hears back once, at the end of the round. With one stage the tokens never leave the device.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from mlapipe.runtime.microbatch import MicroBatch, StepOutput
from mlapipe.workers.failpoint import FAILPOINT_ENV, Failpoint
from mlapipe.workers.stage_timeline import StageTimeline

log = logging.getLogger(__name__)


class StageWorker:
    def __init__(self, stage: int, num_stages: int):
        self.stage = stage
        self.num_stages = num_stages
        self.runner = None
        self.transport = None
        self.device = "cpu"
        self.timeline = StageTimeline("cpu")  # when each forward step ran (remade for the device)
        self.transport_wait_seconds = 0.0
        self.batches_done = 0
        self.steps_done = 0  # forward steps (a decode round of K steps counts K)
        self.weight_bytes_allocated = 0  # device memory the weights took (GPUs; 0 on CPUs)
        self.failpoint = Failpoint.from_env()  # fault injection for the failure tests; None normally

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
            self.use_device("cuda")
        else:
            torch.set_num_threads(cpu_threads)
        return {"stage": self.stage, **describe_device(self.device), "ip": _node_ip(), "node_id": _node_id()}

    def use_device(self, device: str) -> None:
        """This process's device as it is (the in-process executor's; init_device's after its checks)."""
        self.device = device
        self.timeline = StageTimeline(device)

    def load_layers(self, model, first_layer: int, end_layer: int, **runner_options) -> int:
        """Reads only this stage's tensors from the GGUF (a path, or a model already open in this
        process); returns the number of layers loaded."""
        from mlapipe.workers.model_runner import ModelRunner, open_model

        model = open_model(model) if isinstance(model, str) else model
        before = _allocated_bytes(self.device)
        self.runner = ModelRunner(model, first_layer, end_layer, device=self.device, **runner_options)
        self.weight_bytes_allocated = _allocated_bytes(self.device) - before
        self.hidden_size = model.config.hidden_size
        return end_layer - first_layer

    def allocate_kv_cache(self, num_blocks: int, block_size: int, max_seq_len: int | None = None) -> int:
        return self.runner.allocate_kv_cache(num_blocks, block_size, max_seq_len)

    # transports ---------------------------------------------------------------------------------
    def connect_torch(self, backend: str, store_actor, secret, bind_host: str, timeout_s: float) -> None:
        """Joins the pipeline's process group through the rendezvous actor; blocks until every stage
        has joined. gloo/NCCL sockets listen on bind_host's interface."""
        from mlapipe.workers.transport.ray_store import RayStore
        from mlapipe.workers.transport.torch_dist import TorchDistTransport, bind_sockets_to

        bind_sockets_to(bind_host)
        store = RayStore(store_actor, secret, timeout_s)
        self.transport = TorchDistTransport(backend, store, self.stage, self.num_stages, timeout_s, self.device)

    def serve_grpc(self, timeout_s: float, secret, bind_host: str, tls=None) -> str:
        from mlapipe.workers.transport.grpc_stream import GrpcTransport

        self.transport = GrpcTransport(self.device, timeout_s, secret, tls)
        return self.transport.serve(bind_host)

    def connect_grpc(self, next_address: str | None, first_address: str | None = None) -> None:
        """Links to the next stage; the last stage links back to the first (decode-round tokens)."""
        if next_address is not None:
            self.transport.connect(next_address)
        if first_address is not None:
            self.transport.connect_back(first_address)

    def expect(self, batches: list[MicroBatch]) -> None:
        """The transport messages these micro-batches will bring to this stage, with their exact shapes
        (the gRPC link admits nothing else). Ray runs this in the actor's "transport" concurrency group,
        beside the run loop, as soon as the driver submits the batches."""
        import torch

        expect = getattr(self.transport, "expect", None)
        if expect is None:
            return
        for batch in batches:
            for k in range(batch.num_steps):
                num_tokens = batch.num_tokens if k == 0 else len(batch.chunks)  # later steps: decode
                if not self.is_first:
                    expect(_step_key(batch.batch_id, k), (num_tokens, self.hidden_size), self.runner.dtype)
                elif not self.is_last and k + 1 < batch.num_steps:
                    self.transport.expect_back(_step_key(batch.batch_id, k), (len(batch.chunks),), torch.int64)

    # the run loop ------------------------------------------------------------------------------
    def run_batch(self, batch: MicroBatch) -> StepOutput | None:
        """One micro-batch of one step; the last stage returns its output."""
        outputs = self.run_round([batch])
        return outputs[0] if outputs is not None else None

    def run_round(self, batches: list[MicroBatch]) -> list[StepOutput] | None:
        """Micro-batches submitted together, step by step; the last stage returns their outputs, the
        others the micro-batches that raised here (or None).

        A micro-batch that raises fails alone: its error is kept, and its later steps still receive
        and send (zeros of the same shapes) so the other stages' links stay in step; the driver drops
        what the stages after it computed and fails only its requests (their cache rows are freed)."""
        steps = max(b.num_steps for b in batches)
        sampled: dict[int, list] = {b.batch_id: [] for b in batches}  # last stage: tokens per step
        fed_back: dict[int, object] = {}  # one stage: the next step's input tokens, on the device
        outputs: dict[int, StepOutput] = {}
        failed: dict[int, str] = {}  # batch id -> why it raised on this stage
        for k in range(steps):
            for batch in batches:
                if k >= batch.num_steps:
                    continue
                step = batch.decode_step(k)
                token_ids = None
                if k > 0 and self.is_first:
                    token_ids = fed_back.pop(batch.batch_id) if self.is_last else self._recv_tokens(step, k)
                hidden = self._forward(step, k, token_ids, failed)
                if not self.is_last:
                    self._send_hidden(step, k, hidden)
                elif batch.num_steps == 1:
                    if batch.batch_id not in failed:
                        outputs[batch.batch_id] = self._guarded(failed, step, self.runner.finish, step, hidden)
                else:
                    if batch.batch_id not in failed:
                        tokens = self._guarded(failed, step, self.runner.sample, step, hidden)
                    if batch.batch_id in failed:  # raised now or at an earlier step: zeros keep the links in step
                        tokens = self._no_tokens(step)
                    sampled[batch.batch_id].append(tokens)
                    if k + 1 < batch.num_steps:
                        if self.is_first:
                            fed_back[batch.batch_id] = tokens
                        else:
                            self.transport.send_back(_key(step, k), tokens)
            self.steps_done += 1
        self.batches_done += len(batches)
        errors = {batch_id: StepOutput(batch_id, {}, error=why) for batch_id, why in failed.items()}
        if not self.is_last:
            return list(errors.values()) or None
        for batch in batches:
            if batch.batch_id in errors:
                outputs[batch.batch_id] = errors[batch.batch_id]
            elif batch.num_steps > 1:
                outputs[batch.batch_id] = _round_output(batch, sampled[batch.batch_id])
        return [outputs[b.batch_id] for b in batches]

    def _forward(self, step: MicroBatch, k: int, token_ids, failed: dict[int, str]):
        hidden_in = None
        if not self.is_first:
            started = time.perf_counter()
            hidden_in = self.transport.recv(
                _key(step, k), (step.num_tokens, self.hidden_size), self.runner.dtype
            )
            self.transport_wait_seconds += time.perf_counter() - started
        if step.batch_id in failed:  # an earlier step raised here: keep the links in step, skip the work
            return self._zeros(step)
        # no host sync on a GPU: the next step's launches overlap this one's GPU work
        started = self.timeline.begin()
        hidden = self._guarded(failed, step, self._run_layers, step, hidden_in, token_ids)
        if hidden is None:
            return self._zeros(step)
        self.timeline.end(started, step.batch_id, k)
        return hidden

    def _run_layers(self, step: MicroBatch, hidden_in, token_ids):
        if self.failpoint is not None and self.failpoint.hits(self.stage, step):
            raise RuntimeError(f"failpoint {FAILPOINT_ENV} hit")
        return self.runner.forward(step, hidden_in, token_ids)

    def _guarded(self, failed: dict[int, str], step: MicroBatch, work, *args):
        """work(*args), or None with the micro-batch's error kept in `failed` when it raises (out of
        memory, a bad value, a bug). A device error that poisons every later launch (CUDA's sticky
        errors) and a Ctrl-C or exit pass through: the stage is lost, as when it dies."""
        try:
            return work(*args)
        except Exception as error:
            if _device_lost(error):
                raise
            first_line = (str(error).splitlines() or [""])[0][:300]
            failed[step.batch_id] = f"stage {self.stage} raised {type(error).__name__}: {first_line}"
            log.exception("stage %d: micro-batch %d failed", self.stage, step.batch_id)
            return None

    def _zeros(self, step: MicroBatch):
        import torch

        return torch.zeros(step.num_tokens, self.hidden_size, dtype=self.runner.dtype, device=self.device)

    def _no_tokens(self, step: MicroBatch):
        import torch

        return torch.zeros(len(step.chunks), dtype=torch.int64, device=self.device)

    def _send_hidden(self, step: MicroBatch, k: int, hidden) -> None:
        started = time.perf_counter()
        self.transport.send(_key(step, k), hidden)
        self.transport_wait_seconds += time.perf_counter() - started

    def _recv_tokens(self, step: MicroBatch, k: int):
        import torch

        started = time.perf_counter()
        tokens = self.transport.recv_back(_key(step, k - 1), (len(step.chunks),), torch.int64)
        self.transport_wait_seconds += time.perf_counter() - started
        return tokens

    def timeline_spans(self) -> list[tuple[int, int, float, float]]:
        """This stage's forward spans since the last call: (batch id, step, start, end) in seconds of
        the host's monotonic clock (runtime/timeline.py draws them)."""
        return self.timeline.take()

    def stats(self) -> dict:
        self.timeline.collect()
        return {
            "stage": self.stage,
            "forward_seconds": self.timeline.busy_seconds,
            "transport_wait_seconds": self.transport_wait_seconds,
            "batches": self.batches_done,
            "steps": self.steps_done,
            "bytes_sent": getattr(self.transport, "bytes_sent", 0),
            "amb_steps": amb_steps_taken(self.runner),
            "transport_rejected": dict(getattr(getattr(self.transport, "inbox", None), "rejected", {})),
            "weight_bytes_allocated": self.weight_bytes_allocated,
            "kv_cache_bytes": _kv_bytes(self.runner),
        }

    def ping(self) -> int:
        return self.stage

    def shutdown(self) -> None:
        """Gives back what the stage took: the transport's sockets and threads, then the runner's
        weights, latent cache, CUDA graphs and their pools, and the allocator's cached blocks."""
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self.timeline.clear()  # CUDA events
        if self.runner is not None:
            from mlapipe.workers.model_runner import free_cached_memory

            self.runner.release()
            self.runner = None
            free_cached_memory(self.device)


def _device_lost(error: Exception) -> bool:
    """A CUDA error after which the context refuses all work (an illegal address, a launch failure);
    out of memory is not one of them."""
    return type(error).__name__ == "AcceleratorError" or "CUDA error" in str(error)


def _key(batch: MicroBatch, step: int) -> str:
    return _step_key(batch.batch_id, step)


def _step_key(batch_id: int, step: int) -> str:
    """Names one step of one micro-batch on the wire (the gRPC link matches messages by it)."""
    return f"{batch_id}.{step}"


def _round_output(batch: MicroBatch, tokens_per_step: list) -> StepOutput:
    import torch

    columns = torch.stack(tokens_per_step, dim=1).tolist()  # the round's only host sync
    return StepOutput(batch.batch_id, {c.request_id: columns[i] for i, c in enumerate(batch.chunks)})


def amb_steps_taken(runner) -> int:
    """Attention head steps the runner's layers took on the decompressed (prefill) path."""
    if runner is None:
        return 0
    return sum(layer.attention.amb_steps_taken for layer in runner.shard.layers)


def _allocated_bytes(device: str) -> int:
    if device != "cuda":
        return 0
    import torch

    return torch.cuda.memory_allocated()


def _kv_bytes(runner) -> int:
    cache = getattr(runner, "kv_cache", None)
    return 0 if cache is None else cache.numel() * cache.element_size()


def describe_device(device: str) -> dict:
    """Name and memory of this process's device (a GPU's free and total bytes; the host's available
    memory for a CPU), for the planner."""
    import torch

    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()
    else:
        free = total = _available_host_memory()
        name = "cpu"
    return {
        "device": f"{name} on {socket.gethostname()}",
        "free_bytes": free,
        "total_bytes": total,
        "pid": os.getpid(),
    }


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
