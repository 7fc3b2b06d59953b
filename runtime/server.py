"""`mlapipe serve`: the OpenAI API over one Engine, as a FastAPI app run by uvicorn.

    POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events, then [DONE])
    GET  /v1/models, /health, /metrics           (/metrics: the engine's Prometheus registry)

The Engine runs on the EngineLoop's thread (runtime/serve_loop.py); handlers submit requests to it and
await their events. Errors are OpenAI's JSON ({"error": {message, type, param, code}}): 400 for a bad
field (named) or a prompt longer than the context, 401 without the API key when one is set, 404 for
another model's name, 429 when --max-queue requests are already in progress, 503 while the model
loads or after a stage failure. A client that disconnects has its request aborted, which frees its
KV blocks. SIGTERM / SIGINT: uvicorn stops accepting connections and waits (up to the shutdown
timeout) for the responses in progress, then the loop fails what is left and closes the engine.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlapipe.runtime import openai_protocol as api
from mlapipe.runtime.serve_loop import (
    READY,
    Accepted,
    Delta,
    EngineLoop,
    Failed,
    Finished,
    Overloaded,
    Rejected,
    RequestStream,
    Unavailable,
)

RETRY_AFTER_S = "1"


def build_app(
    engine_loop: EngineLoop,
    model_name: str,
    api_key: str | None = None,
    on_loaded: Callable[[], None] | None = None,  # run on the event loop's thread once the model is loaded
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if on_loaded is not None:
            event_loop = asyncio.get_running_loop()
            engine_loop.on_ready.append(lambda: event_loop.call_soon_threadsafe(on_loaded))
        engine_loop.start()
        yield
        await asyncio.to_thread(engine_loop.stop)

    app = FastAPI(title="mlapipe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    authorized = Depends(_key_check(api_key))

    @app.get("/health")
    def health() -> JSONResponse:
        if engine_loop.state == READY:
            return JSONResponse({"status": "ok"})
        body = {"status": engine_loop.state, "reason": engine_loop.failure}
        return JSONResponse(body, status_code=503, headers={"Retry-After": RETRY_AFTER_S})

    @app.get("/metrics")
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if engine_loop.engine is None:
            return Response("the model is loading\n", status_code=503, media_type="text/plain")
        return Response(generate_latest(engine_loop.engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[authorized])
    def models() -> dict:
        card = {"id": model_name, "object": "model", "created": api.now(), "owned_by": "mlapipe"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=[authorized])
    async def completions(body: api.CompletionRequest, request: Request) -> Response:
        engine = _ready_engine(engine_loop, body.model, model_name)
        params = body.sampling_params(body.max_tokens or 16, body.logprobs)  # 16: OpenAI's default
        shape = _CompletionShape(body, engine.tokenizer)
        return await _respond(engine_loop, request, body, body.prompt, params, shape, "prompt")

    @app.post("/v1/chat/completions", dependencies=[authorized])
    async def chat_completions(body: api.ChatCompletionRequest, request: Request) -> Response:
        from mlapipe.runtime.tokenizer import TokenizerError

        engine = _ready_engine(engine_loop, body.model, model_name)
        try:
            prompt = engine.tokenizer.encode_chat(body.template_messages())
        except TokenizerError as e:
            raise api.APIError(400, str(e), param="messages") from None
        except Exception as e:  # the file's template raised on these messages (jinja2's own errors)
            raise api.APIError(
                400, f"the chat template failed on these messages: {e}", param="messages"
            ) from None
        # no max_tokens: up to the context, as OpenAI's chat API does
        max_tokens = body.max_completion_tokens or body.max_tokens or engine.n_ctx
        params = body.sampling_params(max_tokens, body.num_logprobs)
        shape = _ChatShape(body, engine.tokenizer)
        return await _respond(engine_loop, request, body, prompt, params, shape, "messages")

    return app


# one request ----------------------------------------------------------------------------------------
async def _respond(engine_loop, request, body, prompt, params, shape, prompt_field: str) -> Response:
    try:
        stream = engine_loop.submit(prompt, params, body.stop)
    except Overloaded as e:
        raise api.APIError(429, str(e), "rate_limit_error", code="queue_full") from None
    except Unavailable as e:
        raise api.APIError(503, str(e), "server_error", code="unavailable") from None
    first = await stream.get()
    if isinstance(first, Rejected):
        raise api.APIError(400, first.message, param=prompt_field, code=first.code)
    if isinstance(first, Failed):
        raise api.APIError(first.status, first.message, "server_error")
    assert isinstance(first, Accepted), first
    if body.stream:
        return StreamingResponse(
            _sse(engine_loop, stream, shape, first.prompt_tokens, body.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return JSONResponse(await _collect(engine_loop, request, stream, shape, first.prompt_tokens))


async def _collect(engine_loop, request: Request, stream: RequestStream, shape, prompt_tokens: int) -> dict:
    """The whole completion; a client that disconnects meanwhile has its request aborted."""
    watcher = asyncio.create_task(_abort_on_disconnect(request, engine_loop, stream))
    text, tokens = [], []
    try:
        while True:
            event = await stream.get()
            if isinstance(event, Delta):
                text.append(event.text)
                tokens += event.tokens
            elif isinstance(event, Finished):
                usage = api.usage(prompt_tokens, event.completion_tokens)
                return shape.whole("".join(text), tokens, event.finish_reason, usage)
            elif isinstance(event, Failed):
                raise api.APIError(event.status, event.message, "server_error")
    finally:
        watcher.cancel()


async def _abort_on_disconnect(request: Request, engine_loop: EngineLoop, stream: RequestStream) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    engine_loop.abort(stream)
    stream.put(Failed("the client disconnected", status=499))


async def _sse(
    engine_loop, stream: RequestStream, shape, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events. A client that goes away cancels this generator (Starlette watches the
    connection), and the finally clause aborts the request."""
    ended = False
    try:
        if (opening := shape.opening()) is not None:
            yield _data(opening)
        while True:
            event = await stream.get()
            if isinstance(event, Delta):
                if event.text or event.tokens:
                    yield _data(shape.piece(event.text, event.tokens))
            elif isinstance(event, Finished):
                ended = True
                yield _data(shape.closing(event.finish_reason))
                if include_usage:
                    yield _data(shape.usage_chunk(api.usage(prompt_tokens, event.completion_tokens)))
                break
            elif isinstance(event, Failed):
                ended = True
                yield _data(api.error_body(event.message, "server_error"))
                break
        yield "data: [DONE]\n\n"
    finally:
        if not ended:
            engine_loop.abort(stream)


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# response shapes --------------------------------------------------------------------------------------
class _Shape:
    """The JSON of one API's responses: a whole one, or the chunks of a stream."""

    object_name = chunk_object_name = ""
    id_prefix = ""

    def __init__(self, body, tokenizer, logprobs: bool):
        self.id, self.created, self.model = api.new_id(self.id_prefix), api.now(), body.model
        self.logprobs = logprobs
        self.token_bytes = tokenizer.token_bytes

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def _chunk(self, choice: dict) -> dict:
        return {**self._head(self.chunk_object_name), "choices": [{"index": 0, **choice}]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head(self.chunk_object_name), "choices": [], "usage": usage}

    def _whole(self, choice: dict, usage: dict) -> dict:
        return {**self._head(self.object_name), "choices": [{"index": 0, **choice}], "usage": usage}


class _CompletionShape(_Shape):
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, body: api.CompletionRequest, tokenizer):
        super().__init__(body, tokenizer, body.logprobs is not None)

    def _logprobs(self, tokens) -> dict | None:
        return api.completion_logprobs(tokens, self.token_bytes) if self.logprobs else None

    def opening(self) -> dict | None:
        return None  # completions streams open with text

    def piece(self, text: str, tokens) -> dict:
        return self._chunk({"text": text, "logprobs": self._logprobs(tokens), "finish_reason": None})

    def closing(self, finish_reason: str) -> dict:
        return self._chunk({"text": "", "logprobs": None, "finish_reason": finish_reason})

    def whole(self, text: str, tokens, finish_reason: str, usage: dict) -> dict:
        choice = {"text": text, "logprobs": self._logprobs(tokens), "finish_reason": finish_reason}
        return self._whole(choice, usage)


class _ChatShape(_Shape):
    object_name, chunk_object_name = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, body: api.ChatCompletionRequest, tokenizer):
        super().__init__(body, tokenizer, body.logprobs)

    def _logprobs(self, tokens) -> dict | None:
        return api.chat_logprobs(tokens, self.token_bytes) if self.logprobs else None

    def opening(self) -> dict:
        return self._chunk(
            {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        )

    def piece(self, text: str, tokens) -> dict:
        return self._chunk(
            {"delta": {"content": text}, "logprobs": self._logprobs(tokens), "finish_reason": None}
        )

    def closing(self, finish_reason: str) -> dict:
        return self._chunk({"delta": {}, "logprobs": None, "finish_reason": finish_reason})

    def whole(self, text: str, tokens, finish_reason: str, usage: dict) -> dict:
        message = {"role": "assistant", "content": text}
        return self._whole(
            {"message": message, "logprobs": self._logprobs(tokens), "finish_reason": finish_reason}, usage
        )


# checks and errors ------------------------------------------------------------------------------------
def _ready_engine(engine_loop: EngineLoop, requested: str, model_name: str):
    try:
        engine_loop.check_ready()
    except Unavailable as e:
        raise api.APIError(503, str(e), "server_error", code="unavailable") from None
    if requested != model_name:
        raise api.APIError(404, f"model {requested!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip
    return engine_loop.engine


def _key_check(api_key: str | None) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise api.APIError(
                401, "a valid API key is required: Authorization: Bearer <key>", code="invalid_api_key"
            )

    return check


def _add_error_handlers(app: FastAPI) -> None:
    def reply(error: api.APIError) -> JSONResponse:
        headers = {"Retry-After": RETRY_AFTER_S} if error.status in (429, 503) else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(api.APIError)
    async def on_api_error(request: Request, error: api.APIError) -> JSONResponse:
        return reply(error)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return reply(api.validation_error(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return reply(api.APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}"))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        # the JSON goes to the client; Starlette re-raises the error after it, and uvicorn logs it
        return reply(api.APIError(500, f"internal error: {type(error).__name__}: {error}", "server_error"))


# running it -------------------------------------------------------------------------------------------
def serve(
    engine_loop: EngineLoop,
    model_name: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    shutdown_timeout: float = 30.0,
    log_level: str = "warning",
    on_listening: Callable[[str], None] | None = None,
) -> int:
    """Runs the server until SIGTERM / SIGINT and returns 0; raises the model's error if it did not load."""
    import uvicorn

    server = None

    def take_signals_back() -> None:
        # ray.init (a pipeline's Engine) installs Ray's own SIGTERM handler, which aborts the process;
        # uvicorn's goes back once the engine is up (signal.signal: here, on the main thread)
        if threading.current_thread() is threading.main_thread():  # uvicorn took them only there
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, server.handle_exit)

    app = build_app(engine_loop, model_name, api_key, on_loaded=take_signals_back)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        access_log=log_level.upper() in ("DEBUG", "INFO"),
        timeout_graceful_shutdown=shutdown_timeout,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    engine_loop.on_load_failure = lambda reason: setattr(server, "should_exit", True)
    # uvicorn handles SIGINT/SIGTERM itself (stop accepting, wait for the responses in progress, run the
    # lifespan shutdown), then raises the signal again under the handlers it found when it started, so
    # that a default handler kills the process. No-op handlers here make that graceful stop exit 0.
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in signals}
    try:
        if on_listening is not None:
            on_listening(f"http://{host}:{port}")
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if engine_loop.load_error is not None:  # the model did not load, so the server stopped
        raise engine_loop.load_error
    return 0
