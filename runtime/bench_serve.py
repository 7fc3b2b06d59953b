"""Load test of `mlapipe serve`: N concurrent streaming clients for a bounded time.

    python -m mlapipe.runtime.bench_serve --demo --clients 16 --duration 20
    python -m mlapipe.runtime.bench_serve --url http://127.0.0.1:8000 --model NAME --clients 64

Without --url it starts `mlapipe serve` itself (--demo or -m FILE, on a free port) and stops it with
SIGTERM afterwards. Each client sends streaming /v1/completions one after another until the time is up
(requests in progress then finish). Every request generates --max-tokens tokens (ignore_eos), so runs
compare. Printed last: requests/s, output tokens/s, and p50 / p99 of time to first token, of the gaps
between streamed chunks (inter-token latency as clients see it: a decode round arrives as one chunk), and
of each request's time per output token after the first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

PROMPT = "Pipeline parallelism splits the layers across GPUs, and micro-batches keep every stage busy."


@dataclass
class Sample:
    ttft: float
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    duration: float = 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def one_request(client, url: str, body: dict) -> Sample:
    started = time.perf_counter()
    last = first = None
    sample = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            now = time.perf_counter()
            if chunk.get("usage"):
                sample.tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                if first is None:
                    first = now
                    sample = Sample(ttft=now - started)
                else:
                    sample.gaps.append(now - last)
                last = now
    if sample is None:
        raise RuntimeError("the stream ended without text")
    sample.duration = last - first
    return sample


async def run_clients(
    url: str, model: str, clients: int, duration: float, max_tokens: int, api_key: str | None
):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    samples: list[Sample] = []
    errors: list[str] = []
    deadline = time.perf_counter() + duration

    async def client_loop(index: int, client) -> None:
        k = 0
        while time.perf_counter() < deadline:
            body = {
                "model": model,
                "prompt": f"Client {index}, request {k}: {PROMPT}",
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            k += 1
            try:
                samples.append(await one_request(client, url, body))
            except Exception as e:  # counted and shown, the run goes on
                errors.append(f"{type(e).__name__}: {e}")

    started = time.perf_counter()
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(600.0)) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
    return samples, errors, time.perf_counter() - started


def report(samples: list[Sample], errors: list[str], elapsed: float, args) -> str:
    ms = lambda values, q: f"{1e3 * percentile(values, q):9.1f}"
    ttft = [s.ttft for s in samples]
    gaps = [g for s in samples for g in s.gaps]
    tpot = [s.duration / (s.tokens - 1) for s in samples if s.tokens > 1]
    tokens = sum(s.tokens for s in samples)
    lines = [
        f"bench_serve: {args.clients} clients, {elapsed:.1f} s (new requests for {args.duration:g} s), "
        f"max_tokens {args.max_tokens}, {args.what}",
        f"requests       {len(samples):7d}   {len(samples) / elapsed:8.2f} req/s   ({len(errors)} errors)",
        f"output tokens  {tokens:7d}   {tokens / elapsed:8.1f} tok/s",
        "                     p50        p99   (ms)",
        f"TTFT            {ms(ttft, 50)}  {ms(ttft, 99)}",
        f"inter-chunk     {ms(gaps, 50)}  {ms(gaps, 99)}   gaps between streamed chunks",
        f"TPOT            {ms(tpot, 50)}  {ms(tpot, 99)}   per request: (last - first token) / (tokens - 1)",
    ]
    if errors:
        lines.insert(1, f"first error: {errors[0]}")
    return "\n".join(lines)


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "mlapipe.runtime.cli", "serve", "--port", str(port)]
    command += ["--demo"] if args.demo else ["-m", args.model_file]
    command += ["--max-queue", str(max(256, args.clients))]
    for option, value in (("--decode-steps", args.decode_steps), ("--pipeline", args.pipeline)):
        if value is not None:
            command += [option, str(value)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}"


def wait_healthy(url: str, process: subprocess.Popen | None, timeout: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"bench_serve: the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"bench_serve: {url}/health did not answer 200 within {timeout:g} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mlapipe.runtime.bench_serve", description=__doc__.split("\n")[0]
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--demo", action="store_true", help="start `mlapipe serve --demo` and bench it")
    target.add_argument("-m", "--model-file", help="start `mlapipe serve -m FILE` and bench it")
    p.add_argument("--model", default=None, help="model name in the requests (default: the server's)")
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    p.add_argument("--duration", type=float, default=20.0, help="seconds during which clients send requests")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--decode-steps", type=int, default=None, help="the started server's --decode-steps")
    p.add_argument("--pipeline", type=int, default=None, help="the started server's --pipeline")
    p.add_argument("--api-key", default=os.environ.get("MLAPIPE_API_KEY"))
    args = p.parse_args(argv)
    try:
        import httpx
    except ImportError:
        raise SystemExit("bench_serve needs httpx: pip install httpx") from None
    process = None
    url = args.url
    if url is None:
        process, url = start_server(args)
    try:
        wait_healthy(url, process)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = args.model or httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]
        steps = f", decode_steps {args.decode_steps}" if args.decode_steps else ""
        args.what = f"model {model}{steps}" + ("" if process is None else " (server started here)")
        samples, errors, elapsed = asyncio.run(
            run_clients(url, model, args.clients, args.duration, args.max_tokens, args.api_key)
        )
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(120)
    print(report(samples, errors, elapsed, args))
    return 1 if errors and not samples else 0


if __name__ == "__main__":
    sys.exit(main())
