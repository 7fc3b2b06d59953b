"""The engine on one background thread, for the HTTP server: requests in, text deltas out.

The Engine is not thread-safe and its step() blocks, so one thread owns it: it builds the Engine
(the server answers 503 meanwhile), then loops: take commands (add / abort / stop) from a queue, run
engine.step(), and turn each request's new tokens into text, cut at stop strings, pushed to the
request's asyncio queue with call_soon_threadsafe. When nothing is running it sleeps on the command
queue. The HTTP side never touches the Engine except to read metrics.

Admission is bounded: at most `max_queue` requests are accepted and unfinished at once (running or
waiting for KV blocks); beyond that submit() raises Overloaded (429), never an unbounded backlog.
A request that fails (a bad prompt, a delivery error) ends alone; a pipeline stage failure ends every
request, and the loop then refuses new ones (503) until the server is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mlapipe.runtime.detokenizer import IncrementalDetokenizer, StopStrings
from mlapipe.runtime.sampling_params import SamplingParams

log = logging.getLogger("mlapipe.serve")

LOADING, READY, FAILED, STOPPED = "loading", "ready", "failed", "stopped"


class Overloaded(RuntimeError):
    """The bounded queue is full (429)."""


class Unavailable(RuntimeError):
    """The engine is loading, failed, or shutting down (503)."""


# events, loop thread -> HTTP handler ----------------------------------------------------------------
@dataclass
class Accepted:
    prompt_tokens: int


@dataclass
class Rejected:  # the request cannot run (400): a bad prompt
    message: str
    code: str | None = None


@dataclass
class TokenInfo:
    token_id: int
    offset: int  # where the token's text starts in the completion text
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Delta:
    text: str
    tokens: list[TokenInfo] = field(default_factory=list)  # only when logprobs were asked for


@dataclass
class Finished:
    finish_reason: str  # "stop" | "length"
    completion_tokens: int


@dataclass
class Failed:  # the engine failed while the request ran (503), or its delivery raised (500)
    message: str
    status: int = 503


Event = Accepted | Rejected | Delta | Finished | Failed
TERMINAL = (Rejected, Finished, Failed)


class RequestStream:
    """One request's events, read by its HTTP handler on the event loop."""

    def __init__(self, event_loop: asyncio.AbstractEventLoop):
        self._event_loop = event_loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.done = False  # a terminal event was sent (loop thread)
        self.request_id: str | None = None  # the engine's id, once added (loop thread)

    def put(self, event: Event) -> None:  # loop thread
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening any more
            self._event_loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def get(self) -> Event:
        return await self._events.get()


@dataclass
class _Tracked:
    """A running request's progress in turning tokens into text (loop thread only)."""

    stream: RequestStream
    detokenizer: IncrementalDetokenizer
    stops: StopStrings
    want_logprobs: bool
    seen: int = 0  # output tokens processed
    text: str = ""  # completion text so far (cut at a stop string)
    released: int = 0  # characters of text sent
    pending_tokens: list[TokenInfo] = field(default_factory=list)


class EngineLoop:
    def __init__(self, build_engine: Callable[[], object], max_queue: int = 256):
        if max_queue < 1:
            raise ValueError(f"--max-queue must be at least 1, got {max_queue}")
        self.build_engine = build_engine
        self.max_queue = max_queue
        self.engine = None
        self.state = LOADING
        self.failure: str | None = None  # why the state is FAILED
        self.load_error: BaseException | None = None
        self.on_ready: list[Callable[[], None]] = []  # called on the loop thread once loaded
        self.on_load_failure: Callable[[str], None] | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}  # engine request id -> progress (loop thread only)
        self._active = 0  # accepted, no terminal event yet
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mlapipe-engine", daemon=True)

    # HTTP side ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def num_active(self) -> int:
        return self._active

    def submit(
        self, prompt: str | Sequence[int], params: SamplingParams, stop: Sequence[str] = ()
    ) -> RequestStream:
        """Queues a request; its first event is Accepted or Rejected. Raises Unavailable or Overloaded."""
        stream = RequestStream(asyncio.get_running_loop())
        with self._lock:  # a request is refused here, or queued before a state change drains the queue
            self.check_ready()
            if self._active >= self.max_queue:
                raise Overloaded(
                    f"the server has {self._active} requests in progress (--max-queue {self.max_queue})"
                )
            self._active += 1
            self._commands.put(("add", stream, prompt, params, tuple(stop)))
        return stream

    def abort(self, stream: RequestStream) -> None:
        """The client went away: end the request and free its KV blocks."""
        if not stream.done:
            self._commands.put(("abort", stream))

    def check_ready(self) -> None:
        if self.state != READY:
            reasons = {LOADING: "the model is loading", STOPPED: "the server is shutting down"}
            raise Unavailable(reasons.get(self.state) or f"the engine failed: {self.failure}")

    def stop(self, timeout: float = 30.0) -> None:
        """Ends every unfinished request (the server is shutting down), closes the engine, joins."""
        with self._lock:
            if self.state in (LOADING, READY):
                self.state = STOPPED
            self._commands.put(("stop",))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # loop thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self.build_engine()
        except Exception as e:  # the model does not load: nothing will ever run
            self.load_error = e
            self._fail(
                f"{type(e).__name__}: {e}" if not str(e) else str(e), logged=False
            )  # the caller says it
            if self.on_load_failure is not None:
                self.on_load_failure(self.failure)
            return
        with self._lock:
            if self.state == LOADING:
                self.state = READY
        if self.state == READY:
            for callback in self.on_ready:
                callback()
        try:
            self._serve()
        finally:
            self._end_all(Failed("the server is shutting down"))
            self.engine.close()

    def _serve(self) -> None:
        engine = self.engine
        while True:
            busy = engine.scheduler.has_unfinished
            if not self._take_commands(block=not busy):
                return
            if not engine.scheduler.has_unfinished:
                continue
            try:
                advanced, finished = engine.step()
            except Exception as e:  # the engine's state is unknown now: nothing more can run on it
                log.exception("engine step failed")
                self._fail(f"engine step failed: {type(e).__name__}: {e}")
                return
            for request in {id(r): r for r in advanced + finished}.values():
                self._deliver(request)
            if engine.failure:  # a stage failed: its requests ended with the error above
                self._fail(engine.failure)
                return

    def _take_commands(self, block: bool) -> bool:
        """Runs queued commands (waiting for one if block); False once told to stop."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command[0] == "stop":
                return False
            if command[0] == "add":
                self._add(*command[1:])
            elif command[0] == "abort":
                self._abort(command[1])
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, stream: RequestStream, prompt, params: SamplingParams, stop: tuple[str, ...]) -> None:
        from mlapipe.runtime.engine import PromptError, RequestFailed

        engine = self.engine
        try:
            ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            if len(ids) >= engine.n_ctx:
                raise PromptError(
                    f"the prompt is {len(ids)} tokens; this server's context is {engine.n_ctx} tokens "
                    "(prompt plus completion)"
                )
            request_id = engine.add_request(ids, params)
        except (PromptError, ValueError) as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            self._end(stream, Rejected(str(e), code))
            return
        except RequestFailed as e:  # the engine failed before this request came in
            self._end(stream, Failed(str(e)))
            return
        stream.request_id = request_id
        stream.put(Accepted(len(ids)))
        self._tracked[request_id] = _Tracked(
            stream, IncrementalDetokenizer(engine.tokenizer), StopStrings(stop), params.logprobs is not None
        )

    def _abort(self, stream: RequestStream) -> None:
        request_id = stream.request_id
        if stream.done or request_id not in self._tracked:
            return
        del self._tracked[request_id]
        self.engine.abort(request_id)
        self._end(stream, None)

    def _deliver(self, request) -> None:
        tracked = self._tracked.get(request.request_id)
        if tracked is None:  # aborted, or cut by a stop string earlier
            return
        try:
            self._advance(request, tracked)
        except Exception as e:  # this request's delivery broke: it ends alone
            log.exception("request %s failed", request.request_id)
            del self._tracked[request.request_id]
            self.engine.abort(request.request_id)
            self._end(tracked.stream, Failed(f"request {request.request_id} failed: {e}", status=500))

    def _advance(self, request, tracked: _Tracked) -> None:
        tokens = request.output_token_ids
        finish_reason = None
        if request.finished:
            finish_reason = request.finish_reason
            if finish_reason.startswith("error"):  # 503 if the engine is gone; else this request alone (500)
                del self._tracked[request.request_id]
                status = 503 if self.engine.failure else 500
                self._end(tracked.stream, Failed(f"request failed: {finish_reason[7:]}", status))
                return
        while tracked.seen < len(tokens):
            index = tracked.seen
            tracked.seen += 1
            last = request.finished and tracked.seen == len(tokens)
            before = len(tracked.text)
            tracked.text += tracked.detokenizer.add(tokens[index], final=last)
            if tracked.want_logprobs and index < len(request.output_logprobs):
                logprob, top = request.output_logprobs[index]
                tracked.pending_tokens.append(TokenInfo(tokens[index], before, logprob, top))
            cut = tracked.stops.find(tracked.text, before) if tracked.stops.stops else None
            if cut is not None:
                tracked.text = tracked.text[:cut]
                finish_reason = "stop"
                if not request.finished:
                    self.engine.abort(request.request_id, "stop")  # frees its blocks now
                break
        end = len(tracked.text) if finish_reason else tracked.stops.releasable(tracked.text)
        if end > tracked.released or tracked.pending_tokens:
            delta = Delta(tracked.text[tracked.released : end], tracked.pending_tokens)
            tracked.released, tracked.pending_tokens = max(end, tracked.released), []
            tracked.stream.put(delta)
        if finish_reason:
            del self._tracked[request.request_id]
            self._end(tracked.stream, Finished(finish_reason, tracked.seen))

    def _end(self, stream: RequestStream, event: Event | None) -> None:
        if stream.done:
            return
        stream.done = True
        if event is not None:
            stream.put(event)
        with self._lock:
            self._active -= 1

    def _end_all(self, event: Event) -> None:
        for tracked in list(self._tracked.values()):
            self._end(tracked.stream, event)
        self._tracked.clear()
        while True:  # requests queued but never added
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                self._end(command[1], event)

    def _fail(self, reason: str, logged: bool = True) -> None:
        with self._lock:
            self.failure = reason
            self.state = FAILED
        if logged:
            log.error("engine failed: %s", reason)
        self._end_all(Failed(f"the engine failed: {reason}"))
