"""`mlapipe perplexity` by llama-perplexity's method, on the demo model: equal to exp(mean NLL) computed
by hand over the same chunks, bit for bit across runs and pipeline sizes."""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from mlapipe.runtime import Engine
from mlapipe.runtime.engine import PromptError
from mlapipe.runtime.microbatch import MicroBatch, SequenceChunk
from mlapipe.runtime.perplexity import chunks, perplexity
from mlapipe.runtime.tiny_models import CORPUS, demo_model_path
from mlapipe.workers.model_runner import ModelRunner

N_CTX, N_CHUNKS = 64, 3
TEXT = CORPUS * 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The --demo model, built into a test cache as the CLI builds it (MLAPIPE_CACHE)."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("MLAPIPE_CACHE")
    os.environ["MLAPIPE_CACHE"] = str(cache)
    try:
        path = demo_model_path()
    finally:
        os.environ.pop("MLAPIPE_CACHE") if old is None else os.environ.__setitem__("MLAPIPE_CACHE", old)
    text = cache / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    with Engine(path, n_ctx=N_CTX) as engine:
        result = perplexity(engine, TEXT, N_CTX, N_CHUNKS)
    return path, cache, text, result


def _by_hand(engine: Engine) -> tuple[float, list[float]]:
    """Chunk k is tokens [64k, 64k + 64) of the whole text with BOS in place of its first token; tokens
    33..63 of each are scored (llama's `first = n_ctx / 2`: logits from position 32 on)."""
    tokens = engine.tokenizer.encode(TEXT)
    assert tokens[0] == engine.tokenizer.bos_token_id
    nll = []
    for k in range(N_CHUNKS):
        chunk = [engine.tokenizer.bos_token_id, *tokens[k * N_CTX + 1 : (k + 1) * N_CTX]]
        scores = engine.score(chunk)  # scores[j] = log p(chunk[j + 1] | chunk[: j + 1])
        nll += [-s for s in scores[N_CTX // 2 :]]
    return math.exp(math.fsum(nll) / len(nll)), nll


def test_chunks_are_llama_perplexitys():
    tokens = list(range(100, 100 + 3 * N_CTX + 10))  # the 10-token tail is dropped
    got = chunks(tokens, N_CTX, None, bos=7)
    assert [c[1:] for c in got] == [tokens[k * N_CTX + 1 : (k + 1) * N_CTX] for k in range(3)]
    assert all(c[0] == 7 and len(c) == N_CTX for c in got)
    assert (
        len(chunks(tokens, N_CTX, 2, bos=None)) == 2 and chunks(tokens, N_CTX, 2, None)[1][0] == 100 + N_CTX
    )
    with pytest.raises(PromptError, match="only 127 tokens; perplexity with -c 64 needs at least 128"):
        chunks(tokens[:127], N_CTX, None, bos=7)


def test_demo_perplexity_equals_exp_mean_nll_by_hand(demo):
    path, _, _, result = demo
    with Engine(path, n_ctx=N_CTX) as engine:
        ppl, nll = _by_hand(engine)
        again = perplexity(engine, TEXT, N_CTX, N_CHUNKS)  # same engine, second run
    assert result.ppl == ppl  # bit for bit
    assert again == result
    assert result.num_chunks == N_CHUNKS and result.num_scored == len(nll) == N_CHUNKS * (N_CTX // 2 - 1)
    assert len(result.running) == N_CHUNKS and result.running[-1] == result.ppl
    assert result.running[0] == math.exp(math.fsum(nll[: N_CTX // 2 - 1]) / (N_CTX // 2 - 1))
    # llama's uncertainty: the standard error of the mean NLL, in perplexity units
    spread = np.std(np.array(nll)) / math.sqrt(len(nll) - 1) * ppl
    assert result.uncertainty == pytest.approx(spread, rel=1e-9) and result.uncertainty > 0


def test_scored_tokens_are_the_second_half_of_each_chunks_logits(demo):
    """The first chunk's NLL from the model's logits directly (not through Engine.score): positions
    32..62 predict tokens 33..63."""
    from mlapipe.runtime.gguf_model import GGUFModel

    path = demo[0]
    model = GGUFModel(path)
    with Engine(path, n_ctx=N_CTX) as engine:
        _, nll = _by_hand(engine)
        chunk = [engine.tokenizer.bos_token_id, *engine.tokenizer.encode(TEXT)[1:N_CTX]]
    runner = ModelRunner(model, 0, model.config.num_layers)
    runner.allocate_kv_cache(num_blocks=4, block_size=16)
    batch = MicroBatch(0, [SequenceChunk("c", chunk, 0, [0, 1, 2, 3], sample=False, return_logits=True)])
    logits = torch.from_numpy(runner.finish(batch, runner.forward(batch)).logits["c"]).double()
    first = N_CTX // 2
    expected = -torch.log_softmax(logits[first : N_CTX - 1], -1)[
        torch.arange(N_CTX - 1 - first), chunk[first + 1 :]
    ]
    torch.testing.assert_close(
        torch.tensor(nll[: N_CTX - 1 - first], dtype=torch.float64), expected, atol=1e-5, rtol=0
    )


def test_pipeline_1_and_2_give_the_same_bits(ray_local, demo, capsys):
    path, _, _, result = demo
    for stages in (1, 2):
        with Engine(path, n_ctx=N_CTX, pipeline=stages, use_ray=True, progress=True) as engine:
            first_stage = engine.plan.stages[0]
            assert perplexity(engine, TEXT, N_CTX, N_CHUNKS) == result, stages
        bar = capsys.readouterr().err  # the loading bar moves by each stage's share as it is ready
        assert "loading weights" in bar and "100%" in bar, bar
        if stages == 2:
            assert f"{100 * first_stage.end_layer / 4:3.0f}%" in bar, bar


def _cli(*args, cache):
    env = dict(os.environ, MLAPIPE_CACHE=str(cache))
    return subprocess.run(
        [sys.executable, "-m", "mlapipe.runtime.cli", "perplexity", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_cli_prints_running_values_and_final_estimate(demo):
    _, cache, text, result = demo
    done = _cli("--demo", "-f", str(text), "-c", str(N_CTX), "--chunks", str(N_CHUNKS), cache=cache)
    assert done.returncode == 0, done.stderr
    running = " ".join(f"[{i + 1}]{v:.4f}," for i, v in enumerate(result.running)).replace(" ", "")
    assert done.stdout.splitlines() == [
        running,
        f"Final estimate: PPL = {result.ppl:.4f} +/- {result.uncertainty:.5f}",
    ]
    assert re.search(rf"{N_CHUNKS} chunks of {N_CTX} tokens, {result.num_scored} scored", done.stderr)
    # the same bits through two Ray stages, and none of Ray's start-up notices on the terminal
    piped = _cli(
        "--demo", "-f", str(text), "-c", str(N_CTX), "--chunks", str(N_CHUNKS), "--pipeline", "2", cache=cache
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == done.stdout
    assert [line.split(":")[0] for line in piped.stderr.splitlines()] == [
        "perplexity",
        f"[{N_CHUNKS} chunks of {N_CTX} tokens, {result.num_scored} scored]",
    ], piped.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["-c", "1024"], "n_ctx=1024 is above the model's maximum context of 512 tokens"),
        (
            ["-c", "64", "-f", "short"],
            "tokens; perplexity with -c 64 needs at least 128 (2 x n_ctx)",
        ),
        (["-f", "/nonexistent/text.txt"], "/nonexistent/text.txt: no such file"),
    ],
)
def test_cli_bad_input_is_one_line(demo, args, message, tmp_path, monkeypatch, capsys):
    from mlapipe.runtime.cli import main

    _, cache, text, _ = demo
    monkeypatch.setenv("MLAPIPE_CACHE", str(cache))
    (tmp_path / "short").write_text("Hello, world")
    args = [str(tmp_path / "short") if a == "short" else a for a in args]
    assert main(["perplexity", "--demo", *(args if "-f" in args else ["-f", str(text), *args])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and message in err, err
