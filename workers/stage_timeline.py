"""When a stage computes: one span per forward step, on the host's monotonic clock, so the spans of all
stages of one host line up (CLOCK_MONOTONIC is system-wide) and their gaps are the stage's waits.

On a GPU a span is the forward's GPU time: CUDA events around the launches, converted to host time
through a reference event recorded (and waited for) when the timeline starts. Nothing here waits for the
GPU afterwards; spans whose events have not completed yet are resolved by a later call. On a CPU the
forward is synchronous and the span is its host interval.

The stage keeps the last `limit` spans; `take()` drains them (the driver asks for a run's timeline).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    batch_id: int
    step: int  # the step of a decode round (0 for prompt micro-batches)
    start: float  # seconds, time.monotonic()
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


class StageTimeline:
    def __init__(self, device: str, limit: int = 8192):
        self.on_gpu = device == "cuda"
        self.spans: deque[Span] = deque(maxlen=limit)
        self.busy_seconds = 0.0  # all resolved spans' time, kept when spans are taken or dropped
        self._pending: deque = deque()  # (batch_id, step, start event, end event) still running
        self._reference = None
        if self.on_gpu:
            import torch

            self._reference = torch.cuda.Event(enable_timing=True)
            self._reference.record()
            self._reference.synchronize()
        self._reference_time = time.monotonic()

    def begin(self):
        """Marks the start of a forward step; pass the result to `end`."""
        if not self.on_gpu:
            return time.monotonic()
        import torch

        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def end(self, started, batch_id: int, step: int) -> None:
        """Marks the end of the step begun at `started`."""
        if not self.on_gpu:
            self._add(Span(batch_id, step, started, time.monotonic()))
            return
        import torch

        finished = torch.cuda.Event(enable_timing=True)
        finished.record()
        self._pending.append((batch_id, step, started, finished))
        self.collect()

    def collect(self) -> None:
        """Resolves the spans whose GPU work has finished (never waits)."""
        while self._pending and self._pending[0][3].query():
            batch_id, step, started, finished = self._pending.popleft()
            start = self._reference_time + self._reference.elapsed_time(started) / 1e3
            self._add(Span(batch_id, step, start, start + started.elapsed_time(finished) / 1e3))

    def _add(self, span: Span) -> None:
        self.spans.append(span)
        self.busy_seconds += span.seconds

    def take(self) -> list[tuple[int, int, float, float]]:
        """The resolved spans as (batch_id, step, start, end), oldest first, and forgets them."""
        self.collect()
        spans = [(s.batch_id, s.step, s.start, s.end) for s in self.spans]
        self.spans.clear()
        return spans

    def clear(self) -> None:
        self._pending.clear()  # CUDA events
        self.spans.clear()
