"""Prefill micro-batches replayed from CUDA graphs (workers/prefill_graphs.py) against eager prefill, on a
GPU. The bucket rounding is checked on the host everywhere."""

import os

import pytest
import torch

from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.microbatch import MicroBatch, SequenceChunk
from mlapipe.runtime.tiny_models import write_tiny_model
from mlapipe.workers.model_runner import ModelRunner
from mlapipe.workers.prefill_graphs import Bucket, round_up_bucket

os.environ.setdefault("MLAPIPE_AUTOTUNE", "0")  # runners compared bit for bit run the same configs

GPU_SHAPE = dict(
    num_attention_heads=16, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32
)
PAGE = 64


def test_buckets_round_up_with_at_most_an_eighth_of_padding():
    assert [round_up_bucket(n, 256) for n in (1, 256, 257, 512, 513, 2048, 2049, 5000)] == [
        256, 256, 512, 512, 768, 2048, 2304, 5120,
    ]  # fmt: skip
    for n in range(256, 20000, 37):
        bucket = round_up_bucket(n, 256)
        assert n <= bucket <= n + max(256, n // 8)
    chunks = [
        SequenceChunk("a", [1] * 300, 100, list(range(7)), False),
        SequenceChunk("b", [1] * 129, 0, [9, 10, 11], False),
    ]
    assert Bucket.of(MicroBatch(0, chunks)) == Bucket(tokens=512, latent_rows=1024, sequences=2)


@pytest.fixture(scope="module", params=["v2", "v3"])
def model(request, tmp_path_factory):
    path = write_tiny_model(
        tmp_path_factory.mktemp("graphs") / f"{request.param}.gguf", request.param, seed=3, **GPU_SHAPE
    )
    return GGUFModel(path)


def _runner(model, graphs: bool, monkeypatch, amb_mib: float = 0.0) -> ModelRunner:
    monkeypatch.setenv("MLAPIPE_PREFILL_GRAPHS", "1" if graphs else "0")
    runner = ModelRunner(model, 0, model.config.num_layers, device="cuda", amb_mib=amb_mib)
    runner.allocate_kv_cache(num_blocks=64, block_size=PAGE)
    assert (runner.prefill_graphs is not None) == graphs
    return runner


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _batches() -> list[MicroBatch]:
    """Two prompts prefilled in two chunks each (the second reads the first's cached rows; both chunks
    fall in one bucket, so the second replays the first's graph with new inputs), then a batch of three
    fresh prompts, one of them 130 tokens (just over the decode threshold)."""
    a, b = _prompt(400, 1), _prompt(450, 2)
    table_a, table_b = list(range(0, 7)), list(range(8, 16))
    first = MicroBatch(
        0, [SequenceChunk("a", a[:200], 0, table_a, False), SequenceChunk("b", b[:256], 0, table_b, False)]
    )
    second = MicroBatch(
        1, [SequenceChunk("a", a[200:], 200, table_a, True), SequenceChunk("b", b[256:], 256, table_b, True)]
    )
    third = MicroBatch(2, [SequenceChunk("c", _prompt(130, 3), 0, [20, 21, 22], True), SequenceChunk("d", _prompt(257, 4), 0, [24, 25, 26, 27, 28], True), SequenceChunk("e", _prompt(500, 5), 0, list(range(30, 38)), True)])  # fmt: skip
    return [first, second, third]


@pytest.mark.gpu
def test_graphed_prefill_tracks_eager(model, monkeypatch):
    graphed, eager = _runner(model, True, monkeypatch), _runner(model, False, monkeypatch)
    for batch in _batches():
        got, want = graphed.forward(batch), eager.forward(batch)
        assert got.shape == want.shape
        # cuBLAS picks its algorithm by the padded row count: close, not equal, to the eager bits
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
    assert len(graphed.prefill_graphs.graphs) == 2  # buckets (512, 1024, 2) and (1024, 1024, 4)


@pytest.mark.gpu
def test_padding_changes_no_real_row(model, monkeypatch):
    """A prompt and its first 200 tokens fall in one bucket (256): the shared rows have the same bits,
    so nothing of the padding (or of the tokens past a row, causally) reaches a real row."""
    runner = _runner(model, True, monkeypatch)
    prompt = _prompt(240, 7)
    short = MicroBatch(0, [SequenceChunk("s", prompt[:200], 0, [0, 1, 2, 3], False)])
    long = MicroBatch(1, [SequenceChunk("l", prompt, 0, [4, 5, 6, 7], False)])
    first = runner.forward(short).clone()
    again = runner.forward(short).clone()
    longer = runner.forward(long).clone()
    assert len(runner.prefill_graphs.graphs) == 1
    assert torch.equal(first, again)
    assert torch.equal(longer[:200], first)
    assert torch.isfinite(longer).all()


@pytest.mark.gpu
def test_graphed_prefill_bits_do_not_depend_on_amb(model, monkeypatch):
    runners = [_runner(model, True, monkeypatch, amb_mib=amb) for amb in (0.0, 0.02)]
    for batch in _batches():
        outs = [r.forward(batch) for r in runners]
        assert torch.equal(outs[0], outs[1])
    steps = [sum(layer.attention.amb_steps_taken for layer in r.shard.layers) for r in runners]
    assert steps[1] > steps[0] > 0  # the small budget took more head steps, and replays counted them


class _Cycle:
    """Unreachable garbage that holds a captured graph: only the cycle collector frees it."""

    def __init__(self, graph):
        self.graph, self.me = graph, self


@pytest.mark.gpu
def test_garbage_graphs_are_not_freed_inside_a_capture():
    """A graph destroyed during another capture invalidates that capture; a dropped runner's graphs are
    such garbage, and the cycle collector may run at any allocation. The capturer keeps it off while
    capturing."""
    import gc

    from mlapipe.workers.cuda_graphs import GraphCapturer

    capturer = GraphCapturer()
    x = torch.randn(64, 64, device="cuda")
    held = [capturer.capture(lambda: x @ x)[0]]
    calls = []

    def forward():
        calls.append(1)
        if len(calls) == capturer.WARMUP_RUNS + 1:  # inside the capture: the old graph becomes garbage
            _Cycle(held.pop())
            _ = [[] for _ in range(1000)]  # enough allocations to start the collector at threshold 1
        return (x @ x).relu()

    threshold = gc.get_threshold()
    gc.set_threshold(1)
    try:
        graph, out = capturer.capture(forward)
    finally:
        gc.set_threshold(*threshold)
    gc.collect()  # the old graph goes now, outside any capture
    graph.replay()
    torch.testing.assert_close(out, (x @ x).relu())
