"""Bad input gets a clear error naming the file and the problem, from the API and from the CLI."""

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from mlapipe.runtime import Engine, ModelFileError, PromptError
from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.gguf_writer import write_gguf
from mlapipe.runtime.tiny_models import build_vocab, random_state_dict, tiny_config, write_tiny_model


@pytest.fixture(scope="module")
def parts():
    vocab = build_vocab()
    cfg = tiny_config("v2", len(vocab.tokens), num_hidden_layers=2)
    return cfg, random_state_dict(cfg, seed=0), vocab


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("good") / "good.gguf", "v2", num_hidden_layers=2)


def _expect(path, *fragments):
    with pytest.raises(ModelFileError) as info:
        GGUFModel(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_not_a_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("this is a text file, not a model\n")
    _expect(path, "not a GGUF file")


def test_missing_file(tmp_path):
    _expect(tmp_path / "absent.gguf", "no such file")


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_file(good_file, tmp_path, keep):
    data = Path(good_file).read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    _expect(path, "truncated")


def test_wrong_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _expect(path, "unsupported architecture 'llama'")


def test_missing_tensor(parts, tmp_path):
    cfg, sd, vocab = parts
    sd = {k: v for k, v in sd.items() if k != "model.layers.1.self_attn.o_proj.weight"}
    _expect(write_gguf(tmp_path / "m.gguf", cfg, sd, vocab), "missing tensor 'blk.1.attn_output.weight'")


def test_wrong_tensor_shape(parts, tmp_path):
    cfg, sd, vocab = parts
    sd = dict(sd)
    sd["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] = np.ones((40, 64), dtype=np.float32)
    _expect(
        write_gguf(tmp_path / "m.gguf", cfg, sd, vocab),
        "'blk.0.attn_kv_a_mqa.weight' has shape [40, 64]",
        "expected [48, 64]",
    )


def test_prompt_longer_than_context(good_file):
    with Engine(good_file, n_ctx=32, block_size=16) as engine:
        with pytest.raises(
            PromptError, match="prompt is 40 tokens, longer than the context allows: n_ctx=32"
        ):
            engine.generate([[5] * 40])
        with pytest.raises(PromptError, match="outside the vocabulary"):
            engine.generate([[5, 10_000]])
        # the engine stays usable after refusing a prompt
        assert len(engine.generate([[5, 6, 7]])[0].token_ids) > 0


def test_cli_reports_errors_without_a_traceback(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00")  # a header cut short after the version
    done = subprocess.run(
        [sys.executable, "-m", "mlapipe.runtime.cli", "inspect", "-m", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"mlapipe: error: {path}: truncated or corrupt GGUF header" in done.stderr
