"""Decode steps replayed from CUDA graphs, one graph per (batch-size bucket, context split count).

A decode micro-batch (one new token per sequence) launches a few hundred small kernels per step; their
launch cost, not the GPU, bounds tokens per second. Captured once per bucket (1, 2, 4, ... sequences),
a step becomes: copy this step's inputs into static buffers, replay, read the output rows.

The decode kernel splits each context into a number of parts fixed at capture. Sized for the cache's
capacity, short contexts paid for it (empty splits, a longer merge: tg128 287 t/s at n_ctx 8k against
341 at a small n_ctx, issue 18). So each step's longest context, rounded up to a power of two, picks
the split count, and the graph is keyed on it: a few graphs per batch size, each right for any length
up to the capacity (a split's share of keys is computed from the real lengths in the kernel).

Static inputs per bucket (views of buffers sized for the largest bucket):
  inputs (B,) token ids on the first stage, or (B, hidden) activations on later ones
  positions (B,), slot_mapping (B,), block_table (B, max_blocks), seq_lens (B,)
Rows past the real batch are padding: a one-token sequence in a scratch block that no request owns,
so they never touch real cache rows and their outputs are dropped.
"""

from __future__ import annotations

import gc

import torch

from mlapipe.kernels.norm_rope import rope_cos_sin
from mlapipe.runtime.microbatch import MicroBatch
from mlapipe.workers.attention import AttentionMetadata, SequenceGroup


class GraphCapturer:
    """Captures a runner's forward passes into CUDA graphs of one memory pool (one graph replays at a
    time, so decode and prefill graphs share their intermediates) from one side stream (one cuBLAS
    workspace for all captures)."""

    WARMUP_RUNS = 2  # Triton compiles and autotunes in these, never inside the capture

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream()

    def capture(self, forward) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Runs forward() WARMUP_RUNS times on the side stream, then captures one more run; returns the
        graph and the run's output (a tensor of the pool that every replay overwrites)."""
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.WARMUP_RUNS):
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        # A graph destroyed while another is being captured (cudaGraphExecDestroy) invalidates that
        # capture. Unreachable runners holding graphs are freed by Python's cycle collector, which may
        # run at any allocation: collect now, and not again until the capture has ended.
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                output = forward()
        finally:
            if collecting:
                gc.enable()
        return graph, output


def bucket_for(num_seqs: int) -> int:
    return 1 << max(0, (num_seqs - 1).bit_length())


class DecodeGraphs:
    def __init__(
        self, runner, max_batch: int, max_blocks_per_seq: int, scratch_block: int, capturer: GraphCapturer
    ):
        self.runner = runner
        self.capturer = capturer
        self.max_batch = max_batch
        self.scratch_block = scratch_block
        device, cfg = runner.device, runner.cfg
        self.max_seq_len = max_blocks_per_seq * runner.block_size
        self.token_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.hidden_in = torch.zeros(max_batch, cfg.hidden_size, dtype=runner.dtype, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slots = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.block_table = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.rows = torch.arange(max_batch, dtype=torch.int64, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (bucket, splits)

    def accepts(self, batch: MicroBatch) -> bool:
        return len(batch.chunks) <= self.max_batch and all(
            c.num_new == 1 and len(c.block_table) * self.runner.block_size <= self.max_seq_len
            for c in batch.chunks
        )

    def run(
        self, batch: MicroBatch, hidden_in: torch.Tensor | None, token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """token_ids: the first stage's input tokens as a device tensor (a decode round's feedback),
        instead of the chunks' own."""
        size = len(batch.chunks)
        key, context = self.key_for(batch)
        bucket = key[0]
        self._fill(batch, hidden_in, bucket, token_ids)
        if key not in self.graphs:
            self.graphs[key] = self._capture(bucket, context)
        graph, output = self.graphs[key]
        graph.replay()
        return output[:size]

    def key_for(self, batch: MicroBatch) -> tuple[tuple[int, int], int]:
        """((bucket, split count), the context the split count was chosen for) of a decode batch."""
        from mlapipe.kernels.mla_decode import MIN_KEYS_PER_SPLIT, decode_splits  # triton: GPU only

        bucket = bucket_for(len(batch.chunks))
        longest = max(c.seq_len for c in batch.chunks)
        context = min(self.max_seq_len, max(MIN_KEYS_PER_SPLIT, 1 << (longest - 1).bit_length()))
        splits = decode_splits(bucket, self.runner.cfg.num_heads, 1, context, self.runner.device)
        return (bucket, splits), context

    def _fill(
        self, batch: MicroBatch, hidden_in: torch.Tensor | None, bucket: int, token_ids: torch.Tensor | None
    ) -> None:
        # Host values go up from pinned memory with non-blocking copies: the host never waits for the
        # GPU here (a copy from pageable memory would), so it prepares the next step while the GPU runs
        # this one. torch's pinned-memory cache keeps each buffer until its copy has run.
        size, block_size, scratch = len(batch.chunks), self.runner.block_size, self.scratch_block
        padding = bucket - size
        positions = [c.num_cached for c in batch.chunks]
        slots = [
            c.block_table[p // block_size] * block_size + p % block_size
            for c, p in zip(batch.chunks, positions)
        ]
        first = self.runner.shard.is_first and token_ids is None
        ids = [c.token_ids[0] for c in batch.chunks] if first else [0] * size
        host = torch.tensor(
            [
                positions + [0] * padding,
                slots + [scratch * block_size] * padding,
                [p + 1 for p in positions] + [1] * padding,
                ids + [0] * padding,
            ],
            dtype=torch.int64,
        ).pin_memory()
        width = self.block_table.shape[1]
        table = torch.tensor(
            [c.block_table + [scratch] * (width - len(c.block_table)) for c in batch.chunks]
            + [[scratch] * width] * padding,
            dtype=torch.int32,
        ).pin_memory()
        self.positions[:bucket].copy_(host[0], non_blocking=True)
        self.slots[:bucket].copy_(host[1], non_blocking=True)
        self.seq_lens[:bucket].copy_(host[2], non_blocking=True)
        self.block_table[:bucket].copy_(table, non_blocking=True)
        if token_ids is not None:
            self.token_ids[:size].copy_(token_ids)
        elif first:
            self.token_ids[:bucket].copy_(host[3], non_blocking=True)
        else:
            self.hidden_in[:size].copy_(hidden_in)

    def _forward(self, bucket: int, context: int) -> torch.Tensor:
        runner = self.runner
        cos, sin = rope_cos_sin(self.positions[:bucket], runner.inv_freq)
        group = SequenceGroup(
            token_rows=self.rows[:bucket],
            block_table=self.block_table[:bucket],
            seq_lens=self.seq_lens[:bucket],
            query_start_loc=self.query_start_loc[: bucket + 1],
            max_seq_len=context,  # the split count's hint; any length up to the capacity runs right
            max_new_tokens=1,
            total_seq_len=bucket * context,
        )
        meta = AttentionMetadata(self.positions[:bucket], self.slots[:bucket], cos, sin, group, None)
        inputs = self.token_ids[:bucket] if runner.shard.is_first else self.hidden_in[:bucket]
        return runner.shard.forward(inputs, meta, runner.kv_cache)

    def _capture(self, bucket: int, context: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        return self.capturer.capture(lambda: self._forward(bucket, context))

    def release(self) -> None:
        """Destroys the graphs and drops the static buffers; the graphs' private pool goes back to the
        caching allocator once no graph and no output tensor refers to it."""
        torch.cuda.synchronize()  # no replay still reading the buffers
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.capturer = None
        for name in ("token_ids", "hidden_in", "positions", "slots", "block_table", "seq_lens",
                     "query_start_loc", "rows"):  # fmt: skip
            setattr(self, name, None)
        self.runner = None
