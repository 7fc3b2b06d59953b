"""`mlapipe bench`, in the spirit of llama-bench: prompt processing (pp), generation (tg) and generation
at depth (tg@D) in tokens per second, mean +- stddev over repetitions, swept over pipeline size, ubatch,
amb and concurrent sequences. Runs on a GGUF file or on random weights of a named shape.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from dataclasses import dataclass

from mlapipe.runtime.engine import Engine
from mlapipe.runtime.planner import stage_tensor_names
from mlapipe.runtime.sampling_params import SamplingParams
from mlapipe.runtime.shapes import SHAPES, random_spec
from mlapipe.runtime.timeline import render


@dataclass(frozen=True)
class Test:
    name: str
    prompt: int  # prompt tokens per sequence
    generate: int  # generated tokens per sequence

    @property
    def is_prompt_test(self) -> bool:
        return self.generate == 0


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure prompt and generation speed (llama-bench style)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-m", "--model", help="GGUF file")
    src.add_argument("--shape", choices=sorted(SHAPES), help="random weights of a named model shape")
    src.add_argument("--demo", action="store_true", help="the tiny random demo model (as generate --demo)")
    p.add_argument("--layers", type=int, default=None, help="layers of the random-weight shape")
    p.add_argument(
        "--wtype",
        type=lambda text: [v for v in text.split(",") if v],
        default=[None],
        help="weight types (q8_0, q4_k, bf16, ...) or recipes (UD-Q2_K_XL, Q4_K_M, ...) of the random "
        "weights, comma-separated to compare them in one run",
    )
    p.add_argument("-p", "--n-prompt", type=_ints, default=[512], help="prompt sizes, e.g. 512,2048")
    p.add_argument("-n", "--n-gen", type=_ints, default=[128], help="generation sizes")
    p.add_argument(
        "-gp",
        "--gen-at-depth",
        action="append",
        default=[],
        type=_ints,
        metavar="D,N",
        help="N tokens generated after a D-token prompt (repeatable)",
    )
    p.add_argument("--pipeline", type=_ints, default=[1], help="pipeline sizes to sweep")
    p.add_argument(
        "-ub", "--ubatch", type=_ints, default=[None], help="micro-batch token budgets (default: the engine's)"
    )
    p.add_argument("--amb", type=_floats, default=[0.0], help="attention max batch in MiB (0 = unlimited)")
    p.add_argument("--concurrent", type=_ints, default=[1], help="concurrent sequences")
    p.add_argument("--decode-steps", type=_ints, default=[16], help="decode tokens per driver round trip")
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--transport", default=None)
    p.add_argument("--devices", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="size the KV cache from this fraction of each device's memory (default: just what the tests need)",
    )
    p.add_argument(
        "--dequantize", action="store_true", help="decode every weight at load (the bf16 baseline)"
    )
    p.add_argument(
        "--timeline",
        action="store_true",
        help="after each test, a per-stage text timeline of its last repetition (where stages wait)",
    )


def run(args) -> int:
    path = args.model
    if args.demo:
        from mlapipe.runtime.tiny_models import demo_model_path

        path = demo_model_path()
    if path and args.wtype != [None]:
        raise ValueError("--wtype makes random weights of a --shape; a GGUF file has its own types")
    tests = [Test(f"pp{p}", p, 0) for p in args.n_prompt if p > 0]
    tests += [Test(f"tg{n}", 1, n) for n in args.n_gen if n > 0]
    tests += [Test(f"tg{n}@d{d}", d, n) for d, n in args.gen_at_depth]
    longest = max(t.prompt + t.generate for t in tests) + 1
    header = ["model", "wtype", "pipeline", "ubatch", "amb", "steps", "seqs", "test", "t/s"]
    rows, reports, figures = [], [], []  # on stdout: the table, each engine's memory report, timelines
    sweep = itertools.product(args.wtype, args.pipeline, args.ubatch, args.amb, args.decode_steps)
    for wtype, pipeline, ubatch, amb, decode_steps in sweep:
        model = path or random_spec(args.shape, args.layers, wtype=wtype)
        max_seqs = max(args.concurrent)
        blocks = max_seqs * -(-longest // 64) + 8
        with Engine(
            model,
            pipeline=pipeline,
            ubatch=ubatch,
            amb=amb,
            n_ctx=longest,
            kv_blocks=None if args.gpu_memory_utilization else blocks,
            kv_memory_fraction=args.gpu_memory_utilization,
            dequantize_weights=args.dequantize,
            transport=args.transport,
            devices=args.devices,
            decode_steps=decode_steps,
        ) as engine:
            name = args.shape or engine.model.path
            kind = (wtype or ("file" if path else "BF16")) + (" (dequantized)" if args.dequantize else "")
            reports.append(memory_report(engine, f"{name} {kind}"))
            for seqs, test in itertools.product(args.concurrent, tests):
                rates = []
                for i in range(args.repetitions + 1):
                    if args.timeline and i == args.repetitions:
                        engine.executor.timelines()  # drops the earlier repetitions' spans
                    rates.append(_measure(engine, test, seqs, seed=i))
                rates = rates[1:]
                if args.timeline:
                    label = f"{name} {kind}, pipeline {pipeline}, ubatch {engine.ubatch}, {seqs} seqs, {test.name}"
                    figures.append(f"{label}, last repetition:\n{render(engine.executor.timelines())}")
                spread = statistics.stdev(rates) if len(rates) > 1 else 0.0
                rows.append(
                    [
                        name,
                        kind,
                        pipeline,
                        engine.ubatch,
                        f"{amb:g}",
                        decode_steps,
                        seqs,
                        test.name,
                        f"{statistics.mean(rates):.2f} ± {spread:.2f}",
                    ]
                )
                print(
                    f"bench: {' '.join(f'{h} {v}' for h, v in zip(header[1:], rows[-1][1:]))}",
                    file=sys.stderr,
                )
    print(_markdown(header, rows))
    for report in reports:
        print(f"\n{report}")
    for figure in figures:
        print(f"\n{figure}")
    return 0


def _measure(engine: Engine, test: Test, seqs: int, seed: int) -> float:
    """Tokens per second of one repetition (the first one, a warm-up, is dropped by the caller)."""
    vocab = engine.config.vocab_size
    prompts = [
        [(seed * 7919 + s * 104729 + i * 31) % (vocab - 10) + 5 for i in range(test.prompt)]
        for s in range(seqs)
    ]
    params = SamplingParams(max_tokens=max(1, test.generate), ignore_eos=True)
    started = time.perf_counter()
    ids = {engine.add_request(p, params) for p in prompts}
    first_token: dict[str, float] = {}
    tokens: dict[str, int] = {}  # tokens generated so far, by request
    history = []  # (time, tokens generated over all sequences) after each step
    finished = 0
    while finished < len(ids):
        advanced, done = engine.step()
        now = time.perf_counter()
        for request in advanced + done:
            first_token.setdefault(request.request_id, now)
            tokens[request.request_id] = len(request.output_token_ids)
        history.append((now, sum(tokens.values())))
        finished += len(done)
    ended = time.perf_counter()
    if test.is_prompt_test:
        return seqs * test.prompt / (ended - started)
    # Decode speed from the moment every sequence is past its prompt. Tokens that came by then are not
    # counted: the first of each sequence, and any more a decode round brought along with it.
    decode_started = max(first_token.values())
    tokens_then = next(count for when, count in history if when >= decode_started)
    return (sum(tokens.values()) - tokens_then) / max(ended - decode_started, 1e-9)


def memory_report(engine: Engine, name: str) -> str:
    """Per stage: the weights' bytes in the file (or recipe), as planned on the device (quantized blocks
    + decoded tensors) and as loading allocated them, and the KV cache."""
    stats = engine.executor.stats()
    plan = engine.plan
    lines = [f"memory of {name} ({engine.blocks.num_blocks * engine.blocks.block_size:,} KV tokens):"]
    for stage, info in zip(plan.stages if plan else [], stats):
        file_bytes = sum(engine.model.tensors[n].num_bytes for n in stage_tensor_names(engine.model, stage))
        allocated = info.get("weight_bytes_allocated", 0)
        ratio = f"{allocated / file_bytes:.3f}x the file's" if allocated else "n/a on CPU"
        lines.append(
            f"  stage {stage.stage}: weights planned {stage.weight_bytes / 2**30:.3f} GiB, in the file "
            f"{file_bytes / 2**30:.3f} GiB, allocated {allocated / 2**30:.3f} GiB ({ratio}); "
            f"KV cache {info.get('kv_cache_bytes', 0) / 2**30:.3f} GiB"
        )
    return "\n".join(lines)


def _markdown(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
