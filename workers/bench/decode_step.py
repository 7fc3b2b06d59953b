"""GPU time of one decode step (CUDA-graph replay, no host work) by shard and batch size.

Answers: what does a decode step cost the GPU for the whole model at B sequences, and for each half
of it at B/2 (one micro-batch of a 2-stage pipeline)? A 2-stage pipeline with two micro-batches in
flight finishes 2 x (B/2) tokens per cycle; its cycle is at least the slower stage's two micro-batches.
So the best 2-stage/1-stage decode ratio the GPUs allow is  X(full, B) / max_s 2 X(stage s, B/2).

python -m mlapipe.workers.bench.decode_step [--shape v2-lite] [--depth 128] [--batches 1,32,64]
"""

from __future__ import annotations

import argparse
import gc

import torch

from mlapipe.runtime.microbatch import MicroBatch, SequenceChunk
from mlapipe.runtime.shapes import random_spec
from mlapipe.workers.model_runner import ModelRunner, open_model

BLOCK = 64


def decode_batch(num_seqs: int, depth: int, blocks_per_seq: int) -> MicroBatch:
    chunks = [
        SequenceChunk(
            request_id=f"s{i}",
            token_ids=[(i * 7919) % 1000 + 5],
            num_cached=depth,
            block_table=list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)),
            sample=True,
        )
        for i in range(num_seqs)
    ]
    return MicroBatch(0, chunks)


def time_step(runner: ModelRunner, batch: MicroBatch, iters: int) -> float:
    """ms of GPU time per replayed decode step."""
    hidden_in = None
    if not runner.shard.is_first:
        hidden_in = torch.randn(len(batch.chunks), runner.cfg.hidden_size, device="cuda", dtype=runner.dtype)
    for _ in range(3):  # capture + warm-up
        runner.forward(batch, hidden_in)
    torch.cuda.synchronize()
    graph, _ = runner.decode_graphs.graphs[runner.decode_graphs.key_for(batch)[0]]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="v2-lite")
    parser.add_argument("--depth", type=int, default=128)
    parser.add_argument("--batches", default="1,32,64")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    model = open_model(random_spec(args.shape))
    layers = model.config.num_layers
    half = (layers + 1) // 2
    blocks_per_seq = -(-(args.depth + 1) // BLOCK)
    rows = []
    for first, end in [(0, layers), (0, half), (half, layers)]:
        runner = ModelRunner(model, first, end, device="cuda")
        runner.allocate_kv_cache(max(batches) * blocks_per_seq, BLOCK, blocks_per_seq * BLOCK)
        for b in batches:
            ms = time_step(runner, decode_batch(b, args.depth, blocks_per_seq), args.iters)
            rows.append((f"layers {first}-{end - 1}", b, ms))
            print(f"layers {first}-{end - 1}  B={b}: {ms:.3f} ms", flush=True)
        del runner
        gc.collect()
        torch.cuda.empty_cache()
    times = {(name, b): ms for name, b, ms in rows}
    full, h1, h2 = f"layers 0-{layers - 1}", f"layers 0-{half - 1}", f"layers {half}-{layers - 1}"
    print("\n| B | full model (ms) | stage 0 at B/2 | stage 1 at B/2 | best 2-stage / 1-stage |")
    print("|---:|---:|---:|---:|---:|")
    for b in batches:
        if b % 2 or (h1, b // 2) not in times:
            continue
        cycle = 2 * max(times[(h1, b // 2)], times[(h2, b // 2)])
        print(
            f"| {b} | {times[(full, b)]:.2f} | {times[(h1, b // 2)]:.2f} | {times[(h2, b // 2)]:.2f} "
            f"| {times[(full, b)] / cycle:.2f}x |"
        )


if __name__ == "__main__":
    main()
