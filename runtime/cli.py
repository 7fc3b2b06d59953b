"""mlapipe command line: generate | batch | bench | perplexity | inspect | serve."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from mlapipe.runtime import arg_types, bench, inspect_model


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, streaming it")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-m", "--model", help="GGUF file")
    src.add_argument(
        "--demo", action="store_true", help="a tiny random DeepSeek-V3-style model, built on first use"
    )
    p.add_argument("-p", "--prompt", required=True, type=arg_types.utf8_text)
    p.add_argument(
        "-n", "--max-tokens", type=arg_types.int_at_least(1), default=None, help="tokens to generate (default 64)"
    )
    p.add_argument("--temp", type=arg_types.finite_float, default=0.0)
    p.add_argument("--top-k", type=arg_types.int_at_least(0), default=0)
    p.add_argument("--top-p", type=arg_types.finite_float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_engine_options(p)


def _add_batch(sub) -> None:
    p = sub.add_parser("batch", help="run prompts from a JSONL file, writing each result as it finishes")
    p.add_argument(
        "--input", required=True, type=arg_types.existing_file, help='JSONL: {"id", "prompt": text or token ids, ...}'
    )
    p.add_argument(
        "--output",
        required=True,
        type=arg_types.output_file,
        help="JSONL results; re-running skips ids already in it",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-m", "--model", help="GGUF file")
    src.add_argument("--demo", action="store_true", help="the tiny random demo model")
    p.add_argument(
        "-n", "--max-tokens", type=arg_types.int_at_least(1), default=64, help="default max tokens per request"
    )
    p.add_argument("--temp", type=arg_types.finite_float, default=0.0, help="default temperature")
    p.add_argument("--top-k", type=arg_types.int_at_least(0), default=0)
    p.add_argument("--top-p", type=arg_types.finite_float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_engine_options(p)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI API (completions, chat, streaming) over HTTP")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-m", "--model", help="GGUF file")
    src.add_argument("--demo", action="store_true", help="the tiny random demo model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests in progress (running or waiting) at most; more are refused with 429",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("MLAPIPE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $MLAPIPE_API_KEY; none: no key)",
    )
    p.add_argument(
        "--served-model-name", default=None, help="the model's name in the API (default: file stem)"
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds SIGTERM waits for requests in progress before failing them",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: all cores but one, which the HTTP event loop needs)",
    )
    _add_engine_options(p)


def _add_perplexity(sub) -> None:
    p = sub.add_parser(
        "perplexity",
        help="perplexity over a text file, as llama-perplexity computes it",
        description="Cuts the tokenized text into chunks of -c tokens (BOS first), scores the second half "
        "of each and prints the running estimate [i]ppl and the final PPL +/- its standard error.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-m", "--model", help="GGUF file")
    src.add_argument("--demo", action="store_true", help="the tiny random demo model")
    p.add_argument(
        "-f", "--file", required=True, type=arg_types.existing_file, help="text file (e.g. wikitext-2's wiki.test.raw)"
    )
    p.add_argument(
        "--chunks", type=arg_types.int_at_least(1), default=None, help="evaluate at most N chunks (default: all)"
    )
    _add_engine_options(p)
    p.set_defaults(ctx_size=512)  # -c: the chunk length, and the engine's n_ctx


def _add_engine_options(p) -> None:
    """Options passed to Engine only when given, so the engine's own defaults apply otherwise."""
    p.add_argument("--pipeline", type=arg_types.int_at_least(1), default=None, help="pipeline stages")
    p.add_argument(
        "--amb", type=arg_types.amb_values, default=None, help="attention max batch in MiB, or one per stage"
    )
    p.add_argument(
        "--ubatch",
        type=arg_types.int_at_least(1),
        default=None,
        help="tokens per micro-batch (default 8192 on GPUs, 512 on CPU)",
    )
    p.add_argument(
        "-c",
        "--ctx-size",
        type=arg_types.int_at_least(2),
        default=None,
        help="context length (n_ctx; default 4096 or the model's maximum if smaller)",
    )
    p.add_argument("--split", type=arg_types.float_list, default=None, help="layer proportions per stage, e.g. 3,1")
    p.add_argument(
        "--transport",
        default=None,
        choices=["nccl", "gloo", "grpc"],
        help="default: nccl on GPUs, gloo on CPU",
    )
    p.add_argument(
        "--decode-steps",
        type=arg_types.int_at_least(1),
        default=None,
        help="decode tokens per driver round trip (default 16; 1 streams every token as it comes)",
    )
    p.add_argument(
        "--address", default=None, help="an existing Ray cluster (else RAY_ADDRESS or a local one)"
    )
    p.add_argument(
        "--metrics-port",
        type=arg_types.port,
        default=None,
        help="serve Prometheus metrics on http://HOST:PORT/metrics (HOST: --metrics-host)",
    )
    p.add_argument(
        "--metrics-host",
        default=None,
        help="address of the metrics server (default 127.0.0.1; 0.0.0.0 for a cluster's Prometheus)",
    )
    p.add_argument(
        "--transport-tls",
        default=None,
        metavar="CERT,KEY,CA[,NAME]",
        help="mutual TLS on the grpc transport: this node's certificate and key, the cluster's CA, and "
        "optionally the name the certificates are issued for (deploy/README.md)",
    )
    add_memory_options(p)


def add_memory_options(p) -> None:
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="fraction of each device's memory for weights, compute and KV cache; the cache gets what is "
        "left (default 0.9 on GPUs)",
    )
    p.add_argument(
        "--dequantize", action="store_true", help="decode every weight at load instead of keeping GGUF blocks"
    )


class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes as one line on stderr (exit 2), pointing at --help, instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"mlapipe: error: {message} (see {self.prog} --help)\n")


def engine_options(args) -> dict:
    """Engine keywords from the options the user gave; refuses ones this Engine does not take yet."""
    import inspect

    from mlapipe.runtime.engine import Engine

    given = {
        "pipeline": args.pipeline,
        "amb": args.amb,
        "ubatch": args.ubatch,
        "n_ctx": args.ctx_size,
        "split": args.split,
        "transport": args.transport,
        "decode_steps": args.decode_steps,
        "address": args.address,
        "metrics_port": getattr(args, "metrics_port", None),
        "metrics_host": getattr(args, "metrics_host", None),
        "transport_tls": getattr(args, "transport_tls", None),
        "kv_memory_fraction": getattr(args, "gpu_memory_utilization", None),
        "dequantize_weights": getattr(args, "dequantize", False) or None,
    }
    given = {key: value for key, value in given.items() if value is not None}
    accepted = inspect.signature(Engine).parameters
    unknown = [key for key in given if key not in accepted]
    if unknown:
        raise ValueError(f"this engine does not support {', '.join(unknown)} yet")
    if getattr(args, "no_progress", False) and "progress" in accepted:  # a display choice, not a knob
        given["progress"] = False
    return given


def cmd_generate(args) -> int:
    from mlapipe.runtime.display import finish_description, printable, speed_summary
    from mlapipe.runtime.engine import Engine
    from mlapipe.runtime.sampling_params import SamplingParams
    from mlapipe.runtime.tiny_models import demo_model_path

    path = demo_model_path() if args.demo else args.model
    SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, seed=args.seed)  # checked now
    prompt, prompt_input, n_ctx, room = _prompt_room(path, args)  # the file's header only, no weights
    with Engine(path, **engine_options(args)) as engine:
        params = SamplingParams(
            max_tokens=args.max_tokens or max(1, min(64, room)),
            temperature=args.temp,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        prompt_tokens = n_ctx - room
        print(printable(prompt), end="", flush=True)
        count, reason, first, last = 0, None, None, None
        started = time.perf_counter()
        for event in engine.stream(prompt_input, params):
            last = time.perf_counter()
            first = first or last
            print(printable(event.text), end="", flush=True)
            count += 1
            reason = event.finish_reason or reason
        finish = finish_description(reason, prompt_tokens, count, params.max_tokens, engine.n_ctx)
        speed = speed_summary(prompt_tokens, count, started, first, last)
        print(f"\n[{count} tokens, finish: {finish}; {speed}; model {path}]", file=sys.stderr)
    return 0


def _prompt_room(path: str, args) -> tuple[str, str | list[int], int, int]:
    """(the prompt's text, what the engine runs: that text or, with --chat, the template's token ids,
    n_ctx, tokens that can follow it), from the file's metadata and tokenizer; refuses an -n that cannot
    fit, saying why, before the engine loads the model."""
    from mlapipe.runtime.engine import DEFAULT_N_CTX, open_tokenizer
    from mlapipe.runtime.gguf_model import GGUFModel

    model = GGUFModel(path)
    tokenizer = open_tokenizer(model)
    prompt = prompt_input = args.prompt
    if args.chat:  # the template writes BOS itself: its ids are run as given, with no second BOS
        messages = [{"role": "user", "content": prompt}]
        prompt, prompt_input = tokenizer.apply_chat_template(messages), tokenizer.encode_chat(messages)
    maximum = model.config.context_length
    if args.ctx_size is not None and args.ctx_size > maximum:
        raise ValueError(
            f"n_ctx={args.ctx_size} is above the model's maximum context of {maximum} tokens "
            f"({model.path}: context_length)"
        )
    n_ctx = args.ctx_size or min(DEFAULT_N_CTX, maximum)
    room = n_ctx - len(prompt_input if args.chat else tokenizer.encode(prompt))
    if args.max_tokens is not None and args.max_tokens > room:
        raise ValueError(
            f"-n {args.max_tokens} does not fit: the prompt takes {n_ctx - room} of the {n_ctx}-token "
            f"context, so at most {max(room, 0)} tokens can follow (lower -n, or raise -c up to the "
            f"model's {maximum})"
        )
    return prompt, prompt_input, n_ctx, room


def cmd_perplexity(args) -> int:
    from mlapipe.runtime.engine import Engine
    from mlapipe.runtime.perplexity import perplexity
    from mlapipe.runtime.tiny_models import demo_model_path

    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {args.file}: {e}") from None
    path = demo_model_path() if args.demo else args.model
    with Engine(path, **engine_options(args)) as engine:
        result = perplexity(
            engine,
            text,
            args.ctx_size,
            args.chunks,
            on_chunk=lambda i, ppl: print(f"[{i}]{ppl:.4f},", end="", flush=True),
            on_start=lambda tokens, chunks: print(
                f"perplexity: {path}: {tokens} tokens, {chunks} chunks of n_ctx={args.ctx_size}, "
                "scoring the second half of each",
                file=sys.stderr,
            ),
        )
    print()
    print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.uncertainty:.5f}")
    print(
        f"[{result.num_chunks} chunks of {args.ctx_size} tokens, {result.num_scored} scored]", file=sys.stderr
    )
    return 0


def cmd_batch(args) -> int:
    from mlapipe.runtime.batch import describe_failures, read_done_ids, read_requests, run_batch
    from mlapipe.runtime.engine import Engine
    from mlapipe.runtime.sampling_params import SamplingParams
    from mlapipe.runtime.tiny_models import demo_model_path

    defaults = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    items = read_requests(args.input, defaults)  # bad lines fail here, before the model loads
    done = read_done_ids(args.output)
    if all(item.request_id in done for item in items):
        print(f"[all {len(items)} requests already done; {args.output}]", file=sys.stderr)
        return 0
    path = demo_model_path() if args.demo else args.model
    previous = signal.signal(signal.SIGTERM, _terminate)  # kill (SIGTERM) stops as Ctrl-C does
    try:
        with Engine(path, **engine_options(args)) as engine:
            signal.signal(signal.SIGTERM, _terminate)  # again: ray.init installs its own handler
            summary = run_batch(engine, items, args.output, progress=not args.no_progress)
    except KeyboardInterrupt as stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second kill does not cut the message short
        what = "terminated" if isinstance(stop, Terminated) else "interrupted"
        print(
            f"mlapipe: {what}; results finished so far are in {args.output}; "
            "re-run the same command to resume",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM if isinstance(stop, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(
        f"[{summary.written} written, {summary.skipped} already done, "
        f"{len(summary.refused)} refused, {len(summary.failed)} failed; {args.output}]",
        file=sys.stderr,
    )
    if summary.failed or summary.refused:
        print(f"mlapipe: error: {describe_failures(summary)}", file=sys.stderr)
        return 1
    return 0


def _set_serving_threads(threads: int | None) -> int:
    """On CPU the engine's matmuls run on OpenMP threads whose barriers spin: a thread that shares its
    core with the HTTP event loop stalls every step (bench_serve on a busy 2-core machine: 20 tokens/s
    with both cores for torch, 160-390 with one). Default: leave the event loop a core."""
    import torch

    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    torch.set_num_threads(threads or max(1, cores - 1))
    return torch.get_num_threads()  # what the engine's CPU stages use too (Engine's cpu_threads)


def cmd_serve(args) -> int:
    import functools
    import pathlib

    from mlapipe.runtime.engine import Engine
    from mlapipe.runtime.serve_loop import EngineLoop
    from mlapipe.runtime.server import serve
    from mlapipe.runtime.tiny_models import demo_model_path

    path = demo_model_path() if args.demo else args.model
    name = args.served_model_name or ("demo" if args.demo else pathlib.Path(path).stem)
    options = engine_options(args)  # unknown options fail here, before the server starts
    threads = _set_serving_threads(args.threads)
    loop = EngineLoop(
        functools.partial(Engine, path, progress=False, cpu_threads=threads, **options),
        max_queue=args.max_queue,
    )
    loop.on_ready.append(lambda: print(f"mlapipe: {name} loaded, serving", file=sys.stderr, flush=True))

    def listening(url: str) -> None:
        print(
            f"mlapipe: loading {path}; OpenAI API on {url}/v1 (503 until loaded)", file=sys.stderr, flush=True
        )

    return serve(
        loop,
        name,
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level,
        on_listening=listening,
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so both stop a batch the same way."""


def _terminate(signum, frame) -> None:
    raise Terminated


def _version() -> str:
    import mlapipe

    return mlapipe.__version__


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="mlapipe", description="DeepSeek MLA + MoE inference from GGUF files")
    parser.add_argument("--version", action="version", version=f"mlapipe {_version()}")
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default="WARNING",
        help="python logging level (INFO shows each request's id and end)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_batch(sub)
    inspect_model.add_parser(sub)
    _add_perplexity(sub)
    _add_serve(sub)
    bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed as one line
        return done.code if isinstance(done.code, int) else 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from mlapipe.runtime.engine import PromptError
    from mlapipe.runtime.errors import ClusterUnreachable
    from mlapipe.runtime.gguf_model import ModelFileError
    from mlapipe.runtime.tokenizer import TokenizerError

    try:
        commands = {
            "generate": cmd_generate,
            "batch": cmd_batch,
            "bench": bench.run,
            "inspect": inspect_model.run,
            "perplexity": cmd_perplexity,
            "serve": cmd_serve,
        }
        return commands[args.command](args)
    except (ModelFileError, PromptError, TokenizerError, ClusterUnreachable, ValueError) as e:
        print(f"mlapipe: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
