"""The model on a GPU (bf16 weights, Triton kernels) against the CPU fp32 references, and the NCCL
pipeline against gRPC. Skipped without GPUs."""

import os

import pytest
import torch

from mlapipe.runtime import Engine, SamplingParams
from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.microbatch import MicroBatch, SequenceChunk
from mlapipe.runtime.tiny_models import write_tiny_model
from mlapipe.workers.model_runner import ModelRunner

# Engines compared bit for bit must run the same kernel configs: autotuning picks by timing, and another
# block size sums in another order. Set before any engine (and its Ray workers, which inherit it) starts.
os.environ.setdefault("MLAPIPE_AUTOTUNE", "0")

# Triton's MLA kernels want power-of-two head counts and latent widths of at least 16.
GPU_SHAPE = dict(
    num_attention_heads=16, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32
)


@pytest.fixture(scope="module", params=["v2", "v3"])
def model_path(request, tmp_path_factory):
    return write_tiny_model(
        tmp_path_factory.mktemp("gpu") / f"{request.param}.gguf", request.param, seed=2, **GPU_SHAPE
    )


def _logits(path, device, attention, prompt):
    model = GGUFModel(path)
    runner = ModelRunner(model, 0, model.config.num_layers, device=device, attention=attention)
    runner.allocate_kv_cache(num_blocks=8, block_size=64)
    batch = MicroBatch(0, [SequenceChunk("r", prompt, 0, [3, 1], sample=False, return_logits=True)])
    return torch.from_numpy(runner.finish(batch, runner.forward(batch)).logits["r"])


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["naive", "absorbed"])
def test_bf16_gpu_logits_track_fp32_cpu(model_path, attention):
    prompt = torch.randint(4, 300, (100,)).tolist()
    ref = _logits(model_path, "cpu", attention, prompt)
    ours = _logits(model_path, "cuda", attention, prompt)
    # bf16 weights and activations against fp32. The same model run through the CPU references in
    # bf16 (dtype=torch.bfloat16) lands at mean|diff|/mean|ref| 2.5% (V2) and 3.6-4.7% (V3), with
    # 89-95% of argmax choices equal: these small random models route sharply, and a bf16 rounding
    # flips an expert choice for some tokens. A wrong kernel gives errors of order 100%.
    assert float((ours - ref).abs().mean() / ref.abs().mean()) < 0.08
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


@pytest.mark.gpu
def test_gpu_engine_generates_and_scores(model_path):
    prompts = [list(range(5, 40)), [7, 8, 9]]
    with Engine(model_path, devices="cuda") as engine:
        out = engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
        assert [len(r.token_ids) for r in out] == [16, 16]
        again = engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
        assert [r.token_ids for r in again] == [r.token_ids for r in out]  # deterministic kernels
        scores = engine.score(prompts[0])
    with Engine(model_path, devices="cpu") as engine:
        reference = engine.score(prompts[0])
    # mean, not max: an expert flip moves single positions by ~1 nat (see the test above)
    assert sum(abs(a - b) for a, b in zip(scores, reference)) / len(scores) < 0.2


@pytest.mark.multigpu
def test_nccl_and_grpc_pipelines_agree(model_path):
    """Decode rounds through 2 GPUs (two micro-batches interleaved, tokens sent back from stage 1 to
    stage 0) give the tokens of a driver that sees every step, over NCCL and over gRPC; one sequence
    gets the tokens it gets on one GPU. (Many sequences are compared within the same grouping only:
    one GPU runs them as one batch, two stages as two, and bf16 GEMMs of other batch sizes round
    differently, which can flip a near-tie argmax.)"""
    prompts = [list(range(5, 40)), [7, 8, 9], list(range(100, 300))] + [[11 + i, 12, 13] for i in range(5)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    results = {}
    for transport in ("nccl", "grpc"):
        with Engine(model_path, pipeline=2, devices="cuda", transport=transport, decode_steps=7) as engine:
            results[transport] = [r.token_ids for r in engine.generate(prompts, params)]
            assert all(s["steps"] > s["batches"] for s in engine.executor.stats())  # rounds ran
            results[transport, "one"] = engine.generate(prompts[:1], params)[0].token_ids
            engine.scheduler.decode_steps = 1  # the same engine, the driver at every step
            results[transport, "steps"] = [r.token_ids for r in engine.generate(prompts, params)]
    assert results["nccl"] == results["grpc"] == results["nccl", "steps"] == results["grpc", "steps"]
    with Engine(model_path, devices="cuda", decode_steps=1) as engine:
        single = engine.generate(prompts[:1], params)[0].token_ids
    assert results["nccl", "one"] == results["grpc", "one"] == single


@pytest.mark.gpu
def test_decode_rounds_match_single_steps_on_gpu(model_path):
    """Greedy and seeded sampling: tokens fed back on the device give what the host would feed."""
    prompts = [list(range(5, 40)), [7, 8, 9], list(range(50, 60))]
    for params in (
        SamplingParams(max_tokens=20, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True),
    ):
        with Engine(model_path, devices="cuda", decode_steps=1) as engine:
            single = [r.token_ids for r in engine.generate(prompts, params)]
        with Engine(model_path, devices="cuda", decode_steps=8) as engine:
            assert [r.token_ids for r in engine.generate(prompts, params)] == single


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager(model_path, monkeypatch):
    prompts = [list(range(5, 40)), [7, 8, 9], list(range(50, 60))]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    with Engine(model_path, devices="cuda", n_ctx=256) as engine:
        graphed = [r.token_ids for r in engine.generate(prompts, params)]
        assert engine.executor.runner.decode_graphs.graphs  # decode steps did replay graphs
    monkeypatch.setenv("MLAPIPE_CUDA_GRAPHS", "0")
    with Engine(model_path, devices="cuda", n_ctx=256) as engine:
        assert engine.executor.runner.decode_graphs is None
        eager = [r.token_ids for r in engine.generate(prompts, params)]
    assert graphed == eager


@pytest.mark.gpu
def test_decode_graphs_take_the_split_count_of_the_context_not_of_the_capacity(model_path, monkeypatch):
    """A cache that could hold 16k tokens per sequence: a step at 100 cached tokens replays a graph with
    one split, one at 8,000 a graph with 8,192's split count (half the capacity's); both track the eager
    step, which sizes splits from the exact length and here picks the same counts (a different count
    sums in another order, and a tiny V3's routing can turn that into a different expert)."""
    from mlapipe.kernels.mla_decode import decode_splits

    model = GGUFModel(model_path)
    runners = {}
    for graphs in ("1", "0"):
        monkeypatch.setenv("MLAPIPE_CUDA_GRAPHS", graphs)
        runners[graphs] = ModelRunner(model, 0, model.config.num_layers, device="cuda")
        runners[graphs].allocate_kv_cache(num_blocks=300, block_size=64, max_seq_len=16384)
        # the cached rows both runners read: the same random latents (the cache starts as NaN)
        runners[graphs].kv_cache[:, :300].normal_(generator=torch.Generator("cuda").manual_seed(5))
    graphed = runners["1"].decode_graphs
    heads = model.config.num_heads
    for depth, context in ((100, 256), (8000, 8192)):
        table = list(range(2, 2 + -(-(depth + 1) // 64)))
        batch = MicroBatch(0, [SequenceChunk("r", [11], depth, table, True)])
        key, chosen = graphed.key_for(batch)
        assert chosen == context and key == (1, decode_splits(1, heads, 1, context, "cuda"))
        out = {name: runner.forward(batch).float() for name, runner in runners.items()}
        # bf16 hidden states of a residual stream: compared by norm (an ulp at |x| ~ 4 is 0.03)
        assert float((out["1"] - out["0"]).norm() / out["0"].norm()) < 1e-2
    splits = sorted(s for _, s in graphed.graphs)
    assert splits == [decode_splits(1, heads, 1, n, "cuda") for n in (256, 8192)]
    assert splits[1] < decode_splits(1, heads, 1, 16384, "cuda")  # what the capacity would have taken
