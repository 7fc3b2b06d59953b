"""The Ray pipeline on CPU: same tokens and scores as one process, over gloo and gRPC, 1-3 stages."""

import time

import pytest
import ray

from mlapipe.runtime import Engine, RequestFailed, SamplingParams
from mlapipe.runtime.tiny_models import write_tiny_model

PROMPTS = [list(range(5, 12)), [40, 41, 42], list(range(60, 93)), [7, 300, 8, 301, 9]]
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module", params=["v2", "v3"])
def model_and_reference(request, tmp_path_factory, ray_local):
    """Tokens from the in-process engine, one decode step per driver round trip (the engines under test
    run decode rounds); scores from a one-stage Ray pipeline. Every CPU stage, in-process or a Ray
    actor, computes with one torch thread (runtime/threads.py), so the scores agree to the bit."""
    path = write_tiny_model(tmp_path_factory.mktemp("pipe") / f"{request.param}.gguf", request.param, seed=11)
    with Engine(path, block_size=16, decode_steps=1) as engine:
        tokens = [r.token_ids for r in engine.generate(PROMPTS, PARAMS)]
        local_scores = engine.score(PROMPTS[2])
    with Engine(path, pipeline=1, use_ray=True, block_size=16) as engine:
        scores = engine.score(PROMPTS[2])
    assert scores == local_scores
    return path, tokens, scores


@pytest.mark.parametrize(
    "stages, transport", [(1, "gloo"), (2, "gloo"), (3, "gloo"), (2, "grpc"), (3, "grpc")]
)
def test_pipeline_matches_one_process(ray_local, model_and_reference, stages, transport):
    path, tokens, scores = model_and_reference
    with Engine(path, pipeline=stages, transport=transport, use_ray=True, block_size=16) as engine:
        assert [r.token_ids for r in engine.generate(PROMPTS, PARAMS)] == tokens  # 4 concurrent requests
        assert engine.score(PROMPTS[2]) == scores
        stats = engine.executor.stats()
        assert all(s["steps"] > s["batches"] > 0 for s in stats)  # decode rounds ran
        if stages > 1:
            assert all(s["bytes_sent"] > 0 for s in stats)  # activations on every link, tokens back


def test_decode_rounds_keep_seeded_sampling_and_stops(ray_local, model_and_reference):
    """Seeded sampling gives the same tokens whether the driver sees every step or only each round's
    end; a stop token inside a round ends the request there."""
    path, tokens, _ = model_and_reference
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_k=40, seed=3, ignore_eos=True)
    stop_token = tokens[2][4]
    stopping = SamplingParams(max_tokens=12, stop_token_ids=(stop_token,), ignore_eos=True)
    with Engine(path, block_size=16, decode_steps=1) as engine:
        expected = [r.token_ids for r in engine.generate(PROMPTS, sampled)]
    with Engine(path, pipeline=2, use_ray=True, block_size=16, decode_steps=5) as engine:
        assert [r.token_ids for r in engine.generate(PROMPTS, sampled)] == expected
        stopped = engine.generate([PROMPTS[2]], stopping)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == tokens[2][: tokens[2].index(stop_token) + 1]


def test_chunked_prefill_and_per_stage_amb(ray_local, model_and_reference):
    """ubatch 8 splits the 33-token prompt into chunks; stage 1 runs attention one head per step."""
    path, tokens, _ = model_and_reference
    prompt = list(range(10, 50))  # 40 tokens
    with Engine(path, block_size=16) as engine:
        expected = engine.generate([prompt], PARAMS)[0].token_ids
    with Engine(path, pipeline=2, ubatch=8, amb=[0.0, 1e-6], use_ray=True, block_size=16) as engine:
        assert engine.generate([prompt], PARAMS)[0].token_ids == expected
        assert engine.generate(PROMPTS, PARAMS)[2].token_ids == tokens[2]


def test_killed_stage_fails_requests_within_deadline(ray_local, model_and_reference):
    path, _, _ = model_and_reference
    deadline = 15.0
    engine = Engine(path, pipeline=2, use_ray=True, block_size=16, deadline_s=deadline)
    ids = [engine.add_request(p, SamplingParams(max_tokens=200, ignore_eos=True)) for p in PROMPTS]
    for _ in range(3):
        engine.step()
    ray.kill(engine.executor.actors[1], no_restart=True)
    started = time.monotonic()
    finished = {}
    while len(finished) < len(ids):
        for request in engine.step()[1]:
            finished[request.request_id] = request
        assert time.monotonic() - started < deadline + 30, "the engine hung after a stage died"
    assert all(r.finish_reason.startswith("error: pipeline stage 1") for r in finished.values())
    with pytest.raises(RequestFailed, match="pipeline stage 1"):
        engine.generate([[5, 6]])
    engine.close()
    with Engine(path, pipeline=2, use_ray=True, block_size=16) as rebuilt:  # and a new one works
        assert len(rebuilt.generate([[5, 6]], PARAMS)[0].token_ids) == 8
