"""Every weight type the loader reads gives, through the loader, exactly gguf's own dequantization.

One test per type: three tensors of a tiny file (an expert stack, a 2-D weight, the output head, rows
of 256 values) rewritten as that type: quantized by gguf where gguf can, else random bytes with sane
fp16 scales (kernels/quant's write_scales knows where each type keeps them). The loaded values
(on the CPU device, through the same path a GPU load takes) must equal gguf.quants.dequantize bit for
bit, read_blocks must hand back the file's bytes in the (*lead, rows, row_bytes) contract, and for a
few types the whole model must run.
"""

import gguf
import numpy as np
import pytest
import torch

from mlapipe.kernels.quant.random_blocks import write_scales
from mlapipe.kernels.quant.types import QUANT_TYPES
from mlapipe.runtime import Engine
from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.gguf_types import SUPPORTED_TYPES
from mlapipe.runtime.tiny_models import write_tiny_model
from tests.gguf_edit import rewrite_gguf

Q = gguf.GGMLQuantizationType
NAMES = ["blk.1.ffn_gate_exps.weight", "blk.0.attn_kv_a_mqa.weight", "output.weight"]  # rows of 256
TYPES = sorted((t for t in SUPPORTED_TYPES if t != Q.F32), key=int)


def _random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Valid raw rows of `qtype`: quantized by gguf where it can, else random bits with sane scales."""
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    try:
        return gguf.quants.quantize(values, qtype).view(np.uint8)  # F16 / BF16 come as 2-byte values
    except NotImplementedError:
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        raw = torch.from_numpy(
            rng.integers(0, 256, (rows * cols // block_elems, block_bytes), dtype=np.uint8)
        )
        if int(qtype) in QUANT_TYPES:
            n, dmin = raw.shape[0], None
            if len(QUANT_TYPES[int(qtype)].fp16_fields) == 2:
                dmin = torch.full((n,), 0.005)
            write_scales(raw, int(qtype), torch.full((n,), 0.01), dmin)
        return raw.numpy().reshape(rows, -1)


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


def _rewrite(base: str, target: str, qtype) -> tuple[str, dict]:
    rng = np.random.default_rng(int(qtype))
    model = GGUFModel(base)
    replace = {}
    for name in NAMES:
        info = next(t for t in model.tensors.values() if t.gguf_name == name)
        raw = _random_blocks(qtype, int(np.prod(info.shape[:-1])), info.shape[-1], rng)
        replace[name] = (raw.reshape(*info.shape[:-1], -1), qtype)  # the writer reads the shape off the bytes
    return rewrite_gguf(base, target, replace), replace


def test_every_type_gguf_dequantizes_is_covered():
    """The loader claims the types gguf's quants module decodes; each of them is tested below."""
    iq = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS"]
    k = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
    legacy = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16"]
    assert {Q[name] for name in iq + k + legacy} <= set(TYPES)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_type_loads_as_gguf_dequantizes_it(base, tmp_path, qtype):
    path, replace = _rewrite(base, str(tmp_path / f"{qtype.name}.gguf"), qtype)
    model = GGUFModel(path)
    for gguf_tensor, (raw, _) in replace.items():
        ours = next(n for n, t in model.tensors.items() if t.gguf_name == gguf_tensor)
        info = model.tensors[ours]
        assert info.qtype == qtype
        expected = gguf.quants.dequantize(raw, qtype).reshape(info.shape)
        loaded = model.load(ours, "cpu", torch.float32).numpy()
        np.testing.assert_array_equal(loaded, expected)  # bit for bit (NaN patterns too)
        blocks, code, shape = model.read_blocks(ours)
        assert (code, shape, blocks.dtype) == (int(qtype), info.shape, np.uint8)
        assert blocks.shape == (*info.shape[:-1], raw.shape[-1])
        np.testing.assert_array_equal(blocks, raw)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.IQ2_XXS, Q.IQ4_XS], ids=lambda q: q.name)
def test_quantized_model_runs(base, tmp_path, qtype):
    path, _ = _rewrite(base, str(tmp_path / f"{qtype.name}.gguf"), qtype)
    with Engine(path, block_size=16) as engine:
        scores = engine.score([5, 6, 7, 8, 9, 10])
    assert len(scores) == 5 and all(np.isfinite(scores))
    assert torch.tensor(scores).std() > 0
