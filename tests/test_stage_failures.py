"""A failed pipeline stage is named right: the one whose process was killed (SIGKILL) or stopped
(SIGSTOP), over gloo and gRPC, first stage and last; every request in flight fails with that name."""

import contextlib
import os
import signal
import time

import pytest

from mlapipe.runtime import Engine, SamplingParams
from mlapipe.runtime.tiny_models import write_tiny_model

DEADLINE_S = 3.0  # a stopped stage is found by its missed deadline; the tiny model's steps take ms
PROMPTS = [[5, 6, 7], [40, 41], list(range(60, 70))]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("fail") / "v2.gguf", "v2", num_hidden_layers=2)


# Every pair of (transport, stage), (transport, signal) and (stage, signal) once: four pipelines instead
# of eight (each costs two fresh actor processes importing torch, ~8 s on two busy cores).
@pytest.mark.parametrize(
    "transport, stage, how",
    [("gloo", 1, "kill"), ("gloo", 0, "stop"), ("grpc", 0, "kill"), ("grpc", 1, "stop")],
)
def test_reported_stage_is_the_one_that_failed(ray_local, model_path, transport, stage, how):
    engine = Engine(
        model_path, pipeline=2, transport=transport, use_ray=True, block_size=16, deadline_s=DEADLINE_S
    )
    pid = engine.executor.devices[stage]["pid"]
    try:
        assert len(engine.generate([[5, 6]], SamplingParams(max_tokens=2))[0].token_ids) == 2  # it works
        os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        ids = [engine.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True)) for p in PROMPTS]
        started, finished = time.monotonic(), {}
        while len(finished) < len(ids):
            for request in engine.step()[1]:
                finished[request.request_id] = request
            assert time.monotonic() - started < DEADLINE_S + 20, "the engine hung after a stage failed"
        reasons = {r.finish_reason for r in finished.values()}
        assert len(reasons) == 1, reasons
        reason = reasons.pop()
        assert reason.startswith(f"error: pipeline stage {stage} "), reason
        assert ("died" if how == "kill" else "stopped responding") in reason, reason
        if how == "stop":
            assert "stopped (SIGSTOP?)" in reason, reason
    finally:
        if how == "stop":  # the failed pipeline's shutdown normally killed it already (and waited)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        engine.close()


def _run(engine, prompts, params) -> list:
    ids = [engine.add_request(p, params) for p in prompts]
    finished = {}
    started = time.monotonic()
    while len(finished) < len(ids):
        for request in engine.step()[1]:
            finished[request.request_id] = request
        assert time.monotonic() - started < 60, "the engine hung after a micro-batch raised"
    return [finished[i] for i in ids]


@pytest.mark.parametrize("pipeline, stage", [(1, 0), (2, 0), (2, 1)])
def test_a_micro_batch_that_raises_fails_only_the_request_that_raises(
    ray_local, model_path, monkeypatch, pipeline, stage
):
    """A stage raises on the micro-batch holding one prompt (the failpoint stands in for an out-of-memory
    error or a bug; on stage 0 the next stage computes on zeros, on stage 1 stage 0's work is dropped):
    the micro-batch is retried request by request, the prompt that raises alone fails with an error
    naming the stage, the three that shared its micro-batch get the tokens they get alone, and the
    engine serves the next request."""
    from mlapipe.workers.failpoint import FAILPOINT_ENV

    good = [[5, 6, 7, 8], [40, 41, 42], list(range(60, 70))]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    with Engine(model_path, block_size=16) as engine:
        alone = [engine.generate([p], params)[0].token_ids for p in good]
    seen = {t for tokens in alone + good for t in tokens}
    poison = next(t for t in range(100, 1000) if t not in seen)  # in no good prompt and none of their outputs
    monkeypatch.setenv(FAILPOINT_ENV, f"{stage}:{poison}")
    options = dict(pipeline=2, use_ray=True, transport="gloo") if pipeline == 2 else {}
    with Engine(model_path, block_size=16, **options) as engine:
        done = _run(engine, good[:2] + [[10, 11, poison, 12]] + good[2:], params)
        reasons = [r.finish_reason for r in done]
        assert reasons[2] == f"error: stage {stage} raised RuntimeError: failpoint {FAILPOINT_ENV} hit"
        assert reasons[:2] + reasons[3:] == ["length"] * 3, reasons
        assert [r.output_token_ids for r in done[:2] + done[3:]] == alone
        again = _run(engine, [good[0]], params)[0]
        assert again.finish_reason == "length" and again.output_token_ids == alone[0]
