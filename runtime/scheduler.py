"""Which tokens run next. Pure Python: no torch, no Ray.

Requests wait, then run: their prompt in chunks of at most `ubatch` tokens per micro-batch, then one
decode token per step. Up to `num_groups` micro-batches are in flight at once (two per pipeline stage,
"pipeline copies"; decode spread over `decode_groups` of them); a request belongs to at most one of
them, because its next token needs the last.
KV blocks are allocated as chunks are scheduled; when they run out, the most recently admitted
request that is not in flight is preempted (its blocks freed, its tokens recomputed later).

Decode rounds: when every running request is decoding and nothing waits or is in flight, the batches
of one schedule_all() each ask for up to `decode_steps` steps (MicroBatch.num_steps). The stages run
those steps without the driver, so a token no longer costs a driver round trip. A request that stops
inside a round (EOS, a stop token) keeps the tokens up to the stop; the rest are dropped.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from mlapipe.runtime.block_manager import BlockManager
from mlapipe.runtime.microbatch import MicroBatch, SequenceChunk, StepOutput
from mlapipe.runtime.sampling_params import SamplingParams


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    score_only: bool = False  # score(): run the prompt, return log p of each next token, sample nothing
    output_token_ids: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    num_computed: int = 0  # tokens whose latent KV is in the cache
    in_flight: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "scored" | "abort" | "error: ..."
    abort_reason: str | None = None  # abort() while in flight: ends when its micro-batch comes back
    run_alone: bool = False  # its micro-batch raised with others in it: retried in one of its own
    output_logprobs: list = field(default_factory=list)  # per output token, when sampling.logprobs is set
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        ubatch: int,
        n_ctx: int,
        num_groups: int = 1,
        max_seqs_per_batch: int = 256,
        eos_token_id: int | None = None,
        decode_steps: int = 1,
        decode_groups: int | None = None,
    ):
        if ubatch < 1:
            raise ValueError(f"ubatch must be at least 1, got {ubatch}")
        if decode_steps < 1:
            raise ValueError(f"decode_steps must be at least 1, got {decode_steps}")
        self.decode_steps = decode_steps
        # Decoding sequences are spread over this many micro-batches (default: all groups). A pipeline
        # keeps more prompt micro-batches in flight than it has stages, so a stage always has the next
        # one queued, but splits decode over one micro-batch per stage: a decode micro-batch costs a
        # read of the stage's weights whatever its size, so more, smaller ones only cost more.
        self.decode_groups = min(decode_groups or num_groups, num_groups)
        self.blocks = block_manager
        self.ubatch = ubatch
        self.n_ctx = n_ctx
        self.num_groups = num_groups
        self.max_seqs_per_batch = max_seqs_per_batch
        self.eos_token_id = eos_token_id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.in_flight: dict[int, MicroBatch] = {}
        self._batch_ids = itertools.count()
        self._requests: dict[str, Request] = {}  # every unfinished request by id

    # queue --------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self._requests[request.request_id] = request
        self.waiting.append(request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_free_groups(self) -> int:
        return self.num_groups - len(self.in_flight)

    # scheduling ---------------------------------------------------------------------------------
    def schedule_all(self) -> list[MicroBatch]:
        """Every micro-batch that can start now (one per free group); a decode round when possible."""
        steps = self._round_steps()
        batches = []
        while (batch := self.schedule(steps)) is not None:
            batches.append(batch)
        return batches

    def _round_steps(self) -> int:
        """Steps of a decode round now: 1 unless every running request is decoding, nothing waits or
        is in flight (a round holds every group), and the KV blocks for the whole round are free."""
        running = self.running
        if self.decode_steps == 1 or self.in_flight or self.waiting or not running:
            return 1
        if any(r.run_alone for r in running):
            return 1
        if any(r.score_only or r.num_tokens - r.num_computed != 1 for r in running):
            return 1
        if any(r.sampling.logprobs is not None for r in running):  # a round returns only token ids
            return 1
        steps = min(
            self.decode_steps,
            min(r.sampling.max_tokens - len(r.output_token_ids) for r in running),
            min(self.n_ctx - r.num_tokens for r in running),  # the round never passes n_ctx
        )
        needed = sum(self.blocks.extra_blocks_needed(r.request_id, r.num_computed + steps) for r in running)
        return steps if steps > 1 and needed <= self.blocks.num_free else 1

    def schedule(self, steps: int = 1) -> MicroBatch | None:
        """The next micro-batch from requests not already in flight, or None if nothing can run.
        steps > 1 (from _round_steps): a decode round, with KV blocks reserved for all its steps."""
        if self.num_free_groups <= 0:
            return None
        budget = self.ubatch
        chunks: list[SequenceChunk] = []
        alone = next((r for r in self.running if r.run_alone and not r.in_flight), None)
        if alone is not None:  # a retry after its micro-batch raised: nothing else rides with it
            self._take(alone, min(budget, alone.num_tokens - alone.num_computed), chunks)
            return self._start(chunks, 1)
        # Decode tokens first (cheap, latency-bound), spread evenly over the free groups.
        decodable = [
            r for r in self.running if not r.in_flight and not r.run_alone and r.num_tokens - r.num_computed == 1
        ]
        decoding = sum(r.num_tokens - r.num_computed == 1 for r in self.running)  # in flight or ready
        decode_cap = -(-decoding // self.decode_groups) if decodable else 0
        for request in decodable[:decode_cap]:
            if budget <= 0 or len(chunks) >= self.max_seqs_per_batch:
                break
            if request.num_computed == request.num_tokens - 1:  # else preempted by an earlier one
                budget -= self._take(request, 1, chunks, steps)
        # Then prompt chunks of running requests, then newly admitted ones.
        for request in [
            r for r in self.running if not r.in_flight and not r.run_alone and r.num_tokens - r.num_computed > 1
        ]:
            budget = self._add_prefill(request, budget, chunks)
        while self.waiting and budget > 0 and len(chunks) < self.max_seqs_per_batch:
            request = self.waiting[0]
            size = min(budget, request.num_tokens - request.num_computed)
            if (request.run_alone and chunks) or not self.blocks.can_allocate(
                request.request_id, request.num_computed + size
            ):
                break
            self.waiting.popleft()
            self.running.append(request)
            budget = self._add_prefill(request, budget, chunks)
            if request.run_alone:  # preempted while waiting for its retry: still alone
                break
        return self._start(chunks, steps)

    def _start(self, chunks: list[SequenceChunk], steps: int) -> MicroBatch | None:
        if not chunks:
            return None
        batch = MicroBatch(next(self._batch_ids), chunks, num_steps=steps)
        self.in_flight[batch.batch_id] = batch
        return batch

    def _add_prefill(self, request: Request, budget: int, chunks: list[SequenceChunk]) -> int:
        if budget <= 0 or len(chunks) >= self.max_seqs_per_batch or request.in_flight:
            return budget
        return budget - self._take(request, min(budget, request.num_tokens - request.num_computed), chunks)

    def _take(self, request: Request, size: int, chunks: list[SequenceChunk], steps: int = 1) -> int:
        """Puts `size` tokens of the request into the batch if their KV blocks (for all `steps` of a
        decode round) can be had; returns the tokens taken (0 or size). In flight from here on, so later
        passes and preemption skip it."""
        if not self._reserve(request, request.num_computed + size + steps - 1):
            return 0
        chunks.append(self._chunk(request, size))
        request.in_flight = True
        return size

    def _reserve(self, request: Request, num_tokens: int) -> bool:
        """Allocates blocks for num_tokens, preempting newer idle requests if the cache is full."""
        while not self.blocks.can_allocate(request.request_id, num_tokens):
            victim = next((r for r in reversed(self.running) if not r.in_flight and r is not request), None)
            if victim is None:
                return False
            self._preempt(victim)
        self.blocks.allocate(request.request_id, num_tokens)
        return True

    def _preempt(self, request: Request) -> None:
        self.blocks.free(request.request_id)
        request.num_computed = 0
        self.running.remove(request)
        self.waiting.appendleft(request)

    def _chunk(self, request: Request, size: int) -> SequenceChunk:
        start, end = request.num_computed, request.num_computed + size
        tokens = request.all_token_ids
        reaches_end = end == request.num_tokens
        targets = None
        if request.score_only:
            targets = [tokens[i + 1] if i + 1 < len(tokens) else -1 for i in range(start, end)]
        return SequenceChunk(
            request_id=request.request_id,
            token_ids=tokens[start:end],
            num_cached=start,
            block_table=self.blocks.table(request.request_id),
            sample=reaches_end and not request.score_only,
            sampling=request.sampling,
            num_generated=len(request.output_token_ids),
            score_targets=targets,
        )

    # results ------------------------------------------------------------------------------------
    def update(self, output: StepOutput, now: float | None = None) -> tuple[list[Request], list[Request]]:
        """Applies a finished micro-batch. Returns (requests that got a token, requests that finished)."""
        now = time.monotonic() if now is None else now
        batch = self.in_flight.pop(output.batch_id)
        advanced, finished = [], []
        for chunk in batch.chunks:
            request = self._get(chunk.request_id)
            request.in_flight = False
            request.run_alone = False
            request.num_computed += chunk.num_new + batch.num_steps - 1
            request.scores.extend(output.scores.get(chunk.request_id, ()))
            if request.score_only and request.num_computed == request.num_tokens:
                request.finish_reason = "scored"
            elif chunk.request_id in output.sampled:
                for token in output.sampled[chunk.request_id]:
                    self._append_token(request, token, now)
                    if request.finished:  # tokens sampled after a stop inside a round are dropped
                        break
                request.output_logprobs.extend(output.logprobs.get(chunk.request_id, ()))
                advanced.append(request)
            if request.abort_reason and not request.finished:
                request.finish_reason = request.abort_reason
            if request.finished:
                self._release(request)
                finished.append(request)
        return advanced, finished

    def _append_token(self, request: Request, token: int, now: float) -> None:
        request.output_token_ids.append(token)
        request.first_token_time = request.first_token_time or now
        request.last_token_time = now
        params = request.sampling
        if (token == self.eos_token_id and not params.ignore_eos) or token in params.stop_token_ids:
            request.finish_reason = "stop"
        elif len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self.n_ctx:
            request.finish_reason = "length"

    def retry_or_fail_batch(self, batch_id: int, reason: str) -> list[Request]:
        """A micro-batch raised on a stage. Shared by several requests, each runs again in a micro-batch
        of its own (nothing of theirs advanced; the rows it wrote are written again): only the request
        that raises alone fails. Returns the requests that failed now."""
        batch = self.in_flight[batch_id]
        if len(batch.chunks) == 1:
            return self.fail_batch(batch_id, reason)
        del self.in_flight[batch_id]
        aborted = []
        for chunk in batch.chunks:
            request = self._get(chunk.request_id)
            request.in_flight = False
            request.run_alone = True
            if request.abort_reason:  # abort() came while it was in flight: it ends now, not retried
                request.finish_reason = request.abort_reason
                self._release(request)
                aborted.append(request)
        return aborted

    def fail_batch(self, batch_id: int, reason: str) -> list[Request]:
        """A micro-batch was lost (a stage failed): its requests finish with the error."""
        batch = self.in_flight.pop(batch_id)
        failed = []
        for chunk in batch.chunks:
            request = self._get(chunk.request_id)
            request.in_flight = False
            request.finish_reason = f"error: {reason}"
            self._release(request)
            failed.append(request)
        return failed

    def abort(self, request_id: str, finish_reason: str = "abort") -> Request | None:
        """Ends an unfinished request and frees its blocks; returns it if it ended now. One in flight
        ends in update(), when its micro-batch is back: the stages may still be writing its blocks."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        if request.in_flight:
            request.abort_reason = finish_reason
            return None
        request.finish_reason = finish_reason
        if request in self.waiting:
            self.waiting.remove(request)
        self._release(request)
        return request

    def abort_all(self, reason: str) -> list[Request]:
        """Finishes every unfinished request with an error (engine shutdown or failure)."""
        aborted = [r for batch_id in list(self.in_flight) for r in self.fail_batch(batch_id, reason)]
        idle = [*self.running, *self.waiting]
        aborted += idle
        for request in idle:
            request.finish_reason = f"error: {reason}"
            self.blocks.free(request.request_id)
        self._requests.clear()
        self.running.clear()
        self.waiting.clear()
        return aborted

    def _release(self, request: Request) -> None:
        self.blocks.free(request.request_id)
        self._requests.pop(request.request_id, None)
        if request in self.running:
            self.running.remove(request)

    def _get(self, request_id: str) -> Request:
        return self._requests[request_id]
