"""A decode step's attention hands the quantized q | latent projection's split partials straight to the
kernels that read them (kernels/partials.py): the layer's output and the latent cache keep the bits of the
summed path, and stay the torch path's values. Without a GPU the Triton kernels run in the interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    os.environ.setdefault("MLAPIPE_AUTOTUNE", "0")  # the interpreter cannot time configs

from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from mlapipe.kernels import norm_rope, reference  # noqa: E402
from mlapipe.kernels.quant import linear  # noqa: E402
from mlapipe.kernels.quant.random_blocks import random_quant_tensor  # noqa: E402
from mlapipe.runtime.shapes import SHAPES  # noqa: E402
from mlapipe.workers import attention  # noqa: E402
from tests.kernel_paths import take_path  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # the interpreter's dots want fp32
TOLERANCE = 2e-2 if DEVICE == "cuda" else 1e-5
PAGE = 4


def _layer(q_lora_rank: int):
    cfg = replace(
        SHAPES["v2-lite"], hidden_size=2048, num_heads=2, q_lora_rank=q_lora_rank, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
    )  # fmt: skip
    H, N, R, C, V = 2, 16, 16, 32, 16

    def quant(name, shape):
        return random_quant_tensor(shape, Q.Q8_0, 0.05, name, seed=11, device=DEVICE)

    def plain(name, shape, scale=0.2):
        generator = torch.Generator(device=DEVICE).manual_seed(len(name))
        return (torch.randn(shape, generator=generator, device=DEVICE) * scale).to(DTYPE)

    weights = {
        "attn.wkv_a": quant("wkv_a", (C + R, 2048)),
        "attn.kv_norm": torch.rand(C, device=DEVICE) + 0.5,
        "attn.w_uk": plain("w_uk", (H, N, C)),
        "attn.w_uv": plain("w_uv", (H, V, C)),
        "attn.wo": quant("wo", (2048, H * V)),
    }
    if q_lora_rank:
        weights["attn.wq_a"] = quant("wq_a", (q_lora_rank, 2048))
        weights["attn.q_norm"] = torch.rand(q_lora_rank, device=DEVICE) + 0.5
        weights["attn.wq_b"] = quant("wq_b", (H * (N + R), q_lora_rank))
    else:
        weights["attn.wq"] = quant("wq", (H * (N + R), 2048))
    return cfg, attention.MLAAttention(cfg, weights)


def _decode_step(cfg):
    """Two sequences with 5 and 9 cached tokens, one new token each, over a cache of random rows."""
    cached, tables = [5, 9], [[3, 0], [1, 4, 2]]
    slots = [tables[s][n // PAGE] * PAGE + n % PAGE for s, n in enumerate(cached)]
    group = attention.build_group([0, 1], [1, 1], cached, tables, [0, 1], torch.device(DEVICE))
    positions = torch.tensor(cached, device=DEVICE)
    inv_freq = norm_rope.yarn_inv_freq(cfg.qk_rope_head_dim, 10000.0, 40.0, 4096)
    cos, sin = norm_rope.rope_cos_sin(positions, inv_freq)
    meta = attention.AttentionMetadata(
        positions, torch.tensor(slots, device=DEVICE), cos, sin, absorbed=group, naive=None
    )
    generator = torch.Generator(device=DEVICE).manual_seed(5)
    x = torch.randn(2, cfg.hidden_size, generator=generator, device=DEVICE).to(DTYPE)
    cache = torch.randn(5, PAGE, cfg.kv_lora_rank + cfg.qk_rope_head_dim, generator=generator, device=DEVICE)
    return x, meta, cache.to(DTYPE)


def _run(layer, x, meta, cache, monkeypatch, kernels: str):
    """The layer's output (summed) and the cache it wrote, through the Triton kernels ('partials': as the
    model runs; 'summed': every split linear sums its own partials) or the torch references."""
    ranks = take_path(monkeypatch, kernels)
    cache = cache.clone()
    out = layer.forward(x, meta, cache)
    if out.dim() == 3:
        out = reference.sum_partials(out, x.dtype)
    return out, cache, ranks


@pytest.mark.parametrize("q_lora_rank", [0, 2048], ids=["v2", "v3"])  # 2048: wq_b gives partials too
def test_decode_attention_reads_the_projections_partials(q_lora_rank, monkeypatch):
    # more programs a SM in the plans, so V3's 2096-row wq_a | wkv_a also splits K on the interpreter's 2 SMs
    monkeypatch.setenv(linear.PROGRAMS_ENV, "64")
    cfg, layer = _layer(q_lora_rank)
    x, meta, cache = _decode_step(cfg)
    out, written, ranks = _run(layer, x, meta, cache, monkeypatch, "partials")
    # the q | latent projection, and V3's wq_b, gave partials (then o_proj's, summed by the layer's norm)
    assert ranks[: 2 if q_lora_rank else 1] == [3] * (2 if q_lora_rank else 1), ranks
    summed_out, summed_cache, summed_ranks = _run(layer, x, meta, cache, monkeypatch, "summed")
    assert set(summed_ranks) == {2}
    assert torch.equal(written.view(torch.uint8), summed_cache.view(torch.uint8))
    assert torch.equal(out.view(torch.uint8), summed_out.view(torch.uint8))
    torch_out, torch_cache, _ = _run(layer, x, meta, cache, monkeypatch, "torch")
    assert not torch.equal(torch_cache, cache)  # the new rows were written
    scale = torch_out.float().abs().max()
    assert float((out.float() - torch_out.float()).abs().max() / scale) < TOLERANCE
    assert torch.allclose(written.float(), torch_cache.float(), rtol=1e-5, atol=1e-5)
