"""The Ray pipeline: stage actors in a placement group, wired by a transport, fed micro-batches.

Every micro-batch's control message goes to every stage as one actor call (Ray runs an actor's calls
in submission order, so stages see batches in the same order); activations travel stage to stage over
the transport, never through Ray. Up to one micro-batch per stage is in flight, so all stages work at
once. Each batch has a deadline: a stage that dies or hangs fails the batches in flight with an error
naming the stage, and the pipeline shuts itself down instead of hanging.

Links are the pipeline's own: it draws a link secret (workers/transport/auth.py) and hands it to its
stages as a Ray call argument; gRPC streams and the torch.distributed rendezvous carry it. Stages listen
on loopback when they all share one node, else on the address Ray uses for their node. Shutting down
kills the actors, removes the placement group and waits until the stages' processes are gone, so the
devices' memory is free for whatever comes next.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mlapipe.runtime.errors import StageFailed
from mlapipe.runtime.microbatch import MicroBatch, StepOutput
from mlapipe.runtime.ray_local import ensure_ray

log = logging.getLogger("mlapipe.pipeline")

HEALTH_GROUP = "health"
TRANSPORT_GROUP = "transport"
PROBE_TIMEOUT_S = 5.0  # a live stage answers a health check in milliseconds, even mid-batch


@dataclass
class StageSpec:
    first_layer: int
    end_layer: int
    amb_mib: float


class RayPipeline:
    def __init__(
        self,
        model_path: str,
        stages: list[StageSpec],
        *,
        use_gpu: bool,
        transport: str,
        num_kv_blocks: int,
        block_size: int,
        max_seq_len: int | None = None,  # n_ctx: sizes the CUDA-graph decode buffers
        deadline_s: float = 120.0,
        address: str | None = None,
        check_plan=None,  # callable(list of device infos) -> KV blocks or None, raising before any weight is loaded
        placement: str = "PACK",  # consecutive stages on one node when possible; STRICT_SPREAD: one per node
        micro_batches_per_stage: int = 2,
        runner_options: dict | None = None,
        transport_tls=None,  # workers.transport.tls.TlsFiles: mutual TLS on the gRPC links
        cpu_threads: int = 1,  # torch threads of each CPU stage
        on_stage_loaded=None,  # callable(StageSpec) as each stage has read its layers (a loading bar)
    ):
        from mlapipe.workers.stage import StageWorker
        from mlapipe.workers.transport.auth import LinkSecret

        ensure_ray(address)
        # Micro-batches in flight: two per stage, so that a stage finds the next prompt micro-batch queued
        # when it finishes one instead of waiting for a driver round trip; decode is spread over one per
        # stage (decode_groups; measured on 2 x H200, V2-Lite shape, 64 sequences: 3943 t/s over 2 decode
        # micro-batches, 2429 t/s over 4, each micro-batch reading the stage's experts again).
        self.num_groups = len(stages) * micro_batches_per_stage
        self.decode_groups = len(stages)
        self.deadline_s = deadline_s
        self.transport = transport
        self._secret = LinkSecret()
        self._tls = transport_tls
        self._store_actor = None  # the torch.distributed rendezvous (gloo / NCCL)
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 0.01}
        self._pg = placement_group([bundle] * len(stages), strategy=placement)
        ray.get(self._pg.ready(), timeout=deadline_s)
        # Health checks run in a concurrency group of their own: a stage busy in (or stuck on) a
        # micro-batch still answers them, so only a dead or stopped process fails one. expect() runs
        # in another, beside the run loop (the default group, max_concurrency=1, keeps batches in order).
        actor_cls = ray.remote(concurrency_groups={HEALTH_GROUP: 1, TRANSPORT_GROUP: 1})(StageWorker)
        self.actors = [
            actor_cls.options(
                num_gpus=1 if use_gpu else 0,
                num_cpus=bundle["CPU"],
                max_concurrency=1,
                runtime_env=_stage_env(),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=i
                ),
            ).remote(i, len(stages))
            for i in range(len(stages))
        ]
        self._pending: dict[int, tuple[list, float]] = {}  # batch id -> (refs per stage, deadline)
        self._outputs: dict[int, list[StepOutput]] = {}  # the last stage's, until every stage is done
        self._errors: dict[int, tuple[int, StepOutput]] = {}  # micro-batch id -> (stage, its error there)
        try:
            self.devices = self._get([a.init_device.remote(use_gpu, cpu_threads) for a in self.actors])
            if check_plan is not None:  # a plan sized from the devices' memory picks the cache's size
                num_kv_blocks = check_plan(self.devices) or num_kv_blocks
            self.num_kv_blocks = num_kv_blocks
            options = runner_options or {}
            loads = {
                a.load_layers.remote(model_path, s.first_layer, s.end_layer, amb_mib=s.amb_mib, **options): s
                for a, s in zip(self.actors, stages)
            }
            self._wait_each(list(loads), lambda ref: on_stage_loaded and on_stage_loaded(loads[ref]))
            self._get(
                [a.allocate_kv_cache.remote(num_kv_blocks, block_size, max_seq_len) for a in self.actors]
            )
            self._connect(transport)
        except BaseException:
            self.shutdown()
            raise

    def _get(self, refs, timeout: float | None = None):
        return ray.get(refs, timeout=timeout or max(self.deadline_s, 300.0))

    def _wait_each(self, refs, on_ready) -> None:
        """Like _get, calling on_ready(ref) as each finishes (a stage's error raises here)."""
        deadline = time.monotonic() + max(self.deadline_s, 300.0)
        while refs:
            ready, refs = ray.wait(refs, num_returns=1, timeout=max(deadline - time.monotonic(), 0))
            if not ready:
                raise ray.exceptions.GetTimeoutError(f"{len(refs)} stage(s) did not finish loading in time")
            ray.get(ready[0])
            on_ready(ready[0])

    def _connect(self, transport: str) -> None:
        from mlapipe.workers.transport.auth import bind_address

        if len(self.actors) == 1:
            return
        nodes = [d["node_id"] for d in self.devices]
        hosts = [bind_address(d["ip"], nodes) for d in self.devices]
        if transport in ("nccl", "gloo"):
            from mlapipe.workers.transport.ray_store import RendezvousStoreActor

            self._store_actor = ray.remote(num_cpus=0)(RendezvousStoreActor).remote(self._secret)
            self._get(
                [
                    a.connect_torch.remote(transport, self._store_actor, self._secret, host, self.deadline_s)
                    for a, host in zip(self.actors, hosts)
                ]
            )
        elif transport == "grpc":
            addresses = self._get(
                [
                    a.serve_grpc.remote(self.deadline_s, self._secret, host, self._tls)
                    for a, host in zip(self.actors, hosts)
                ]
            )
            self.link_addresses = addresses  # each stage's server, in stage order
            links = [(next_address, None) for next_address in addresses[1:]] + [(None, addresses[0])]
            self._get([a.connect_grpc.remote(*link) for a, link in zip(self.actors, links)])
        else:
            raise ValueError(f"unknown transport {transport!r}")

    # executor interface (same as LocalExecutor) -------------------------------------------------
    def submit(self, batches: list[MicroBatch]) -> None:
        """Micro-batches of one step go one actor call each, so a finished one frees its group while
        the others are still in flight. A decode round is one call for all its micro-batches: the
        stages interleave them step by step (see workers/stage.py)."""
        if self.transport == "grpc" and len(self.actors) > 1:  # what each stage's link will admit
            for actor in self.actors:
                actor.expect.options(concurrency_group=TRANSPORT_GROUP).remote(batches)
        if any(b.num_steps > 1 for b in batches):
            refs = [a.run_round.remote(batches) for a in self.actors]
            self._pending[batches[0].batch_id] = (refs, time.monotonic() + self.deadline_s)
            return
        for batch in batches:
            refs = [a.run_batch.remote(batch) for a in self.actors]
            self._pending[batch.batch_id] = (refs, time.monotonic() + self.deadline_s)

    def collect(self) -> list[StepOutput]:
        """Waits until at least one micro-batch finishes (if any is in flight) and returns the outputs
        of all that have. Raises StageFailed, naming the stage, on an error or a missed deadline."""
        while self._pending:
            earliest = min(deadline for _, deadline in self._pending.values())
            unresolved = {
                ref: (batch_id, stage)
                for batch_id, (refs, _) in self._pending.items()
                for stage, ref in enumerate(refs)
                if ref is not None
            }
            first, _ = ray.wait(
                list(unresolved), num_returns=1, timeout=max(0.0, earliest - time.monotonic())
            )
            if not first:
                self._fail_on_deadline()
            ready, _ = ray.wait(list(unresolved), num_returns=len(unresolved), timeout=0, fetch_local=False)
            outputs = []
            for ref in ready:
                batch_id, stage = unresolved[ref]
                try:
                    result = ray.get(ref)
                except Exception as e:  # Ray wraps the stage's exception, or reports the actor's death
                    # Another stage's death often surfaces first as this stage's transport error
                    # (gloo: connection reset by the peer), so the stages are asked before blaming it.
                    culprit = self._probe_stages()
                    self._fail(*(culprit or (stage, _short(e))))
                refs, _ = self._pending[batch_id]
                refs[stage] = None  # resolved: never waited on again
                results = result if isinstance(result, list) else [result] if result is not None else []
                if stage == len(refs) - 1:
                    self._outputs[batch_id] = results
                else:  # micro-batches that raised on this stage (workers/stage.py): the earliest stage's stands
                    for failure in results:
                        if failure.batch_id not in self._errors or stage < self._errors[failure.batch_id][0]:
                            self._errors[failure.batch_id] = (stage, failure)
                if all(ref is None for ref in refs):  # every stage is done with it
                    del self._pending[batch_id]
                    # what stages computed after the one that raised is dropped: its error is the output
                    for output in self._outputs.pop(batch_id):
                        outputs.append(self._errors.pop(output.batch_id, (None, output))[1])
            if outputs:
                return outputs
        return []

    def _fail_on_deadline(self) -> None:
        culprit = self._probe_stages()
        if culprit is None:
            culprit = (self._slowest_stage(), f"no result within the {self.deadline_s:.0f} s deadline")
        self._fail(*culprit)

    def _probe_stages(self) -> tuple[int, str] | None:
        """(stage, why) for the first stage that is dead, else the first that does not answer a health
        check (stopped or hung), else None. All stages are asked at once."""
        refs = [a.ping.options(concurrency_group=HEALTH_GROUP).remote() for a in self.actors]
        # Within half the deadline (a deadline is a promise to fail that fast), at most 5 s.
        timeout = min(PROBE_TIMEOUT_S, max(1.0, self.deadline_s / 2))
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        dead, silent = [], []
        for stage, ref in enumerate(refs):
            if ref not in ready:
                silent.append(stage)
                continue
            try:
                ray.get(ref, timeout=0)
            except Exception:
                dead.append(stage)
        for stage in dead:
            return stage, f"the actor died ({self._process_state(stage) or 'its process exited'})"
        for stage in silent:
            state = self._process_state(stage) or "hung, or its node is unreachable"
            return stage, f"the actor stopped responding ({state})"
        return None

    def _process_state(self, stage: int) -> str | None:
        """What the stage's process is doing, when it runs on this node (psutil can see it)."""
        import psutil

        info = self.devices[stage] if stage < len(getattr(self, "devices", [])) else {}
        if not info.get("pid") or info.get("node_id") != ray.get_runtime_context().get_node_id():
            return None
        try:
            status = psutil.Process(info["pid"]).status()
        except psutil.NoSuchProcess:
            return f"process {info['pid']} exited"
        if status == psutil.STATUS_STOPPED:
            return f"process {info['pid']} is stopped (SIGSTOP?)"
        if status == psutil.STATUS_ZOMBIE:
            return f"process {info['pid']} exited"
        return f"process {info['pid']} is {status}"

    def _slowest_stage(self) -> int:
        """The first stage still working on the oldest batch in flight."""
        refs, _ = min(self._pending.values(), key=lambda item: item[1])
        return next((stage for stage, ref in enumerate(refs) if ref is not None), len(refs) - 1)

    def _fail(self, stage: int, reason: str) -> None:
        batch_ids = list(self._pending)
        device = self.devices[stage]["device"] if stage < len(getattr(self, "devices", [])) else "?"
        self.shutdown()
        raise StageFailed(stage, device, reason, batch_ids)

    def stats(self) -> list[dict]:
        return self._get([a.stats.remote() for a in self.actors], timeout=30)

    def timelines(self) -> list[list[tuple]]:
        """Per stage, its forward spans since the last call (workers/stage_timeline.py)."""
        return self._get([a.timeline_spans.remote() for a in self.actors], timeout=30)

    def shutdown(self, wait_s: float = 30.0) -> None:
        """Kills the stage actors (their processes exit, which frees their devices whatever state a
        stage is in) and the rendezvous actor, removes the placement group, and waits up to wait_s for
        both to be gone."""
        self._pending.clear()
        actors = list(getattr(self, "actors", []))
        if getattr(self, "_store_actor", None) is not None:
            actors.append(self._store_actor)
            self._store_actor = None
        for actor in actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(actor, no_restart=True)
        self.actors = []
        pg, self._pg = getattr(self, "_pg", None), None
        if pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(pg)
        here = ray.get_runtime_context().get_node_id()
        local_pids = [d["pid"] for d in getattr(self, "devices", []) if d["node_id"] == here]
        _wait_until_gone(actors, local_pids, pg, wait_s)


def _wait_until_gone(actors, pids: list[int], pg, wait_s: float) -> None:
    """Until Ray reports every actor dead, the local stage processes have exited and the placement
    group is removed (or wait_s passes: a slow teardown is logged, never raised)."""
    import psutil

    deadline = time.monotonic() + wait_s
    for actor in actors:
        with contextlib.suppress(Exception):  # RayActorError: dead, as wanted
            ray.get(actor.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
            log.warning("a stage actor still answers after it was killed")
    for pid in pids:  # the stages on this node: their exit is what frees a device here
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(timeout=max(0.1, deadline - time.monotonic()))
    while pg is not None and time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if ray.util.placement_group_table(pg).get("state") == "REMOVED":
                return
        time.sleep(0.05)


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    cause = getattr(error, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return text[-1] if text else type(error).__name__


def _stage_env() -> dict | None:
    """The driver's MLAPIPE_* settings (kernel pins, graph switches, the failure tests' failpoint) for
    the stage actors: a stage on another node, or in a Ray started before they were set, would not
    see them otherwise."""
    env = {name: value for name, value in os.environ.items() if name.startswith("MLAPIPE_")}
    return {"env_vars": env} if env else None
