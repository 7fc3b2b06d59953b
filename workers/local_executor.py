"""The whole model in this process: one stage holding every layer (pipeline size 1, no Ray).

It is the pipeline's own StageWorker, called directly: the same run loop, decode rounds included
(with one stage, a round's tokens go from the sampler to the next step's embedding on the device).
"""

from __future__ import annotations

from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.microbatch import MicroBatch, StepOutput
from mlapipe.workers.stage import StageWorker, describe_device


class LocalExecutor:
    num_groups = 1

    def __init__(
        self,
        model: GGUFModel,
        num_kv_blocks: int,
        block_size: int,
        max_seq_len: int,
        device: str = "cpu",
        cpu_threads: int = 1,  # torch threads on CPU (runtime/threads.py), restored at shutdown
        check_plan=None,  # callable(list of one device info) -> KV blocks (or None: num_kv_blocks), raising if unfit
        **runner_options,
    ):
        import torch

        self._threads_before = torch.get_num_threads()
        if device == "cpu":
            torch.set_num_threads(cpu_threads)
        self.stage = StageWorker(0, 1)
        self.stage.use_device(device)  # this process's device as it is: no Ray
        if check_plan is not None:  # before any weight is read
            num_kv_blocks = check_plan([{"stage": 0, **describe_device(device)}]) or num_kv_blocks
        self.num_kv_blocks = num_kv_blocks
        self.stage.load_layers(model, 0, model.config.num_layers, **runner_options)
        self.stage.allocate_kv_cache(num_kv_blocks, block_size, max_seq_len)
        self.runner = self.stage.runner
        self._done: list[StepOutput] = []

    def submit(self, batches: list[MicroBatch]) -> None:
        self._done += self.stage.run_round(batches)

    def collect(self) -> list[StepOutput]:
        done, self._done = self._done, []
        return done

    def stats(self) -> list[dict]:
        return [self.stage.stats()]

    def timelines(self) -> list[list[tuple]]:
        """Per stage, its forward spans since the last call (workers/stage_timeline.py)."""
        return [self.stage.timeline_spans()]

    def shutdown(self) -> None:
        """Frees the weights and the cache now, not when the engine object is collected: an engine sized
        from free memory right after this one (a test, a benchmark sweep) must find the memory free."""
        import torch

        self._done.clear()
        self.runner = None
        self.stage.shutdown()
        torch.set_num_threads(self._threads_before)
