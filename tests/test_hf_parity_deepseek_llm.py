"""A DeepSeek-V2 file as V2 / V2-Lite ship (tokenizer.ggml.pre = deepseek-llm, R1-style user-defined
`<think>` tokens) runs from text exactly as HF does: HF `tokenizers` from tokenizer.json for the text,
HF transformers DeepseekV2 for the model, on the same seeded weights."""

import dataclasses

import pytest
import torch

from mlapipe.runtime import Engine, SamplingParams
from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.gguf_writer import write_gguf
from mlapipe.runtime.microbatch import MicroBatch, SequenceChunk
from mlapipe.runtime.tiny_models import build_vocab, random_state_dict, tiny_config
from mlapipe.workers.model_runner import ModelRunner
from tests.hf_reference import hf_logits, hf_model
from tests.hf_tokenizer import USER_DEFINED, hf_tokenizer

PROMPT = (
    "<think>\nThe capital of France is Paris; \u039a\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1 "
    "\u1f7d\u212a, \u6df1\u5ea6\u6c42\u7d22 2048 tokens.</think> def f(x): return x * x"
)


@pytest.fixture(scope="module")
def v2_file(tmp_path_factory):
    vocab = build_vocab(pre="deepseek-llm")
    vocab = dataclasses.replace(
        vocab,
        tokens=[*vocab.tokens, "<think>", "</think>"],
        token_types=[*vocab.token_types, USER_DEFINED, USER_DEFINED],
    )
    cfg = tiny_config("v2", len(vocab.tokens))
    sd = random_state_dict(cfg, seed=1234)
    path = write_gguf(tmp_path_factory.mktemp("v2") / "v2-deepseek-llm.gguf", cfg, sd, vocab, "F32", "kv_b")
    return path, vocab, hf_model(cfg, sd)


def test_text_prompt_logits_and_greedy_tokens_match_hf(v2_file):
    path, vocab, reference = v2_file
    hf_tok = hf_tokenizer(vocab)
    prompt_ids = [vocab.bos_token_id, *hf_tok.encode(PROMPT, add_special_tokens=False).ids]
    assert prompt_ids[1] == len(vocab.tokens) - 2  # <think> is one token

    model = GGUFModel(path)
    assert model.metadata["tokenizer.ggml.pre"] == "deepseek-llm"
    runner = ModelRunner(model, 0, model.config.num_layers)
    runner.allocate_kv_cache(num_blocks=8, block_size=16)
    batch = MicroBatch(
        0, [SequenceChunk("r", prompt_ids, 0, list(range(8)), sample=False, return_logits=True)]
    )
    ours = torch.from_numpy(runner.finish(batch, runner.forward(batch)).logits["r"])
    ref = hf_logits(reference, prompt_ids)
    assert float((ours - ref).abs().max() / ref.abs().max()) <= 1e-4

    with Engine(path, block_size=16) as engine:
        assert engine.tokenizer.encode(PROMPT) == prompt_ids
        out = engine.generate(PROMPT, SamplingParams(max_tokens=32, ignore_eos=True))[0]
    assert out.prompt_token_ids == prompt_ids
    with torch.no_grad():  # an explicit mask: HF would take the BOS (id 0, also the pad id) for padding
        ids = torch.tensor([prompt_ids])
        theirs = reference.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False
        )
    theirs = theirs[0, len(prompt_ids) :].tolist()
    assert len(out.token_ids) == 32
    assert out.token_ids == theirs
    assert out.text == hf_tok.decode(theirs)
