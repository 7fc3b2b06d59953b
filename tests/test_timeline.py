"""Per-stage timelines (workers/stage_timeline.py, runtime/timeline.py): the text figure from known spans,
then real spans from a two-stage Ray pipeline on CPU and from `mlapipe bench --timeline`."""

import re
import time

import pytest

from mlapipe.runtime import Engine, SamplingParams
from mlapipe.runtime.cli import main
from mlapipe.runtime.engine_args import DEFAULT_UBATCH
from mlapipe.runtime.timeline import render
from mlapipe.runtime.tiny_models import write_tiny_model


def test_figure_of_known_spans():
    # 2 stages over 10 s: stage 0 computes batches 0 and 1 back to back, stage 1 each after stage 0
    timelines = [[(0, 0, 0.0, 2.0), (1, 0, 2.0, 4.0)], [(0, 0, 2.0, 4.0), (1, 0, 5.0, 7.0), (11, 0, 9.0, 10.0)]]
    lines = render(timelines, width=10).splitlines()
    assert lines[0].startswith("timeline: 10000.0 ms, one column = 1000.00 ms")
    assert lines[1] == "stage 0 |0011......| busy 40%: 0.0 ms before, 0.0 between, 6000.0 after"
    assert lines[2] == "stage 1 |..00.11..b| busy 50%: 2000.0 ms before, 3000.0 between, 0.0 after"
    assert render([[], []]) == "timeline: no forward spans recorded"


def test_two_stage_pipeline_spans_follow_each_batch_through_the_stages(ray_local, tmp_path):
    path = write_tiny_model(tmp_path / "v3.gguf", "v3", seed=5)
    prompts = [list(range(5, 40)), list(range(50, 90)), [7, 8, 9, 10, 11, 12]]
    with Engine(path, pipeline=2, use_ray=True, block_size=16, ubatch=32) as engine:
        engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
        first, second = engine.executor.timelines()
        assert engine.executor.timelines() == [[], []]  # taken: a second call starts afresh
        busy = [s["forward_seconds"] for s in engine.executor.stats()]
    assert first and second
    for stage in (first, second):
        assert all(end >= start for _, _, start, end in stage)
        assert all(a[3] <= b[2] + 1e-6 for a, b in zip(stage, stage[1:]))  # one forward at a time, in order
    # the same (batch, step) on stage 1 starts only after stage 0 finished it: one clock for both processes
    ends = {(b, k): end for b, k, _, end in first}
    for b, k, start, _ in second:
        assert start >= ends[(b, k)] - 1e-6
    assert set(ends) == {(b, k) for b, k, _, _ in second}
    # forward time kept in the stats although the spans were taken
    assert busy[0] >= sum(e - s for _, _, s, e in first) - 1e-6 > 0
    figure = render([first, second])
    assert re.search(r"stage 1 \|\.+[0-9a-z]", figure)  # stage 1 waits for stage 0's first batch


def test_bench_prints_a_timeline_per_test(tmp_path, capsys):
    path = write_tiny_model(tmp_path / "v2.gguf", "v2", seed=3)
    argv = ["bench", "-m", str(path), "-p", "24", "-n", "4", "-r", "1", "--devices", "cpu", "--timeline"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # the label names the ubatch the engine took: its CPU default
    label = rf"pipeline 1, ubatch {DEFAULT_UBATCH['cpu']}, 1 seqs, (pp24|tg4), last repetition:"
    assert len(re.findall(label, out)) == 2
    assert len(re.findall(r"^stage 0 \|[0-9a-z.]+\| busy \d+%", out, flags=re.M)) == 2


@pytest.mark.gpu
def test_gpu_spans_are_gpu_time_on_the_host_clock(tmp_path):
    """On a GPU a span comes from CUDA events anchored to the host's monotonic clock: the spans of a run
    lie inside its wall-clock interval and in order."""
    path = write_tiny_model(tmp_path / "v2.gguf", "v2", seed=3)
    with Engine(path, devices="cuda", block_size=64) as engine:
        engine.generate([list(range(5, 300))], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        engine.executor.timelines()
        before = time.monotonic()
        engine.generate([list(range(5, 300))], SamplingParams(max_tokens=4, ignore_eos=True))
        after = time.monotonic()
        (spans,) = engine.executor.timelines()
    assert spans and all(before - 1e-3 <= s <= e <= after + 1e-3 for _, _, s, e in spans)
    assert all(a[3] <= b[2] + 1e-4 for a, b in zip(spans, spans[1:]))
