"""Every weight type we claim to read goes through gguf's own dequantizer into the right shape."""

import gguf
import numpy as np
import pytest
import torch

from mlapipe.runtime import Engine
from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.tiny_models import write_tiny_model
from tests.gguf_edit import rewrite_gguf

Q = gguf.GGMLQuantizationType
# Byte offsets of each K-quant block's fp16 scales ("d", "dmin"): random bytes there could be inf/NaN.
FP16_FIELDS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q2_K: (80, 82), Q.Q3_K: (108,)}


def _random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Valid-looking raw rows of `qtype`: quantized by gguf where it can, else random bits with sane scales."""
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    try:
        return gguf.quants.quantize(values, qtype)
    except NotImplementedError:
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (rows, cols // block_elems, block_bytes), dtype=np.uint8)
        for offset in FP16_FIELDS[qtype]:
            scale = np.full((rows, cols // block_elems), 0.01, dtype=np.float16)
            raw[:, :, offset : offset + 2] = scale.view(np.uint8).reshape(rows, -1, 2)
        return raw.reshape(rows, -1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    # hidden 256: K-quants pack 256 values per block along each row
    return write_tiny_model(
        tmp_path_factory.mktemp("q") / "f32.gguf",
        "v2",
        num_hidden_layers=2,
        hidden_size=256,
        num_attention_heads=2,
    )


@pytest.mark.parametrize(
    "qtype", [Q.F16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
)
def test_weight_type_is_read_and_runs(base, tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    names = ["blk.1.ffn_gate_exps.weight", "blk.0.attn_kv_a_mqa.weight", "output.weight"]  # rows of 256
    model = GGUFModel(base)
    replace = {}
    for name in names:
        info = next(t for t in model.tensors.values() if t.gguf_name == name)
        rows, cols = int(np.prod(info.shape[:-1])), info.shape[-1]
        raw = _random_blocks(qtype, rows, cols, rng)
        raw = raw.reshape(*info.shape[:-1], -1)  # the writer reads the tensor's shape off the byte array
        replace[name] = (raw, qtype)
    path = rewrite_gguf(base, str(tmp_path / f"{qtype.name}.gguf"), replace)
    quantized = GGUFModel(path)
    for name, (raw, _) in replace.items():
        ours = next(n for n, t in quantized.tensors.items() if t.gguf_name == name)
        assert quantized.tensors[ours].qtype == qtype
        expected = gguf.quants.dequantize(raw, qtype)
        np.testing.assert_array_equal(quantized.read(ours), expected.reshape(quantized.tensors[ours].shape))
    with Engine(path, block_size=16) as engine:
        scores = engine.score([5, 6, 7, 8, 9, 10])
    assert len(scores) == 5 and all(np.isfinite(scores))
    assert torch.tensor(scores).std() > 0
