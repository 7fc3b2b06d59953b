"""The whole model in this process: one ModelRunner holding every layer (pipeline size 1, no Ray)."""

from __future__ import annotations

from runtime.gguf_model import GGUFModel
from runtime.microbatch import MicroBatch, StepOutput
from workers.model_runner import ModelRunner


class LocalExecutor:
    num_groups = 1

    def __init__(
        self, model: GGUFModel, num_kv_blocks: int, block_size: int, max_seq_len: int, **runner_options
    ):
        self.runner = ModelRunner(model, 0, model.config.num_layers, **runner_options)
        self.runner.allocate_kv_cache(num_kv_blocks, block_size, max_seq_len)
        self._done: list[StepOutput] = []

    def submit(self, batch: MicroBatch) -> None:
        self._done.append(self.runner.finish(batch, self.runner.forward(batch)))

    def collect(self) -> list[StepOutput]:
        done, self._done = self._done, []
        return done

    def shutdown(self) -> None:
        self._done.clear()
