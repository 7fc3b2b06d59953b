"""Our GGUF model vs HF transformers DeepseekV2/V3 on the same seeded random weights."""

import pytest
import torch

from mlapipe.runtime import Engine, SamplingParams
from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.gguf_writer import write_gguf
from mlapipe.runtime.microbatch import MicroBatch, SequenceChunk
from mlapipe.runtime.tiny_models import build_vocab, random_state_dict, tiny_config
from mlapipe.workers.model_runner import ModelRunner
from tests.hf_reference import hf_logits, hf_model, quantized_state_dict

PROMPT_LEN = 24


@pytest.fixture(scope="module")
def vocab():
    return build_vocab()


@pytest.fixture(scope="module", params=["v2", "v3"])
def checkpoint(request, vocab):
    cfg = tiny_config(request.param, len(vocab.tokens))
    return request.param, cfg, random_state_dict(cfg, seed=1234)


def _prompt(vocab_size: int, length: int = PROMPT_LEN, seed: int = 7) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (length,), generator=g).tolist()  # ids 0..3 are special


def _our_logits(path: str, token_ids: list[int], attention: str = "auto") -> torch.Tensor:
    model = GGUFModel(path)
    runner = ModelRunner(model, 0, model.config.num_layers, attention=attention)
    runner.allocate_kv_cache(num_blocks=4, block_size=16)
    batch = MicroBatch(0, [SequenceChunk("r", token_ids, 0, [2, 0], sample=False, return_logits=True)])
    return torch.from_numpy(runner.finish(batch, runner.forward(batch)).logits["r"])


def _relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("layout", ["mainline"])  # every layout and shards: test_gguf_layouts.py
def test_f32_logits_scores_and_greedy_tokens_match_hf(checkpoint, vocab, layout, tmp_path):
    kind, cfg, sd = checkpoint
    path = write_gguf(tmp_path / f"{kind}.gguf", cfg, sd, vocab, "F32", layout)
    reference = hf_model(cfg, sd)
    prompt = _prompt(cfg["vocab_size"])
    ref = hf_logits(reference, prompt)

    for attention in ("naive", "absorbed"):
        assert _relative(_our_logits(path, prompt, attention), ref) <= 1e-4, attention

    with Engine(path, block_size=16) as engine:
        scores = torch.tensor(engine.score(prompt))
        expected = torch.log_softmax(ref, dim=-1)[torch.arange(PROMPT_LEN - 1), torch.tensor(prompt[1:])]
        assert scores.shape == expected.shape
        torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)

        ours = engine.generate([prompt], SamplingParams(max_tokens=32, ignore_eos=True))[0].token_ids
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[
            0, PROMPT_LEN:
        ]
    assert len(ours) == 32
    assert ours == theirs.tolist()


# Tolerances for quantized files. Against HF running the *same dequantized weights* (quantized and
# dequantized by gguf's own code) the only difference left is arithmetic order, so the F32 bound (1e-4)
# applies: this is the check that the loader reads BF16 / Q8_0 correctly.
# Against the original F32 weights the difference is the quantization itself, and max|diff| is the
# wrong measure there: when two router scores are closer than the rounding error, a token picks a
# different expert and its logits move by O(1) (measured max|diff|/max|ref| up to 0.14 for BF16 and
# 0.31 for Q8_0 over seeds 1, 2, 1234). So we bound the mean: mean|diff| / mean|ref| measured
# 1.0-2.0% (BF16: 8 significant bits, <= 0.2% per weight) and 3-8% (Q8_0: 32-value blocks in amax/127
# steps, on weights with heavy tails), bounded at 5% and 15%. A real loader bug (wrong scale, a
# transposed tensor, a wrong block) gives errors of order 100%.
QUANT_MEAN_TOLERANCE = {"BF16": 0.05, "Q8_0": 0.15}


@pytest.mark.parametrize("weight_type", ["BF16", "Q8_0"])
def test_quantized_files_match_hf(checkpoint, vocab, weight_type, tmp_path):
    kind, cfg, sd = checkpoint
    # Q8_0 blocks run along each row's last axis; attn_k_b is kv_b transposed, so only the kv_b layout
    # quantizes the same 32-value blocks as quantized_state_dict does. BF16 is elementwise: either works.
    layout = "mainline" if weight_type == "BF16" else "kv_b"
    if layout == "kv_b":  # the older converters write no expert groups: the file's model has none
        cfg = cfg | {"n_group": 1, "topk_group": 1}
    path = write_gguf(tmp_path / f"{kind}-{weight_type}.gguf", cfg, sd, vocab, weight_type, layout)
    prompt = _prompt(cfg["vocab_size"])
    ours = _our_logits(path, prompt)
    same_weights = hf_logits(hf_model(cfg, quantized_state_dict(sd, weight_type)), prompt)
    assert _relative(ours, same_weights) <= 1e-4
    original = hf_logits(hf_model(cfg, sd), prompt)
    mean_error = float((ours - original).abs().mean() / original.abs().mean())
    assert 0 < mean_error <= QUANT_MEAN_TOLERANCE[weight_type]
