"""Where a decode step's time goes: torch profiler over a few steps of a random-weight model, one GPU.

python -m mlapipe.workers.bench.profile_decode [--shape v2-lite] [--seqs 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from mlapipe.runtime.engine import Engine
from mlapipe.runtime.sampling_params import SamplingParams
from mlapipe.runtime.shapes import random_spec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="v2-lite")
    parser.add_argument("--seqs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32, help="decode steps to profile")
    parser.add_argument("--decode-steps", type=int, default=16, help="decode steps per driver round trip")
    parser.add_argument("--pipeline", type=int, default=1)
    parser.add_argument("--wtype", default=None, help="weight type or recipe (runtime/recipes.py); default BF16")
    args = parser.parse_args()
    with Engine(
        random_spec(args.shape, wtype=args.wtype),
        n_ctx=512,
        kv_blocks=8 * args.seqs + 8,
        devices="cuda",
        decode_steps=args.decode_steps,
        pipeline=args.pipeline,
    ) as engine:
        prompts = [[5 + i, 6, 7, 8] for i in range(args.seqs)]
        engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))  # capture and compile
        for p in prompts:
            engine.add_request(p, SamplingParams(max_tokens=args.steps + 5, ignore_eos=True))
        engine.step()  # prefill
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            started = time.perf_counter()
            done = 0
            while done < args.steps:
                advanced, _ = engine.step()
                done = max(len(r.output_token_ids) for r in advanced) - 1 if advanced else done
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
        print(
            f"{done} decode steps of {args.seqs} sequence(s), {args.decode_steps} per driver round trip: "
            f"{elapsed / done * 1e3:.2f} ms per step"
        )
        print_kernels_per_step(prof, done)


def print_kernels_per_step(prof, steps: int, unit: str = "step") -> None:
    """Every GPU kernel of the profiled steps (or prompts: `unit`): launches and time per unit, largest first."""
    rows = []
    for event in prof.key_averages():
        gpu_us = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if gpu_us > 0 and event.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((gpu_us / steps, event.count / steps, event.key))
    rows.sort(reverse=True)
    total_us = sum(r[0] for r in rows)
    launches = sum(r[1] for r in rows)
    print(f"GPU time per {unit} {total_us / 1e3:.2f} ms over {launches:.0f} kernels")
    print(f"{'us/' + unit:>9} {'n/' + unit:>7} {'us/call':>8}  kernel")
    for us, n, name in rows:
        print(f"{us:9.1f} {n:7.1f} {us / n:8.2f}  {name[:110]}")


if __name__ == "__main__":
    main()
