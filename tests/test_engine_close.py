"""Closing an engine gives back what it took, and a closed engine says so instead of running.

CPU: the in-process engine's tensors are all freed (weak references die), the Ray pipeline's actors,
processes and placement group are gone. GPU (`pytest -m gpu tests/test_engine_close.py -s`): three
build / generate / close cycles of a V2-Lite-shaped random model with CUDA graphs leave the device's
allocated and reserved memory within 64 MiB of where they started.
"""

import gc
import os
import weakref

import psutil
import pytest
import ray
import torch

from mlapipe.runtime import Engine, SamplingParams
from mlapipe.runtime.engine import EngineClosed
from mlapipe.runtime.tiny_models import write_tiny_model

PROMPTS = [list(range(5, 12)), [40, 41, 42]]
PARAMS = SamplingParams(max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("close") / "v3.gguf", "v3", seed=4)


def tensors_reachable_from(root) -> list[torch.Tensor]:
    """Every tensor held through attributes, lists, tuples and dicts of mlapipe objects under root."""
    found, seen, todo = {}, set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found[id(obj)] = obj
        elif isinstance(obj, dict):
            todo += list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            todo += list(obj)
        elif type(obj).__module__.startswith("mlapipe") and hasattr(obj, "__dict__"):
            todo += list(vars(obj).values())
    return list(found.values())


def assert_closed(engine):
    for call in (
        lambda: engine.generate(PROMPTS, PARAMS),
        lambda: engine.add_request([1, 2, 3]),
        lambda: engine.score([1, 2, 3]),
        lambda: next(engine.stream([1, 2, 3], PARAMS)),
        engine.step,
    ):
        with pytest.raises(EngineClosed, match="the engine for .* is closed: build a new Engine"):
            call()


def test_closed_in_process_engine_frees_every_tensor(model_path):
    with Engine(model_path, block_size=16, metrics_port=0) as engine:
        engine.generate(PROMPTS, PARAMS)
        held = tensors_reachable_from(engine)
        assert len(held) > 20  # weights, latent cache, rope tables
        freed = [weakref.ref(t) for t in held]
        del held
    gc.collect()
    alive = sum(ref() is not None for ref in freed)
    assert alive == 0, f"{alive} of {len(freed)} tensors still referenced after close"
    assert engine.metrics.port is None
    assert_closed(engine)
    engine.close()  # twice is fine


def test_closed_pipeline_leaves_no_stage_behind(ray_local, model_path):
    engine = Engine(model_path, pipeline=2, transport="gloo", use_ray=True, block_size=16)
    expected = [r.token_ids for r in engine.generate(PROMPTS, PARAMS)]
    pipeline = engine.executor
    actors = [*pipeline.actors, pipeline._store_actor]
    pids = [d["pid"] for d in pipeline.devices]
    group = pipeline._pg
    engine.close()
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert ray.util.placement_group_table(group)["state"] == "REMOVED"
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=10)
    assert_closed(engine)
    with Engine(model_path, pipeline=2, transport="gloo", use_ray=True, block_size=16) as again:
        assert [r.token_ids for r in again.generate(PROMPTS, PARAMS)] == expected


@pytest.mark.gpu
def test_gpu_memory_returns_after_close():
    """V2-Lite's geometry (2048 hidden, 16 heads, 64 experts of 1408, 102400 vocabulary) with 4 of its
    27 layers (1 dense + 3 MoE: every kind of layer, ~4.5 GB of bf16 weights), CUDA graphs on (the
    default): decode steps of 1 and 3 sequences capture two graph buckets each cycle."""
    assert os.environ.get("MLAPIPE_CUDA_GRAPHS", "1") != "0"
    torch.cuda.init()
    gc.collect()
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    rows = []
    for cycle in range(3):
        with Engine("random:v2-lite:layers=4", devices="cuda", n_ctx=1024, decode_steps=4) as engine:
            engine.generate([list(range(5, 70))], SamplingParams(max_tokens=8, ignore_eos=True))
            engine.generate(
                [list(range(5, 40)), [7, 8, 9], list(range(100, 300))],
                SamplingParams(max_tokens=12, ignore_eos=True),
            )
            assert engine.executor.runner.decode_graphs.graphs  # the graphs were used
            peak = torch.cuda.memory_reserved()
        gc.collect()
        torch.cuda.empty_cache()
        rows.append((cycle, peak, torch.cuda.memory_allocated(), torch.cuda.memory_reserved()))
    mib = lambda b: b / 2**20
    print(f"\nbefore: allocated {mib(start[0]):.1f} MiB, reserved {mib(start[1]):.1f} MiB")
    print("| cycle | reserved while open MiB | allocated after close MiB | reserved after close MiB |")
    print("|---|---|---|---|")
    for cycle, peak, allocated, reserved in rows:
        print(f"| {cycle} | {mib(peak):.0f} | {mib(allocated):.1f} | {mib(reserved):.1f} |")
    for cycle, peak, allocated, reserved in rows:
        assert peak > start[1] + (1 << 30), "the engine should have held its weights while open"
        assert allocated - start[0] <= 64 << 20, f"cycle {cycle}: {mib(allocated - start[0]):.0f} MiB still allocated"
        assert reserved - start[1] <= 64 << 20, f"cycle {cycle}: {mib(reserved - start[1]):.0f} MiB still reserved"
