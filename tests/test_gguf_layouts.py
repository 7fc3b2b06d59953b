"""Seeded HF DeepseekV2 / V3 written in each of the three MLA layouts, as one file and as 3 gguf-split
shards, F32: logits within 1e-4 of max|logit| of HF's, 32 greedy tokens identical.

The V3 model routes without expert groups here (n_group 1): the older and ik_llama.cpp converters write
no group counts, so only that model round-trips through every layout; grouped routing through a
mainline file is covered by test_hf_parity.py.
"""

import numpy as np
import pytest
import torch

from mlapipe.runtime import Engine, SamplingParams
from mlapipe.runtime.cli import main as mlapipe_main
from mlapipe.runtime.gguf_layouts import MLA_LAYOUTS
from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.gguf_writer import write_gguf
from mlapipe.runtime.microbatch import MicroBatch, SequenceChunk
from mlapipe.runtime.tiny_models import build_vocab, random_state_dict, tiny_config
from mlapipe.workers.model_runner import ModelRunner
from tests.hf_reference import hf_logits, hf_model

PROMPT_LEN, NEW_TOKENS = 16, 32


@pytest.fixture(scope="module")
def vocab():
    return build_vocab()


@pytest.fixture(scope="module", params=["v2", "v3"])
def reference(request, vocab):
    """(cfg, state dict, prompt, HF logits, HF's 32 greedy tokens), once per model kind."""
    overrides = {"n_group": 1, "topk_group": 1} if request.param == "v3" else {}
    cfg = tiny_config(request.param, len(vocab.tokens), num_hidden_layers=2, **overrides)
    sd = random_state_dict(cfg, seed=99)
    prompt = torch.randint(
        4, cfg["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(5)
    ).tolist()
    model = hf_model(cfg, sd)
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[
            0, PROMPT_LEN:
        ]
    return cfg, sd, prompt, hf_logits(model, prompt), greedy.tolist()


def _logits(model: GGUFModel, prompt: list[int]) -> torch.Tensor:
    runner = ModelRunner(model, 0, model.config.num_layers)
    runner.allocate_kv_cache(num_blocks=4, block_size=16)
    batch = MicroBatch(0, [SequenceChunk("r", prompt, 0, [2, 0], sample=False, return_logits=True)])
    return torch.from_numpy(runner.finish(batch, runner.forward(batch)).logits["r"])


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("layout", MLA_LAYOUTS)
def test_layout_and_shards_match_hf(reference, vocab, layout, shards, tmp_path):
    cfg, sd, prompt, ref_logits, ref_tokens = reference
    path = write_gguf(tmp_path / "model.gguf", cfg, sd, vocab, "F32", layout, shards=shards)
    model = GGUFModel(path)
    assert model.mla_layout == layout and len(model.paths) == shards
    ours = _logits(model, prompt)
    assert float((ours - ref_logits).abs().max() / ref_logits.abs().max()) <= 1e-4
    with Engine(path, block_size=16) as engine:
        tokens = engine.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))[
            0
        ].token_ids
    assert tokens == ref_tokens


def test_ik_split_tensors_hold_the_same_weights_as_kv_b(vocab, tmp_path):
    """ik's files carry attn_kv_b and its 2-D split copies; the loader reads kv_b, so check here that
    the copies (as the writer lays them out, and as the loader would read them) agree with it."""
    cfg = tiny_config("v2", len(vocab.tokens), num_hidden_layers=1)
    model = GGUFModel(write_gguf(tmp_path / "ik.gguf", cfg, random_state_dict(cfg, 3), vocab, layout="ik"))
    H, N, V, C = 4, cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    assert model.mla.source == "attn_kv_b"
    assert "layers.0.attn.wk_b" in model.file_tensors and "layers.0.attn.wk_b" not in model.tensors
    kv_b = model.read("layers.0.attn.wkv_b").reshape(H, N + V, C)
    k_b = model.read("layers.0.attn.wk_b")  # (H*C, N)
    v_b = model.read("layers.0.attn.wv_b")  # (H*V, C)
    np.testing.assert_array_equal(k_b.reshape(H, C, N).transpose(0, 2, 1), kv_b[:, :N])
    np.testing.assert_array_equal(v_b.reshape(H, V, C), kv_b[:, N:])
    layer = model.read_layer(0)
    np.testing.assert_array_equal(layer["attn.w_uk"], kv_b[:, :N])
    np.testing.assert_array_equal(layer["attn.w_uv"], kv_b[:, N:])


@pytest.mark.parametrize(
    "layout, head_count_kv, has_mla_keys",
    [("kv_b", 4, False), ("ik", 4, False), ("mainline", 1, True)],
)
def test_each_layout_has_its_converters_metadata(
    vocab, tmp_path, capsys, layout, head_count_kv, has_mla_keys
):
    cfg = tiny_config("v3", len(vocab.tokens), num_hidden_layers=2)
    path = write_gguf(tmp_path / "m.gguf", cfg, random_state_dict(cfg, 3), vocab, layout=layout, shards=3)
    model = GGUFModel(path)
    meta = model.metadata
    assert meta["deepseek2.attention.head_count_kv"] == head_count_kv
    assert ("deepseek2.attention.key_length_mla" in meta) == has_mla_keys
    assert ("deepseek2.expert_group_count" in meta) == (layout == "mainline")
    assert meta["split.count"] == 3 and meta["split.no"] == 0
    assert [p.rsplit("/", 1)[1] for p in model.paths] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    # inspect names the layout and where the weights come from
    assert mlapipe_main(["inspect", "-m", model.paths[1]]) == 0
    out = capsys.readouterr().out
    assert f"MLA layout: {layout}:" in out and f"weights read from {model.mla.source}" in out
    assert "shards: 3" in out
