"""Where a prompt's prefill time goes: wall time against GPU kernel time, kernel by kernel, one GPU.

python -m mlapipe.workers.bench.profile_prefill [--shape v2-lite] [--tokens 512] [--prompts 4] [--wtype q8_0]

Wall time per prompt well above the GPU time per prompt means the host (launches, syncs, Python) bounds
prefill; the two close means the kernels do, and the table says which.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from mlapipe.runtime.engine import Engine
from mlapipe.runtime.sampling_params import SamplingParams
from mlapipe.runtime.shapes import random_spec
from mlapipe.workers.bench.profile_decode import print_kernels_per_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="v2-lite")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per prompt")
    parser.add_argument("--prompts", type=int, default=4, help="prompts profiled, one after another")
    parser.add_argument("--ubatch", type=int, default=2048, help="prefill tokens per micro-batch")
    parser.add_argument("--wtype", default=None, help="weight type or recipe (runtime/recipes.py); default BF16")
    args = parser.parse_args()
    with Engine(
        random_spec(args.shape, wtype=args.wtype),
        n_ctx=args.tokens + 16,
        kv_blocks=(args.tokens // 16 + 2) * 2,
        devices="cuda",
        ubatch=args.ubatch,
    ) as engine:
        params = SamplingParams(max_tokens=1, ignore_eos=True)

        def prompt(i: int) -> list[int]:
            return [(7 * i + t) % 1000 + 5 for t in range(args.tokens)]

        engine.generate([prompt(0)], params)  # compile and autotune
        engine.generate([prompt(1)], params)
        torch.cuda.synchronize()
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            started = time.perf_counter()
            for i in range(args.prompts):
                engine.generate([prompt(i + 2)], params)
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
        print(
            f"{args.prompts} prompts of {args.tokens} tokens, one at a time: {elapsed / args.prompts * 1e3:.2f} ms "
            f"wall per prompt ({args.tokens * args.prompts / elapsed:,.0f} t/s, profiler on)"
        )
        print_kernels_per_step(prof, args.prompts, unit="prompt")
        print_host_ops(prof, args.prompts)
        python_profile(engine, prompt, params, args.prompts)


def python_profile(engine, prompt, params, prompts: int, top: int = 25) -> None:
    """The same prompts under cProfile (torch profiler off): the Python functions the host spends on."""
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for i in range(prompts):
        engine.generate([prompt(i + 100)], params)
    torch.cuda.synchronize()
    profiler.disable()
    elapsed = time.perf_counter() - started
    print(f"under cProfile: {elapsed / prompts * 1e3:.2f} ms wall per prompt; by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def print_host_ops(prof, prompts: int, top: int = 25) -> None:
    """The host-side operations with the most self time per prompt (Python launches, torch ops)."""
    rows = [
        (event.self_cpu_time_total / prompts, event.count / prompts, event.key)
        for event in prof.key_averages()
        if event.device_type == torch.autograd.DeviceType.CPU and event.self_cpu_time_total > 0
    ]
    rows.sort(reverse=True)
    print(f"host self time per prompt {sum(r[0] for r in rows) / 1e3:.2f} ms; the largest:")
    print(f"{'us/prompt':>10} {'n/prompt':>9} {'us/call':>8}  host op")
    for us, n, name in rows[:top]:
        print(f"{us:10.1f} {n:9.1f} {us / n:8.2f}  {name[:100]}")


if __name__ == "__main__":
    main()
