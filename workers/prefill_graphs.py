"""Prefill micro-batches replayed from CUDA graphs, one graph per (tokens, latent rows, sequences) bucket.

A prefill chunk launches ~30 kernels and torch ops a layer whatever its length, and for short prompts
their host cost, not the GPU, sets the rate: a 512-token V2-Lite prompt kept the GPU busy 14 of 46 ms
(workers/NOTES.md, issue 18). Replayed from a graph, a micro-batch costs one upload and one launch.

A batch qualifies when every sequence takes the decompressed path (as `ModelRunner.build_metadata`
decides). Its bucket rounds up the new tokens T, the latent rows L (cached + new tokens of all its
sequences) and the sequence count S; what the bucket adds is padding that changes no real row:
  - token rows past T belong to no sequence: their attention output is zero (the plan says so), their
    latent rows go to the scratch block no request owns, their outputs are dropped;
  - sequence slots past S have no new tokens: their attention programs return at once;
  - latent rows past L gather a scratch row that no sequence reads.
Every kernel of a layer is row-independent for a fixed batch shape, so a batch's bits depend on its
bucket only: the same micro-batch gives the same bits on any pipeline split and at any amb.

Inputs travel as one pinned int64 buffer per step (positions, cache slots, token ids, latent rows and
the attention metadata), copied without blocking into the graph's static buffer; later stages copy the
previous stage's hidden rows into the graph's static hidden buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlapipe.kernels.norm_rope import rope_cos_sin
from mlapipe.runtime.microbatch import MicroBatch
from mlapipe.workers.attention import AttentionMetadata, SequenceGroup

MAX_GRAPHS = 24  # graphs kept per runner; batches of further buckets run eagerly
MAX_SEQUENCES = 64  # sequences of one graphed micro-batch


def round_up_bucket(n: int, smallest: int) -> int:
    """n rounded up to 8 steps an octave (padding <= 1/8 above `smallest`): 256, 512, 768, ..., 2048,
    2304, 2560, ... for smallest 256."""
    if n <= smallest:
        return smallest
    step = max(smallest, 1 << (n.bit_length() - 1) >> 3)
    return -(-n // step) * step


@dataclass(frozen=True)
class Bucket:
    tokens: int
    latent_rows: int
    sequences: int

    @classmethod
    def of(cls, batch: MicroBatch) -> Bucket:
        return cls(
            tokens=round_up_bucket(batch.num_tokens, 256),
            latent_rows=round_up_bucket(sum(c.seq_len for c in batch.chunks), 1024),
            sequences=1 << max(0, (len(batch.chunks) - 1).bit_length()),
        )

    @property
    def input_size(self) -> int:  # int64 entries of the step's input buffer
        return 3 * self.tokens + self.latent_rows + 4 * self.sequences


class _Graph:
    """One bucket's graph, its static input buffers and its output."""

    def __init__(self, runner, bucket: Bucket):
        T, L, S = bucket.tokens, bucket.latent_rows, bucket.sequences
        self.bucket = bucket
        self.inputs = torch.zeros(bucket.input_size, dtype=torch.int64, device=runner.device)
        self.positions, self.slots, self.token_ids = (
            self.inputs[:T],
            self.inputs[T : 2 * T],
            self.inputs[2 * T : 3 * T],
        )
        self.latent_rows = self.inputs[3 * T : 3 * T + L]
        self.meta = self.inputs[3 * T + L :].view(4, S)
        self.hidden_in = None
        if not runner.shard.is_first:
            self.hidden_in = torch.zeros(T, runner.cfg.hidden_size, dtype=runner.dtype, device=runner.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        self.head_steps: list[int] = []  # amb head steps each layer's attention takes per replay

    def forward(self, runner) -> torch.Tensor:
        from mlapipe.kernels.mla_prefill import PrefillPlan  # triton: imported on a GPU only

        T, L, S = self.bucket.tokens, self.bucket.latent_rows, self.bucket.sequences
        cos, sin = rope_cos_sin(self.positions, runner.inv_freq)
        plan = PrefillPlan(
            num_tokens=T, num_sequences=S, max_query_len=T, latent_rows=self.latent_rows, meta=self.meta,
            zero_unowned_rows=True,
        )  # fmt: skip
        # token_rows (a mixed batch's gather) and block_table / seq_lens / query_start_loc (what a launch
        # without a plan reads) are never read here: every row takes this path and the plan is given
        group = SequenceGroup(
            token_rows=self.positions,
            block_table=self.meta,
            seq_lens=self.meta[2],
            query_start_loc=self.meta[0],
            max_seq_len=L,
            max_new_tokens=T,
            total_seq_len=L,  # the amb head steps bound the padded rows' K/V too
            prefill_plan=plan,
        )
        meta = AttentionMetadata(self.positions, self.slots, cos, sin, absorbed=None, naive=group)
        inputs = self.token_ids if runner.shard.is_first else self.hidden_in
        return runner.shard.forward(inputs, meta, runner.kv_cache)


class PrefillGraphs:
    def __init__(self, runner, scratch_block: int, capturer):
        self.runner = runner
        self.scratch_row = scratch_block * runner.block_size
        self.capturer = capturer  # the decode graphs' too (workers/cuda_graphs.py)
        self.graphs: dict[Bucket, _Graph] = {}

    def accepts(self, batch: MicroBatch) -> bool:
        runner = self.runner
        if not batch.chunks or len(batch.chunks) > MAX_SEQUENCES:
            return False
        if not all(runner.takes_decompressed(c.num_new) for c in batch.chunks):
            return False
        return Bucket.of(batch) in self.graphs or len(self.graphs) < MAX_GRAPHS

    def run(self, batch: MicroBatch, hidden_in: torch.Tensor | None) -> torch.Tensor:
        bucket = Bucket.of(batch)
        entry = self.graphs.get(bucket)
        if entry is None:
            entry = _Graph(self.runner, bucket)
        self._fill(entry, batch, hidden_in)
        if entry.graph is None:
            self._capture(entry)
            self.graphs[bucket] = entry
        entry.graph.replay()
        for layer, steps in zip(self.runner.shard.layers, entry.head_steps):
            layer.attention.amb_steps_taken += steps  # the stage stats' count, as eager runs keep it
        return entry.output[: batch.num_tokens]

    def _fill(self, entry: _Graph, batch: MicroBatch, hidden_in: torch.Tensor | None) -> None:
        T, L, S = entry.bucket.tokens, entry.bucket.latent_rows, entry.bucket.sequences
        page, scratch = self.runner.block_size, self.scratch_row
        host = np.zeros(entry.bucket.input_size, dtype=np.int64)
        positions, slots, ids = host[:T], host[T : 2 * T], host[2 * T : 3 * T]
        latent_rows, meta = host[3 * T : 3 * T + L], host[3 * T + L :].reshape(4, S)
        slots[:] = scratch
        latent_rows[:] = scratch
        row, kv_row = 0, 0
        for s, c in enumerate(batch.chunks):
            blocks = np.asarray(c.block_table, dtype=np.int64)
            cache_rows = (blocks[:, None] * page + np.arange(page)).reshape(-1)[: c.seq_len]
            positions[row : row + c.num_new] = np.arange(c.num_cached, c.seq_len)
            slots[row : row + c.num_new] = cache_rows[c.num_cached :]
            if self.runner.shard.is_first:
                ids[row : row + c.num_new] = c.token_ids
            latent_rows[kv_row : kv_row + c.seq_len] = cache_rows
            meta[:, s] = (row, c.num_new, c.seq_len, kv_row)
            row, kv_row = row + c.num_new, kv_row + c.seq_len
        # non-blocking from pinned memory: the host never waits for the GPU here (see kernels/host.py)
        entry.inputs.copy_(torch.from_numpy(host).pin_memory(), non_blocking=True)
        if entry.hidden_in is not None:
            entry.hidden_in[:row].copy_(hidden_in)

    def _capture(self, entry: _Graph) -> None:
        # The warm-up runs write the batch's own latent rows (the replay writes the same values again);
        # the amb head steps they and the capture take are counted per replay instead.
        attention = [layer.attention for layer in self.runner.shard.layers]
        counted = [a.amb_steps_taken for a in attention]
        entry.graph, entry.output = self.capturer.capture(lambda: entry.forward(self.runner))
        runs = self.capturer.WARMUP_RUNS + 1
        entry.head_steps = [(a.amb_steps_taken - before) // runs for a, before in zip(attention, counted)]
        for a, before in zip(attention, counted):
            a.amb_steps_taken = before

    def release(self) -> None:
        torch.cuda.synchronize()
        for entry in self.graphs.values():
            entry.graph.reset()
        self.graphs.clear()
        self.capturer = None
        self.runner = None
