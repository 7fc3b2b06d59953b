"""The weights' loading bar: bytes of the file's tensors and the rate, in this process or per stage."""

from __future__ import annotations

import sys


def loading_bar(model, enabled: bool | None):
    """A bar over the bytes the model's tensors take in the file, with the rate (GB/s), advanced as
    this process loads each tensor (the in-process executor); pipeline stages load theirs in their
    actors, and it advances by a stage's share (its layers' part of the bytes) as each stage is ready."""
    from tqdm import tqdm

    bar = tqdm(
        total=getattr(model, "load_bytes", 0),
        desc="loading weights",
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        file=sys.stderr,
        disable=None if enabled is None else not enabled,  # None: only on a terminal
        leave=False,
    )
    if hasattr(model, "on_bytes_read"):
        model.on_bytes_read = bar.update
    return bar


def stage_progress(bar, num_layers: int, num_stages: int):
    """on_stage_loaded for a pipeline: each stage ready adds its layers' share of the bytes; the last
    one fills the bar."""
    ready = []

    def on_stage_loaded(stage) -> None:
        ready.append(stage)
        share = round(bar.total * (stage.end_layer - stage.first_layer) / num_layers)
        bar.update(bar.total - bar.n if len(ready) == num_stages else min(share, bar.total - bar.n))
        bar.refresh()  # a stage's whole share at once: show it even if the last refresh was recent

    return on_stage_loaded
