"""The whole model in this process: one ModelRunner holding every layer (pipeline size 1, no Ray)."""

from __future__ import annotations

import time

from runtime.gguf_model import GGUFModel
from runtime.microbatch import MicroBatch, StepOutput
from workers.model_runner import ModelRunner
from workers.stage import amb_steps_taken


class LocalExecutor:
    num_groups = 1

    def __init__(
        self, model: GGUFModel, num_kv_blocks: int, block_size: int, max_seq_len: int, **runner_options
    ):
        self.runner = ModelRunner(model, 0, model.config.num_layers, **runner_options)
        self.runner.allocate_kv_cache(num_kv_blocks, block_size, max_seq_len)
        self._done: list[StepOutput] = []
        self.forward_seconds = 0.0
        self.batches_done = 0

    def submit(self, batch: MicroBatch) -> None:
        started = time.perf_counter()
        self._done.append(self.runner.finish(batch, self.runner.forward(batch)))
        self.forward_seconds += time.perf_counter() - started
        self.batches_done += 1

    def collect(self) -> list[StepOutput]:
        done, self._done = self._done, []
        return done

    def stats(self) -> list[dict]:
        """One stage's stats, in the shape StageWorker.stats() gives (no transport: nothing to send)."""
        return [
            {
                "stage": 0,
                "forward_seconds": self.forward_seconds,
                "transport_wait_seconds": 0.0,
                "batches": self.batches_done,
                "bytes_sent": 0,
                "amb_steps": amb_steps_taken(self.runner),
            }
        ]

    def shutdown(self) -> None:
        self._done.clear()
