"""What the loader says about files it cannot run, and the metadata variants real files come in."""

import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from mlapipe.runtime import ModelFileError
from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.gguf_writer import write_gguf
from mlapipe.runtime.tiny_models import build_vocab, random_state_dict, tiny_config

V = gguf.GGUFValueType


@pytest.fixture(scope="module")
def parts():
    vocab = build_vocab()
    cfg = tiny_config("v2", len(vocab.tokens), num_hidden_layers=2)
    return cfg, random_state_dict(cfg, seed=0), vocab


def _message(path) -> str:
    with pytest.raises(ModelFileError) as info:
        GGUFModel(path)
    return str(info.value)


def _edit_metadata(source: str, target: str, changes: dict) -> str:
    """Copies `source` with metadata keys replaced ((value, GGUFValueType)) or removed (None)."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, "deepseek2")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in changes:
            continue
        if field.types[0] == V.ARRAY:
            writer.add_array(field.name, field.contents())
        else:
            writer.add_key_value(field.name, field.contents(), field.types[0])
    for key, change in changes.items():
        if change is not None:
            writer.add_key_value(key, change[0], change[1])
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data).reshape([int(d) for d in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


# split files ---------------------------------------------------------------------------------------
def test_missing_shard_is_named(parts, tmp_path):
    first = write_gguf(tmp_path / "m.gguf", *parts, shards=3)
    second = str(tmp_path / "m-00002-of-00003.gguf")
    os.remove(second)
    for given in (first, str(tmp_path / "m-00003-of-00003.gguf")):  # found from any shard
        message = _message(given)
        assert message.startswith(given) and "shard 2 (" + second + ")" in message and "missing" in message


def test_shard_renamed_out_of_its_set(parts, tmp_path):
    first = write_gguf(tmp_path / "m.gguf", *parts, shards=3)
    lone = str(tmp_path / "lone.gguf")
    os.rename(first, lone)
    assert "cannot be found" in _message(lone) and "-00001-of-00003.gguf" in _message(lone)


def test_shard_from_another_split(parts, tmp_path):
    write_gguf(tmp_path / "m.gguf", *parts, shards=3)
    write_gguf(tmp_path / "other.gguf", *parts, shards=2)
    os.replace(tmp_path / "other-00002-of-00002.gguf", tmp_path / "m-00002-of-00003.gguf")
    message = _message(str(tmp_path / "m-00001-of-00003.gguf"))
    assert "m-00002-of-00003.gguf" in message and "expected 1 / 3" in message


# types ---------------------------------------------------------------------------------------------
def _set_tensor_type(path: str, tensor: str, code: int) -> None:
    """Rewrites one tensor's ggml type code in the header, as a file ik_llama.cpp quantized has it."""
    data = bytearray(Path(path).read_bytes())
    at = data.index(struct.pack("<Q", len(tensor)) + tensor.encode()) + 8 + len(tensor)
    (n_dims,) = struct.unpack_from("<I", data, at)
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, code)
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("code, name", [(139, "IQ4_K"), (144, "IQ4_KS"), (212, "Q4_K_R4")])
def test_ik_llama_cpp_only_type_is_named(parts, tmp_path, code, name):
    path = write_gguf(tmp_path / "ik.gguf", *parts, layout="ik")
    _set_tensor_type(path, "blk.1.ffn_down_exps.weight", code)
    message = _message(path)
    assert message.startswith(path) and "\n" not in message
    assert f"'blk.1.ffn_down_exps.weight' has type {name}" in message and "ik_llama.cpp-specific" in message


# metadata ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, change, fragment",
    [
        (
            "deepseek2.attention.layer_norm_rms_epsilon",
            ("3", V.STRING),
            "holds a string ('3'), expected a float",
        ),
        ("deepseek2.block_count", (2.0, V.FLOAT32), "holds a float (2.0), expected an integer"),
        ("deepseek2.expert_weights_norm", (1, V.UINT32), "holds an integer (1), expected a bool"),
        ("deepseek2.block_count", (100_000, V.UINT32), "= 100000 is outside 1..1024"),
        ("deepseek2.expert_gating_func", (3, V.UINT32), "expert_gating_func = 3"),
        ("deepseek2.attention.kv_lora_rank", None, "missing metadata key 'deepseek2.attention.kv_lora_rank'"),
        ("deepseek2.attention.head_count_kv", (2, V.UINT32), "head_count_kv = 2"),
        ("deepseek2.rope.scaling.type", ("linear", V.STRING), "linear (factor 8) is not supported"),
        # a damaged key name: neither gguf's writer nor mlapipe knows it
        ("deepseek2.expert_weights_nerm", (True, V.BOOL), "unknown metadata key 'deepseek2.expert_weights_nerm'"),
    ],
)
def test_bad_metadata_names_the_key_and_file(parts, tmp_path, key, change, fragment):
    source = write_gguf(tmp_path / "good.gguf", *parts)
    path = _edit_metadata(source, str(tmp_path / "bad.gguf"), {key: change})
    message = _message(path)
    assert message.startswith(path) and fragment in message, message


def test_metadata_variants_llama_cpp_accepts(parts, tmp_path):
    """Keys llama.cpp treats as optional for deepseek2, absent or in their older forms."""
    source = write_gguf(tmp_path / "good.gguf", *parts)
    base = GGUFModel(source).config
    variants = {
        # V2 files from before V3 support: no gating function (softmax), no norm flag
        "deepseek2.expert_gating_func": None,
        "deepseek2.expert_weights_norm": None,
        "deepseek2.expert_group_count": None,
        # the older name of the rope factor
        "deepseek2.rope.scaling.factor": None,
        "deepseek2.rope.scale_linear": (8.0, V.FLOAT32),
        "deepseek2.vocab_size": None,  # then the token list's length
    }
    path = _edit_metadata(source, str(tmp_path / "v.gguf"), variants)
    # per-layer head counts as an array (llama.cpp's get_key_or_arr)
    path = _with_array(path, str(tmp_path / "v2.gguf"), "deepseek2.attention.head_count", [4, 4])
    cfg = GGUFModel(path).config
    assert cfg == base
    assert (cfg.gating, cfg.num_expert_groups, cfg.rope_scaling_factor) == ("softmax", 1, 8.0)


def test_keys_gguf_defines_that_deepseek2_does_not_use_are_ignored(parts, tmp_path):
    """Converters write keys of gguf's key list that llama.cpp's deepseek2 never reads: files load."""
    source = write_gguf(tmp_path / "good.gguf", *parts)
    extra = {
        "deepseek2.rope.scaling.finetuned": (False, V.BOOL),
        "deepseek2.nextn_predict_layers": (0, V.UINT32),
    }
    path = _edit_metadata(source, str(tmp_path / "extra.gguf"), extra)
    assert GGUFModel(path).config == GGUFModel(source).config


def _with_array(source: str, target: str, key: str, values: list[int]) -> str:
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, "deepseek2")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", key):
            continue
        if field.types[0] == V.ARRAY:
            writer.add_array(field.name, field.contents())
        else:
            writer.add_key_value(field.name, field.contents(), field.types[0])
    writer.add_array(key, values)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data).reshape([int(d) for d in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
