"""`mlapipe serve` through the real `openai` client: a real uvicorn server on 127.0.0.1, the demo model.

One server per module (pipeline 1, in this process, so a test can read its block manager); a second
one on a Ray pipeline for the loading and stage-failure answers; a `mlapipe serve` subprocess for
SIGTERM. Expected tokens come from a separate Engine on the same file.
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn

from mlapipe.runtime.engine import Engine
from mlapipe.runtime.sampling_params import SamplingParams
from mlapipe.runtime.serve_loop import READY, EngineLoop
from mlapipe.runtime.server import build_app
from mlapipe.runtime.tiny_models import demo_model_path

KEY = "test-key"
MAX_QUEUE = 18
PROMPTS = [f"Request {i}: the quick brown fox" for i in range(MAX_QUEUE)]


@dataclass
class Served:
    url: str
    loop: EngineLoop
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=options.pop("api_key", KEY), max_retries=0, **options
        )

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def start_server(build_engine, max_queue: int = MAX_QUEUE, api_key: str | None = KEY) -> Served:
    """uvicorn on a socket bound here (port 0: a free one, no race for it), in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    loop = EngineLoop(build_engine, max_queue=max_queue)
    config = uvicorn.Config(build_app(loop, "demo", api_key), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    return Served(f"http://127.0.0.1:{sock.getsockname()[1]}", loop, server, thread)


def wait_for(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def model_path():
    return demo_model_path()


@pytest.fixture(scope="module")
def served(model_path):
    served = start_server(lambda: Engine(model_path, kv_blocks=160, progress=False))
    wait_for(lambda: served.loop.state == READY, what="the model to load")
    yield served
    served.stop()


@pytest.fixture(scope="module")
def reference(model_path):
    with Engine(model_path, kv_blocks=160, progress=False) as engine:
        yield engine


def greedy(reference, prompt, max_tokens=16, **options):
    return reference.generate(prompt, SamplingParams(max_tokens=max_tokens, **options))[0]


def stream_text(chunks) -> tuple[str, str]:
    text, finish = "", None
    for chunk in chunks:
        if chunk.choices:
            choice = chunk.choices[0]
            text += (choice.delta.content or "") if hasattr(choice, "delta") else choice.text
            finish = choice.finish_reason or finish
    return text, finish


def test_completion_equals_engine_generate(served, reference):
    client = served.client()
    expected = greedy(reference, PROMPTS[0])
    done = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert done.choices[0].text == expected.text
    assert done.choices[0].finish_reason == expected.finish_reason
    assert done.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert done.usage.completion_tokens == len(expected.token_ids)
    streamed = client.completions.create(
        model="demo", prompt=PROMPTS[0], max_tokens=16, temperature=0, stream=True
    )
    assert stream_text(streamed) == (expected.text, expected.finish_reason)
    ids = client.completions.create(model="demo", prompt=[5, 6, 7, 8], max_tokens=8, temperature=0)
    assert ids.choices[0].text == greedy(reference, [5, 6, 7, 8], 8).text  # token ids used as given


def test_chat_uses_the_template_streaming_and_not(served, reference):
    client = served.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is MLA?"}]
    prompt_ids = reference.tokenizer.encode_chat(messages)
    assert prompt_ids.count(reference.tokenizer.bos_token_id) == 1
    expected = greedy(reference, prompt_ids, 12)
    done = client.chat.completions.create(model="demo", messages=messages, max_tokens=12, temperature=0)
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == expected.text
    assert done.usage.prompt_tokens == len(prompt_ids)
    chunks = list(
        client.chat.completions.create(
            model="demo",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert stream_text(chunks) == (expected.text, expected.finish_reason)
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_stop_strings_and_stop_tokens_cut_the_output(served, reference):
    client = served.client()
    expected = greedy(reference, PROMPTS[1], 40, ignore_eos=True)
    start = next(
        i for i in range(8, 30) if expected.text[i : i + 2].isprintable() and expected.text[i : i + 2].strip()
    )
    stop = expected.text[start : start + 2]
    cut = expected.text[: expected.text.index(stop)]
    for stream in (False, True):
        out = client.completions.create(
            model="demo", prompt=PROMPTS[1], max_tokens=40, temperature=0, stop=[stop, "never-seen"],
            stream=stream, extra_body={"ignore_eos": True},
        )  # fmt: skip
        text, finish = stream_text(out) if stream else (out.choices[0].text, out.choices[0].finish_reason)
        assert (text, finish) == (cut, "stop")
    stop_token = expected.token_ids[6]
    upto = expected.token_ids[: expected.token_ids.index(stop_token) + 1]
    out = client.completions.create(
        model="demo",
        prompt=PROMPTS[1],
        max_tokens=40,
        temperature=0,
        extra_body={"stop_token_ids": [stop_token]},
    )
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == reference.tokenizer.decode(upto)
    assert out.usage.completion_tokens == len(upto)


def test_logprobs_equal_the_engines_scores(served, reference):
    """log p of each greedy token: the engine's score() of the same tokens (another code path), and the
    most likely of the top alternatives; chat gives the same numbers in its own shape."""
    expected = greedy(reference, PROMPTS[2], 6)
    scores = reference.score(expected.prompt_token_ids + expected.token_ids)[-len(expected.token_ids) :]
    out = served.client().completions.create(
        model="demo", prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=3
    )
    logprobs = out.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx(scores, abs=1e-4)
    assert [max(top.values()) for top in logprobs.top_logprobs] == pytest.approx(
        logprobs.token_logprobs, abs=1e-6
    )
    assert all(len(top) == 3 for top in logprobs.top_logprobs)
    raw = b"".join(reference.tokenizer.token_bytes(t) for t in expected.token_ids)
    assert raw.decode(errors="replace") == out.choices[0].text
    messages = [{"role": "user", "content": PROMPTS[2]}]
    chat_ids = reference.tokenizer.encode_chat(messages)
    chat_expected = greedy(reference, chat_ids, 4)
    chat_scores = reference.score(chat_ids + chat_expected.token_ids)[-4:]
    chat = served.client().chat.completions.create(
        model="demo", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(chat_scores, abs=1e-4)
    assert [bytes(c.bytes) for c in content] == [
        reference.tokenizer.token_bytes(t) for t in chat_expected.token_ids
    ]
    assert all(len(c.top_logprobs) == 2 for c in content)


def test_seeded_sampling_equals_the_engine(served, reference):
    client = served.client()
    options = dict(temperature=0.9, top_p=0.9, seed=7)
    expected = greedy(reference, PROMPTS[3], 12, top_k=40, **options)
    outs = [
        client.completions.create(
            model="demo", prompt=PROMPTS[3], max_tokens=12, extra_body={"top_k": 40}, **options
        )
        for _ in range(2)
    ]
    assert [o.choices[0].text for o in outs] == [expected.text] * 2


def test_16_concurrent_streaming_clients(served, reference):
    """16 streams all get the engine's tokens, while beside them one client walks away mid-stream and
    one sends a prompt too long for the context: those fail alone."""
    expected = [
        r.text for r in reference.generate(PROMPTS[:16], SamplingParams(max_tokens=24, ignore_eos=True))
    ]
    free_at_start = served.loop.engine.blocks.num_free

    async def one(client, prompt, leave_early=False):
        stream = await client.completions.create(
            model="demo",
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        text = ""
        async for chunk in stream:
            text += chunk.choices[0].text
            if leave_early:
                await stream.close()
                return None
        return text

    async def too_long(client):
        with pytest.raises(openai.BadRequestError, match="context"):
            await client.completions.create(model="demo", prompt="word " * 600, stream=True)

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0) as client:
            streams = [one(client, p) for p in PROMPTS[:16]]
            return await asyncio.gather(
                *streams, one(client, PROMPTS[16], leave_early=True), too_long(client)
            )

    assert asyncio.run(run())[:16] == expected
    wait_for(lambda: served.loop.num_active == 0 and served.loop.engine.blocks.num_free == free_at_start, 30)


def test_bad_requests_get_openai_errors(served):
    client = served.client()
    cases = [
        ({"temperature": -1}, "temperature"),
        ({"extra_body": {"max_token": 3}}, "max_token"),  # a misspelt field is refused, not ignored
        ({"n": 2}, "n"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"extra_body": {"top_k": "many"}}, "top_k"),
    ]
    for options, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="demo", prompt="x", **options)
        assert caught.value.status_code == 400
        assert caught.value.body["param"] == param and param in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="demo", prompt="word " * 600)
    assert caught.value.body["code"] == "context_length_exceeded" and "512" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="demo", messages=[])
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.AuthenticationError) as caught:
        served.client(api_key="wrong-key").completions.create(model="demo", prompt="x")
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    no_key = httpx.post(f"{served.url}/v1/completions", json={"model": "demo", "prompt": "x"})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}  # no key needed
    assert served.client().models.list().data[0].id == "demo"


def test_full_queue_429_and_disconnects_free_kv_blocks(served):
    """Streams and one plain request fill the queue: the next gets 429. Then every client goes away
    mid-answer, and the KV blocks all come back."""
    engine = served.loop.engine
    free_at_start, aborted_before = engine.blocks.num_free, _aborted(served)
    long = {"max_tokens": 480, "temperature": 0, "extra_body": {"ignore_eos": True}}

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0) as client:
            streams = [
                await client.completions.create(model="demo", prompt=p, stream=True, **long)
                for p in PROMPTS[:-1]
            ]
            for stream in streams:  # each has its first tokens: all are running
                await stream.__anext__()
            other = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0)
            plain = asyncio.ensure_future(other.completions.create(model="demo", prompt=PROMPTS[-1], **long))
            await asyncio.sleep(0.5)
            assert served.loop.num_active == MAX_QUEUE
            with pytest.raises(openai.RateLimitError) as caught:
                await client.completions.create(model="demo", prompt="x", max_tokens=2)
            assert caught.value.status_code == 429 and caught.value.body["code"] == "queue_full"
            assert engine.blocks.num_free < free_at_start
            # The plain request's client gives up now, while its answer is certainly unfinished (a
            # client timeout raced the 480 tokens: on a fast machine the answer came first).
            plain.cancel()
            with pytest.raises(asyncio.CancelledError):
                await plain
            for stream in streams:
                await stream.close()
            await other.close()

    asyncio.run(run())
    wait_for(
        lambda: engine.blocks.num_free == free_at_start and served.loop.num_active == 0, 30, "freed blocks"
    )
    assert not engine.scheduler.has_unfinished
    assert _aborted(served) == aborted_before + MAX_QUEUE


def _aborted(served) -> float:
    metrics = httpx.get(f"{served.url}/metrics").text
    line = 'mlapipe:request_success_total{finished_reason="abort"} '
    return next((float(l[len(line) :]) for l in metrics.splitlines() if l.startswith(line)), 0.0)


def test_metrics_are_the_engines_registry(served):
    served.client().completions.create(model="demo", prompt="x", max_tokens=3, temperature=0)
    metrics = httpx.get(f"{served.url}/metrics").text
    for name in ("time_to_first_token_seconds_count", "generation_tokens_total", "kv_cache_usage_perc"):
        assert f"mlapipe:{name}" in metrics


def test_503_while_loading_and_after_a_stage_failure(model_path, ray_local):
    import ray

    loaded = threading.Event()

    def build():
        loaded.wait()
        return Engine(model_path, pipeline=1, use_ray=True, deadline_s=10, progress=False)

    served = start_server(build, api_key=None)
    try:
        client = served.client()
        health = httpx.get(f"{served.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        with pytest.raises(openai.APIStatusError, match="loading") as caught:
            client.completions.create(model="demo", prompt="x")
        assert caught.value.status_code == 503
        loaded.set()
        wait_for(lambda: served.loop.state == READY, what="the pipeline to load")
        assert client.completions.create(model="demo", prompt="x", max_tokens=2).usage.completion_tokens == 2
        stream = client.completions.create(
            model="demo", prompt="x", max_tokens=400, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))
        ray.kill(served.loop.engine.executor.actors[0], no_restart=True)
        with pytest.raises(openai.APIError, match="pipeline stage 0"):
            list(stream)
        health = httpx.get(f"{served.url}/health")
        assert health.status_code == 503 and "pipeline stage 0" in health.json()["reason"]
        with pytest.raises(openai.APIStatusError, match="pipeline stage 0") as caught:
            client.completions.create(model="demo", prompt="x")
        assert caught.value.status_code == 503
    finally:
        loaded.set()
        served.stop()


def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlapipe.runtime.cli",
            "--log-level",
            "INFO",
            "serve",
            "--demo",
            "--port",
            str(port),
            "--decode-steps",
            "2",
            "--shutdown-timeout",
            "300",
        ],  # fmt: skip
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, MLAPIPE_CACHE=os.path.dirname(demo_model_path())),
    )
    try:
        wait_for(lambda: _healthy(url), 120, "the server")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        results, first_tokens = [None] * 4, threading.Barrier(5, timeout=60)

        def read(i):
            stream = client.completions.create(
                model="demo", prompt=PROMPTS[i], max_tokens=400, temperature=0, stream=True, extra_body={"ignore_eos": True},
                stream_options={"include_usage": True},
            )  # fmt: skip
            chunks = iter(stream)
            first = [next(chunks)]
            first_tokens.wait()
            results[i] = first + list(chunks)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        first_tokens.wait()
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: _refused(url), 30, "the server to stop accepting")
        for thread in threads:
            thread.join(120)
        assert process.wait(60) == 0
        log = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert "Waiting for connections to close" in log, log  # uvicorn's word: responses were in progress
    for chunks in results:  # and every one was answered to the end
        assert chunks is not None and stream_text(chunks)[1] == "length"
        assert chunks[-1].usage.completion_tokens == 400


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.TransportError:
        return False


def _refused(url: str) -> bool:
    """Whether a new connection goes unserved: refused, or (a probe that raced the listener's close,
    seen on CI) accepted by the kernel and reset before any response."""
    try:
        httpx.get(f"{url}/health", timeout=1)
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        return True
    return False


def test_bench_serve_reports_what_it_measured(served, capsys):
    from mlapipe.runtime import bench_serve

    argv = ["--url", served.url, "--api-key", KEY, "--clients", "2", "--duration", "1", "--max-tokens", "8"]
    assert bench_serve.main(argv) == 0
    out = capsys.readouterr().out
    requests = int(next(line for line in out.splitlines() if line.startswith("requests")).split()[1])
    assert requests >= 2 and "(0 errors)" in out
    assert f"output tokens  {requests * 8:7d}" in out  # ignore_eos: every request made max_tokens
    for row in ("TTFT", "inter-chunk", "TPOT"):
        assert row in out and "nan" not in out.split(row)[1].split("\n")[0]
