"""The two exact forms of MLA agree; incremental decode equals the full forward; amb never changes outputs."""

import pytest
import torch

from mlapipe.kernels.amb import plan_head_steps
from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.microbatch import MicroBatch, SequenceChunk
from mlapipe.runtime.tiny_models import write_tiny_model
from mlapipe.workers.model_runner import ModelRunner

BLOCK = 8


@pytest.fixture(scope="module", params=["v2", "v3"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("mla") / f"{request.param}.gguf"
    return GGUFModel(write_tiny_model(path, request.param, seed=3))


def _runner(model, **options) -> ModelRunner:
    runner = ModelRunner(model, 0, model.config.num_layers, **options)
    runner.allocate_kv_cache(num_blocks=16, block_size=BLOCK)
    return runner


def _logits(runner, token_ids, num_cached=0, table=(5, 2, 9, 0), batch_id=0):
    chunk = SequenceChunk("s", token_ids, num_cached, list(table), sample=False, return_logits=True)
    batch = MicroBatch(batch_id, [chunk])
    return torch.from_numpy(runner.finish(batch, runner.forward(batch)).logits["s"])


def _prompt(model, n=24):
    return torch.randint(4, model.config.vocab_size, (n,)).tolist()


def test_absorbed_equals_naive(model):
    prompt = _prompt(model)
    naive = _logits(_runner(model, attention="naive"), prompt)
    absorbed = _logits(_runner(model, attention="absorbed"), prompt)
    assert float((absorbed - naive).abs().max() / naive.abs().max()) <= 1e-5


@pytest.mark.parametrize("attention", ["absorbed", "naive", "auto"])
def test_incremental_decode_equals_full_forward(model, attention):
    """Prefill 10 tokens, then one token at a time over the paged cache (block size 8, scattered
    blocks), against one forward over all 24."""
    prompt = _prompt(model)
    full = _logits(_runner(model, attention=attention), prompt)
    runner = _runner(model, attention=attention)
    steps = [_logits(runner, prompt[:10])]
    for pos in range(10, len(prompt)):
        steps.append(_logits(runner, prompt[pos : pos + 1], num_cached=pos, batch_id=pos))
    incremental = torch.cat(steps)
    assert float((incremental - full).abs().max() / full.abs().max()) <= 1e-5


def test_amb_changes_memory_not_the_result(model):
    """The naive path's K*Q intermediate split into head steps: unlimited, two steps, one head a step."""
    prompt = _prompt(model)
    kq_per_head = len(prompt) * len(prompt) * 4
    heads = model.config.num_heads
    results = []
    for amb_bytes, num_steps in ((0, 1), (kq_per_head * heads // 2, 2), (kq_per_head, heads)):
        assert len(plan_head_steps(heads, kq_per_head, amb_bytes / 2**20)) == num_steps
        results.append(_logits(_runner(model, attention="naive", amb_mib=amb_bytes / 2**20), prompt))
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0], results[2])


def test_a_mixed_batch_gives_each_sequence_its_logits_alone(model):
    """One micro-batch with a decode token (absorbed path) and a 20-token prompt (decompressed path): each
    path gathers its rows, so each sequence's logits equal its run in a batch of its own (within fp32 rounding:
    the CPU's matmuls round by batch shape)."""
    decoding, prompting = _prompt(model, 9), _prompt(model, 20)

    def run(chunks):
        runner = _runner(model, attention="auto", decode_threshold=4)  # 1 new token absorbed, 20 not
        assert runner.takes_decompressed(20) and not runner.takes_decompressed(1)
        warm = SequenceChunk("d", decoding[:8], 0, [5, 2], sample=False, return_logits=True)
        runner.finish(MicroBatch(0, [warm]), runner.forward(MicroBatch(0, [warm])))  # d's first 8 cached
        batch = MicroBatch(1, chunks)
        return {k: torch.from_numpy(v) for k, v in runner.finish(batch, runner.forward(batch)).logits.items()}

    decode = SequenceChunk("d", decoding[8:], 8, [5, 2], sample=False, return_logits=True)
    prompt = SequenceChunk("p", prompting, 0, [9, 0, 3], sample=False, return_logits=True)
    mixed = run([decode, prompt])
    assert set(mixed) == {"d", "p"}
    for name, alone in (("d", run([decode])["d"]), ("p", run([prompt])["p"])):
        assert mixed[name].shape == alone.shape
        assert float((mixed[name] - alone).abs().max() / alone.abs().max()) <= 1e-5, name
