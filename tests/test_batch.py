"""mlapipe batch: every result written once, resume after Ctrl-C or a torn line, failures retried, bad
input named by line. The real-engine tests use a 2-layer tiny model; the logic tests a fake engine."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from mlapipe.runtime import cli
from mlapipe.runtime.batch import BatchInputError, BatchItem, read_done_ids, read_requests, run_batch
from mlapipe.runtime.engine import PromptError
from mlapipe.runtime.sampling_params import SamplingParams
from mlapipe.runtime.scheduler import Request

# Different lengths so requests finish in different steps (an interruption leaves some undone); one
# seeded sampled request, whose tokens must not depend on the batch it ran in; one default id.
PROMPTS = [
    {"id": "a", "prompt": "Hello, world", "max_tokens": 1},
    {"prompt": [5, 6, 7], "max_tokens": 2},  # id 2: the line number
    {"id": "c", "prompt": "The quick brown fox", "temperature": 0.8, "seed": 3, "max_tokens": 10},
    {"id": "d", "prompt": "Paris is"},  # max tokens from -n
]
DEFAULT_MAX_TOKENS = 12
EXPECTED_IDS = ["a", 2, "c", "d"]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _read_results(path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def _by_id(results: list[dict]) -> dict:
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)), f"an id written twice: {ids}"
    return {r["id"]: r for r in results}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from mlapipe.runtime.tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny-v2.gguf", "v2", num_hidden_layers=2)


@pytest.fixture(scope="module")
def reference(model_path, tmp_path_factory):
    """One uninterrupted in-process run: what every other run must reproduce."""
    from mlapipe.runtime.engine import Engine

    folder = tmp_path_factory.mktemp("reference")
    items = read_requests(_write_jsonl(folder / "in.jsonl", PROMPTS), SamplingParams(DEFAULT_MAX_TOKENS))
    with Engine(model_path) as engine:
        summary = run_batch(engine, items, str(folder / "out.jsonl"), progress=False)
    assert summary.written == len(PROMPTS) and not summary.failed
    return _by_id(_read_results(folder / "out.jsonl"))


def test_reference_run_writes_every_field(reference):
    assert sorted(reference, key=str) == sorted(EXPECTED_IDS, key=str)
    for request_id, max_tokens in (("a", 1), (2, 2), ("c", 10), ("d", DEFAULT_MAX_TOKENS)):
        result = reference[request_id]
        assert set(result) == {
            "id",
            "text",
            "token_ids",
            "finish_reason",
            "prompt_tokens",
            "completion_tokens",
        }
        assert result["completion_tokens"] == len(result["token_ids"]) <= max_tokens
        assert result["finish_reason"] in ("stop", "length")
        if result["finish_reason"] == "length":
            assert result["completion_tokens"] == max_tokens
    assert reference[2]["prompt_tokens"] == 3  # token ids are used as given


def _batch_command(input_path, output_path, model_path, *extra_args, slow_steps=False):
    argv = ["batch", "--input", input_path, "--output", output_path, "-m", model_path]
    argv += ["-n", str(DEFAULT_MAX_TOKENS), *extra_args]
    # Slowing each engine step makes the interruption land mid-run however fast the machine is.
    patch = (
        "import time, mlapipe.runtime.engine as e; step = e.Engine.step; "
        "e.Engine.step = lambda self: (time.sleep(0.25), step(self))[1]; "
        if slow_steps
        else ""
    )
    # A shell that starts the tests in the background leaves SIGINT ignored, and children inherit that;
    # restore Python's Ctrl-C handler so the child behaves as in a terminal.
    code = (
        f"import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); {patch}"
        f"from mlapipe.runtime.cli import main; sys.exit(main({argv!r}))"
    )
    return [sys.executable, "-c", code]


def test_cli_output_matches_the_in_process_run(model_path, reference, tmp_path):
    output = tmp_path / "out.jsonl"
    command = _batch_command(_write_jsonl(tmp_path / "in.jsonl", PROMPTS), str(output), model_path)
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "4 written" in done.stderr
    assert _by_id(_read_results(output)) == reference


@pytest.mark.slow
def test_two_stage_pipeline_writes_the_same_results(model_path, reference, tmp_path):
    output = tmp_path / "out.jsonl"
    input_path = _write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    command = _batch_command(input_path, str(output), model_path, "--pipeline", "2")
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert _by_id(_read_results(output)) == reference


def test_ctrl_c_then_rerun_resumes_without_loss_or_repeats(model_path, reference, tmp_path, capsys):
    input_path = _write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    output = tmp_path / "out.jsonl"
    command = _batch_command(input_path, str(output), model_path, slow_steps=True)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (output.exists() and output.read_text().count("\n") >= 1):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "no result written within 60 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "re-run the same command to resume" in stderr
    partial = _by_id(_read_results(output))
    assert 1 <= len(partial) < len(PROMPTS)

    argv = ["batch", "--input", input_path, "--output", str(output), "-m", model_path]
    assert cli.main([*argv, "-n", str(DEFAULT_MAX_TOKENS), "--no-progress"]) == 0
    assert f"{len(partial)} already done" in capsys.readouterr().err
    assert _by_id(_read_results(output)) == reference


# logic, on a fake engine ------------------------------------------------------------------------------
class FakeTokenizer:
    def decode(self, token_ids):
        return " ".join(map(str, token_ids))


class FakeEngine:
    """Finishes one request per step, oldest first; tokens are the prompt's length counting up.
    Prompts named in `errors` finish with an error; `raise_on_step` makes that step call raise;
    prompt "too long" is refused like Engine refuses a prompt over n_ctx."""

    def __init__(self, errors=(), raise_on_step=None, interrupt_on_step=None):
        self.tokenizer = FakeTokenizer()
        self.errors, self.raise_on_step, self.interrupt_on_step = (
            set(errors),
            raise_on_step,
            interrupt_on_step,
        )
        self.queue: list[Request] = []
        self.steps = 0

    def add_request(self, prompt, params=None):
        if prompt == "too long":
            raise PromptError("prompt is 9999 tokens, longer than the context allows: n_ctx=64")
        tokens = list(prompt) if isinstance(prompt, list) else [ord(c) for c in prompt]
        request = Request(f"req-{len(self.queue)}-{prompt}", tokens, params or SamplingParams())
        self.queue.append(request)
        return request.request_id

    def step(self):
        self.steps += 1
        if self.steps == self.raise_on_step:
            raise RuntimeError("stage 1 (layers 2-3) died")
        if self.steps == self.interrupt_on_step:
            raise KeyboardInterrupt
        request = next(r for r in self.queue if not r.finished)
        n = len(request.prompt_token_ids)
        request.output_token_ids = list(range(n, n + request.sampling.max_tokens))
        prompt = "".join(map(chr, request.prompt_token_ids))
        request.finish_reason = "error: stage 1 died" if prompt in self.errors else "length"
        return [request], [request]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _items(*prompts):
    """Requests whose id is their prompt."""
    return [BatchItem(p, p, SamplingParams(max_tokens=2)) for p in prompts]


def test_transient_failures_are_retried_and_permanent_ones_get_an_error_line(tmp_path):
    output = str(tmp_path / "out.jsonl")
    items = _items("p1", "p2", "p3", "too long")
    summary = run_batch(FakeEngine(errors={"p2"}), items, output, progress=False)
    assert summary.written == 2
    assert set(summary.failed) == {"p2"}  # a stage died under it: worth retrying
    assert summary.failed["p2"] == "error: stage 1 died"
    assert set(summary.refused) == {"too long"}  # can never run with these settings: not retried
    results = _by_id(_read_results(output))
    assert sorted(results) == ["p1", "p3", "too long"]  # completion order: the refusal comes first
    assert results["too long"]["finish_reason"] == "error"
    assert "longer than the context" in results["too long"]["error"]

    retry = FakeEngine()
    summary = run_batch(retry, items, output, progress=False)
    assert summary.skipped == 3 and summary.written == 1 and not summary.failed and not summary.refused
    assert [q.request_id for q in retry.queue] == ["req-0-p2"]  # only the transient failure ran again
    assert sorted(r["id"] for r in _read_results(output)) == ["p1", "p2", "p3", "too long"]


def test_engine_raising_fails_what_is_left_and_keeps_what_is_written(tmp_path):
    output = str(tmp_path / "out.jsonl")
    summary = run_batch(FakeEngine(raise_on_step=2), _items("p1", "p2", "p3"), output, progress=False)
    assert summary.written == 1
    assert set(summary.failed) == {"p2", "p3"}
    assert "stage 1 (layers 2-3) died" in summary.failed["p2"]
    assert [r["id"] for r in _read_results(output)] == ["p1"]


def test_keyboard_interrupt_keeps_finished_results_and_a_torn_line_is_cut(tmp_path):
    output = tmp_path / "out.jsonl"
    items = _items("p1", "p2", "p3", "p4")
    with pytest.raises(KeyboardInterrupt):
        run_batch(FakeEngine(interrupt_on_step=3), items, str(output), progress=False)
    assert [r["id"] for r in _read_results(output)] == ["p1", "p2"]
    with open(output, "a") as f:
        f.write('{"id": "p3", "text": "3 4')  # a write cut off by a crash
    assert read_done_ids(str(output)) == {"p1", "p2"}
    summary = run_batch(FakeEngine(), items, str(output), progress=False)
    assert summary.skipped == 2 and summary.written == 2
    assert [r["id"] for r in _read_results(output)] == ["p1", "p2", "p3", "p4"]


def test_cli_exits_nonzero_naming_failed_requests(tmp_path, monkeypatch, capsys):
    from mlapipe.runtime import engine as engine_module

    monkeypatch.setattr(engine_module, "Engine", lambda model, **options: FakeEngine(errors={"p2"}))
    input_path = _write_jsonl(tmp_path / "in.jsonl", [{"id": p, "prompt": p} for p in ("p1", "p2")])
    argv = ["batch", "--input", input_path, "--output", str(tmp_path / "out.jsonl"), "-m", "unused.gguf"]
    assert cli.main([*argv, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 requests failed" in err and "'p2'" in err and "re-run" in err


# bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('{"id": [1], "prompt": "x"}', "id must be a string or an integer"),
        ('{"id": "first", "prompt": "again"}', "already used on line 1"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_input_line_is_named_by_number(tmp_path, line, message):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "first", "prompt": "x"}\n\n' + line + "\n")
    with pytest.raises(BatchInputError, match=r"in\.jsonl:3: .*" + re.escape(message)):
        read_requests(str(path), SamplingParams())


def test_cli_reports_bad_input_before_loading_the_model(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}, {"id": [2], "prompt": "y"}])
    argv = ["batch", "--input", path, "--output", str(tmp_path / "out.jsonl"), "-m", "/no/such/model.gguf"]
    assert cli.main(argv) == 2
    assert "in.jsonl:2: id must be a string or an integer" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out.jsonl")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, 'no "prompt"'),
        ({"prompt": ""}, "non-empty text or a list of token ids"),
        ({"prompt": [1, "a"]}, "token ids must be integers, got 'a'"),
        ({"prompt": [1, 2.0]}, "token ids must be integers, got 2.0"),  # never truncated to 2
        ({"prompt": [1, True]}, "token ids must be integers, got True"),
        ({"prompt": "\ud800"}, "unpaired surrogate"),
        ({"prompt": "x", "temperature": -1}, "temperature must be 0 (greedy) or in"),
        ({"prompt": "x", "temperature": 1e-40}, "temperature must be 0 (greedy) or in"),
        ({"prompt": "x", "temperature": float("nan")}, "temperature must be finite"),
        ({"prompt": "x", "temperature": "0.5"}, "temperature must be a number"),
        ({"prompt": "x", "top_k": 2.5}, "top_k must be an integer"),
        ({"prompt": "x", "top_p": 0}, "top_p must be in (0, 1]"),
        ({"prompt": "x", "seed": 1.5}, "seed must be an integer"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens must be an integer"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens must be in [1,"),
        ({"prompt": "x", "temprature": 0.5}, "unknown field 'temprature'"),
    ],
)
def test_bad_field_becomes_a_permanent_error_for_that_line_only(tmp_path, fields, message):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "first", "prompt": "x"}\n' + json.dumps({"id": "bad", **fields}) + "\n")
    good, bad = read_requests(str(path), SamplingParams())
    assert good.error is None
    assert bad.request_id == "bad" and bad.error is not None
    assert re.match(r".*in\.jsonl:2: .*" + re.escape(message), bad.error), bad.error
