"""Poison requests fail alone: a temperature of 1e-40, NaN, top_k 2.5, seed 1.5 or float token ids is
refused with a clear error when it is given, the 15 requests around it get the tokens they get alone,
and the engine serves the next request, at pipeline 1 and 2; `mlapipe batch` writes the good lines and
an error line for the bad one."""

import json
import math

import pytest

from mlapipe.runtime import Engine, PromptError, SamplingParams
from mlapipe.runtime.cli import main
from mlapipe.runtime.sampling_params import SamplingParamsError
from mlapipe.runtime.tiny_models import write_tiny_model

# (name, sampling keywords or None, prompt or None, the error's message)
POISONS = [
    ("temperature 1e-40", {"temperature": 1e-40}, None, "temperature must be 0 (greedy) or in [0.01, 100]"),
    ("NaN temperature", {"temperature": math.nan}, None, "temperature must be finite, got nan"),
    ("top_k 2.5", {"temperature": 0.8, "top_k": 2.5}, None, "top_k must be an integer, got 2.5"),
    ("seed 1.5", {"temperature": 0.8, "seed": 1.5}, None, "seed must be an integer, got 1.5"),
    ("float token ids", {}, [5, 6.0, 7], "token ids must be integers, got 6.0"),
]
GOOD = [
    (list(range(5 + i, 12 + 2 * i)), SamplingParams(max_tokens=6 + i % 4))
    if i % 3
    else ([40 + i, 41, 42], SamplingParams(max_tokens=8, temperature=0.8, top_k=40, seed=i))
    for i in range(15)
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("poison") / "v2.gguf", "v2", num_hidden_layers=2)


@pytest.fixture(scope="module")
def alone(model_path):
    """Each good request's tokens when it runs by itself."""
    with Engine(model_path, block_size=16) as engine:
        return [engine.generate([prompt], params)[0].token_ids for prompt, params in GOOD]


@pytest.mark.parametrize("name, keywords, prompt, message", POISONS)
def test_poison_is_refused_where_it_is_made(model_path, name, keywords, prompt, message):
    if prompt is None:
        with pytest.raises(SamplingParamsError, match=_escaped(message)):
            SamplingParams(**keywords)
    else:
        with Engine(model_path, block_size=16) as engine, pytest.raises(PromptError, match=_escaped(message)):
            engine.add_request(prompt)


@pytest.mark.parametrize("pipeline", [1, 2])
def test_poison_among_fifteen_fails_alone(ray_local, model_path, alone, pipeline):
    with Engine(model_path, pipeline=pipeline, use_ray=pipeline > 1, block_size=16) as engine:
        for name, keywords, prompt, message in POISONS:
            ids = [engine.add_request(p, params) for p, params in GOOD[:8]]
            with pytest.raises(ValueError, match=_escaped(message)):  # SamplingParamsError, PromptError
                engine.add_request(prompt or [5, 6, 7], SamplingParams(**keywords))
            ids += [engine.add_request(p, params) for p, params in GOOD[8:]]
            done = {}
            while len(done) < len(ids):
                done |= {r.request_id: r for r in engine.step()[1]}
            assert [done[i].output_token_ids for i in ids] == alone, name
            assert not engine.scheduler.in_flight and not engine.scheduler.has_unfinished
        assert engine.generate([GOOD[1][0]], GOOD[1][1])[0].token_ids == alone[1]  # and serves the next


def test_batch_writes_the_good_lines_and_an_error_line_for_each_bad_one(model_path, alone, tmp_path, capsys):
    lines = [{"id": f"good-{i}", "prompt": p, **_fields(params)} for i, (p, params) in enumerate(GOOD)]
    lines.append({"id": "good-15", "prompt": [9, 8, 7], "max_tokens": 3})
    for name, keywords, prompt, _ in POISONS:
        lines.insert(7, {"id": name, "prompt": prompt or [5, 6, 7], **keywords})
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))  # NaN as JSON's NaN
    output = tmp_path / "out.jsonl"
    argv = ["batch", "--input", str(source), "--output", str(output), "-m", model_path, "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "16 written" in err and "5 refused" in err
    assert "5 of 21 requests could not run and got an error line (a re-run skips them" in err
    results = {r["id"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert len(results) == 21
    assert [results[f"good-{i}"]["token_ids"] for i in range(15)] == alone
    for name, _, _, message in POISONS:
        assert results[name]["finish_reason"] == "error" and message in results[name]["error"], results[name]
        assert name in err
    assert main(argv) == 0  # a re-run finds everything done, the refused lines included
    assert "all 21 requests already done" in capsys.readouterr().err


def _fields(params: SamplingParams) -> dict:
    fields = {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_k": params.top_k}
    return fields | ({"seed": params.seed} if params.seed is not None else {})


def _escaped(message: str) -> str:
    import re

    return re.escape(message)
