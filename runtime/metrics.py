"""Prometheus metrics of one Engine: vLLM's names under an `mlapipe:` prefix, plus per-stage ones.

Request metrics move in the engine loop (on_request_added / on_step); queue sizes and KV usage are read
when scraped. Each Engine owns its CollectorRegistry, so two engines in one process never clash, and
`serve(port)` exposes it on http://host:port/metrics.

Per-stage metrics are gathered by the driver from `executor.stats()` (cumulative counters each stage
keeps) rather than exported by the actors through ray.util.metrics: one place serves every metric, the
same code covers the in-process executor and the Ray pipeline, and the tests can scrape it on CPU
without Ray's metrics agent. The stats are polled when /metrics is scraped (at most once a second),
never from the engine loop: a stage answers stats() only after the micro-batches queued before it, so
polling from step() would stall the pipeline.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "mlapipe:"
# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards built for vLLM read these unchanged.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]  # fmt: skip
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip
STATS_MIN_INTERVAL_S = 1.0

log = logging.getLogger("mlapipe.metrics")


class MetricsPortError(ValueError):
    """The metrics port cannot be served (in use, or not allowed)."""


def finished_reason_label(reason: str | None) -> str:
    """vLLM's finished_reason values: stop | length | abort; ours adds scored (score())."""
    if not reason or reason.startswith("error"):
        return "abort"  # failed or shut down before the end: vLLM counts these as aborted
    return reason


class EngineMetrics:
    def __init__(self, scheduler, blocks, executor):
        self.registry = CollectorRegistry()
        self._last_token: dict[str, tuple[int, float]] = {}  # request id -> (tokens seen, when the last came)
        self._prompt_counted: dict[str, int] = {}  # request id -> prompt tokens counted as processed
        self._scheduler = scheduler
        self.batches_submitted = 0
        self._server = None
        r = self.registry
        running = Gauge(f"{PREFIX}num_requests_running", "Requests admitted and running.", registry=r)
        running.set_function(lambda: len(scheduler.running))
        waiting = Gauge(f"{PREFIX}num_requests_waiting", "Requests waiting to be admitted.", registry=r)
        waiting.set_function(lambda: len(scheduler.waiting))
        kv_usage = Gauge(f"{PREFIX}kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent.", registry=r)
        kv_usage.set_function(lambda: blocks.usage)
        self.ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds", "Time to first token.", buckets=TTFT_BUCKETS, registry=r
        )
        self.inter_token = Histogram(
            f"{PREFIX}inter_token_latency_seconds", "Time between tokens.", buckets=ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            f"{PREFIX}e2e_request_latency_seconds", "Arrival to finish.", buckets=E2E_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter(
            f"{PREFIX}request_success", "Requests finished.", ["finished_reason"], registry=r
        )
        self._stage_stats = StageStatsCollector(executor, blocks, lambda: self.batches_submitted)
        r.register(self._stage_stats)

    # hooks the engine calls ---------------------------------------------------------------------
    def on_request_added(self, request) -> None:
        """Prompt tokens are counted as the stages compute them (on_step), as vLLM counts them, not
        here: a long queue would otherwise show as work done."""

    def on_step(self, advanced, finished, num_submitted: int) -> None:
        """advanced: requests that got tokens this step (a decode round brings several at once: each
        counts, and each gets the mean gap since the last token as its inter-token latency);
        finished: requests that ended."""
        self.batches_submitted += num_submitted
        self._count_prompt_tokens(finished)
        for request in advanced:
            count, previous = self._last_token.get(request.request_id, (0, None))
            new = len(request.output_token_ids) - count
            self.generation_tokens.inc(new)
            if previous is None:
                self.ttft.observe(request.first_token_time - request.arrival_time)
                new, previous = new - 1, request.first_token_time
            for _ in range(new):
                self.inter_token.observe((request.last_token_time - previous) / new)
            self._last_token[request.request_id] = (len(request.output_token_ids), request.last_token_time)
        now = time.monotonic()
        for request in finished:
            self._last_token.pop(request.request_id, None)
            self.e2e.observe((request.last_token_time or now) - request.arrival_time)
            self.request_success.labels(finished_reason_label(request.finish_reason)).inc()

    def _count_prompt_tokens(self, finished) -> None:
        """Each prompt token once, when first computed: a prefill split over micro-batches counts chunk
        by chunk, and a preempted request that recomputes its prompt is not counted again."""
        for request in [*self._scheduler.running, *finished]:
            done = min(request.num_computed, len(request.prompt_token_ids))
            counted = self._prompt_counted.get(request.request_id, 0)
            if done > counted:
                self.prompt_tokens.inc(done - counted)
                self._prompt_counted[request.request_id] = done
        for request in finished:
            self._prompt_counted.pop(request.request_id, None)

    # serving ------------------------------------------------------------------------------------
    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serves /metrics on `port` (0: any free port) of `addr`: loopback unless told otherwise (a
        cluster's Prometheus needs "0.0.0.0" or the node's address); returns the port."""
        try:
            self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            raise MetricsPortError(f"cannot serve metrics on {addr} port {port}: {e}") from None
        port = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", addr, port)
        return port

    @property
    def port(self) -> int | None:
        return self._server.server_port if self._server else None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self._stage_stats.executor = None  # a closed engine's metrics keep no model alive


class StageStatsCollector:
    """Per-stage metrics from executor.stats(), labelled by stage; see the module docstring for why the
    driver gathers them. KV blocks come from the driver's BlockManager: every stage holds the same block
    ids (its own layers of each block), so each stage uses as many blocks as the driver allocated."""

    COUNTERS = {  # stats key -> (metric name, help)
        "forward_seconds": ("stage_forward_seconds", "Seconds the stage spent running its layers."),
        "transport_wait_seconds": (
            "stage_transport_wait_seconds",
            "Seconds the stage waited to receive or send activations (the pipeline bubble).",
        ),
        "bytes_sent": ("stage_bytes_sent", "Activation bytes sent to the next stage."),
        "batches": ("stage_micro_batches", "Micro-batches the stage finished."),
        "amb_steps": ("stage_amb_steps", "Attention head steps taken by prefill under the amb budget."),
    }

    def __init__(self, executor, blocks, batches_submitted):
        self.executor = executor
        self.blocks = blocks
        self.batches_submitted = batches_submitted  # callable: micro-batches the driver has sent
        self._stats: list[dict] = []
        self._polled_at = float("-inf")
        self._lock = threading.Lock()  # concurrent scrapes poll once

    def _poll(self) -> list[dict]:
        with self._lock:
            if self.executor is not None and time.monotonic() - self._polled_at >= STATS_MIN_INTERVAL_S:
                try:
                    self._stats = self.executor.stats()
                except Exception as e:  # a stage is gone (failure or shutdown): keep the last numbers
                    log.debug("stage stats unavailable: %s", e)
                self._polled_at = time.monotonic()
            return self._stats

    def collect(self):
        submitted = self.batches_submitted()
        stats = self._poll()
        families = {
            key: CounterMetricFamily(PREFIX + name, text, labels=["stage"])
            for key, (name, text) in self.COUNTERS.items()
        }
        in_flight = GaugeMetricFamily(
            f"{PREFIX}stage_micro_batches_in_flight",
            "Micro-batches sent to the stage and not yet finished by it.",
            labels=["stage"],
        )
        kv_blocks = GaugeMetricFamily(
            f"{PREFIX}stage_kv_blocks_used", "KV-cache blocks in use on the stage.", labels=["stage"]
        )
        rejected = CounterMetricFamily(
            f"{PREFIX}stage_transport_rejected",
            "Activation streams the stage refused or dropped, by reason (unauthenticated, unknown_key, "
            "bad_header, oversize, truncated, duplicate, expired).",
            labels=["stage", "reason"],
        )
        used_blocks = self.blocks.num_blocks - self.blocks.num_free
        for stage in stats:
            label = [str(stage["stage"])]
            for key, family in families.items():
                family.add_metric(label, stage.get(key, 0))
            in_flight.add_metric(label, max(0, submitted - stage.get("batches", 0)))
            kv_blocks.add_metric(label, used_blocks)
            for reason, count in stage.get("transport_rejected", {}).items():
                rejected.add_metric(label + [reason], count)
        yield from families.values()
        yield in_flight
        yield kv_blocks
        yield rejected
