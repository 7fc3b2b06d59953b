"""Weights kept in their GGUF blocks: the same model as dequantized on load, files and random recipes.

On CPU a QuantTensor is decoded by the torch reference decoders at each use, so kept-quantized and
dequantized-on-load run the same arithmetic on the same values: the logits agree to fp32 rounding
(1e-5 relative). The tests also check the weights really stayed QuantTensors, so a loader that silently
decoded everything would fail them.
"""

import gguf
import numpy as np
import pytest
import torch

from mlapipe.kernels.quant.tensor import QuantTensor
from mlapipe.kernels.quant.types import Q8_0_PLANES
from mlapipe.runtime import Engine, SamplingParams
from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.microbatch import MicroBatch, SequenceChunk
from mlapipe.runtime.shapes import RandomModel, random_spec
from mlapipe.runtime.tiny_models import write_tiny_model
from mlapipe.runtime.weight_storage import kernel_types
from mlapipe.workers.model_runner import ModelRunner
from tests.gguf_edit import rewrite_gguf

Q = gguf.GGMLQuantizationType
# hidden, q-LoRA, kv-LoRA, heads x v and expert widths of 256: every row is whole Q4_K blocks
DIMS = dict(
    hidden_size=256,
    intermediate_size=256,
    moe_intermediate_size=256,
    q_lora_rank=256,
    kv_lora_rank=256,
    num_attention_heads=2,
    num_key_value_heads=2,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=128,
    num_hidden_layers=2,
)
KEEP_F32 = ("_norm.weight", "ffn_gate_inp.weight", "exp_probs_b.bias")


def _random_q4_k(shape, rng) -> np.ndarray:
    """Valid Q4_K rows: random quants and 6-bit scales/mins, fp16 d and dmin of a realistic size
    (gguf cannot quantize Q4_K), as (*lead, rows, row_bytes)."""
    *lead, cols = shape
    blocks = int(np.prod(lead)) * cols // 256
    raw = rng.integers(0, 256, (blocks, 144), dtype=np.uint8)
    scales = np.stack([rng.uniform(2e-4, 6e-4, blocks), rng.uniform(0, 4e-4, blocks)], axis=1)
    raw[:, 0:4] = scales.astype(np.float16).view(np.uint8).reshape(blocks, 4)
    return raw.reshape(*lead, cols // 256 * 144)


@pytest.fixture(scope="module")
def q8_0_file(tmp_path_factory):
    return write_tiny_model(
        tmp_path_factory.mktemp("q8") / "q8_0.gguf", "v3", seed=3, weight_type="Q8_0", num_hidden_layers=2
    )


@pytest.fixture(scope="module")
def q4_k_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("q4k")
    base = write_tiny_model(folder / "f32.gguf", "v3", seed=4, **DIMS)
    rng = np.random.default_rng(4)
    replace = {
        t.name: (_random_q4_k([int(d) for d in reversed(t.shape)], rng), Q.Q4_K)
        for t in gguf.GGUFReader(base).tensors
        if len(t.shape) > 1 and not t.name.endswith(KEEP_F32)
    }
    return rewrite_gguf(base, str(folder / "q4_k.gguf"), replace)


def _logits(
    path: str, prompt: list[int], dequantize: bool, attention: str
) -> tuple[torch.Tensor, ModelRunner]:
    model = GGUFModel(path)
    runner = ModelRunner(model, 0, model.config.num_layers, attention=attention, dequantize=dequantize)
    runner.allocate_kv_cache(num_blocks=12, block_size=16)
    batch = MicroBatch(0, [SequenceChunk("r", prompt, 0, list(range(12)), sample=False, return_logits=True)])
    return torch.from_numpy(runner.finish(batch, runner.forward(batch)).logits["r"]), runner


def _quant_tensors(runner: ModelRunner) -> dict[str, int]:
    shard = runner.shard
    found = {"embed": shard.embed, "head": shard.head}
    for layer in shard.layers:
        found[f"{layer.index}.wo"] = layer.attention.wo
        if layer.moe is not None:
            found[f"{layer.index}.experts"] = layer.moe.w_gate_up
        else:
            found[f"{layer.index}.mlp"] = layer.mlp.gate_up
    return {name: w.qtype for name, w in found.items() if isinstance(w, QuantTensor)}


@pytest.mark.parametrize("file_type, qtype", [("q8_0_file", Q.Q8_0), ("q4_k_file", Q.Q4_K)])
@pytest.mark.parametrize("length, attention", [(24, "absorbed"), (24, "naive"), (150, "auto")])
def test_kept_quantized_logits_equal_dequantized_on_load(request, file_type, qtype, length, attention):
    """150 tokens take the MoE block's prefill form (shared experts as their own MLP), 24 the decode form
    (shared experts in the routed launch)."""
    if qtype not in kernel_types():
        pytest.skip(f"no {qtype.name} kernel yet: the type loads dequantized")
    path = request.getfixturevalue(file_type)
    prompt = torch.randint(4, 380, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    kept, runner = _logits(path, prompt, dequantize=False, attention=attention)
    decoded, oracle = _logits(path, prompt, dequantize=True, attention=attention)
    held = _quant_tensors(runner)
    assert set(held) == {"embed", "head", "0.wo", "0.mlp", "1.wo", "1.experts"}
    assert set(held.values()) == {int(qtype)}
    assert not _quant_tensors(oracle)
    assert decoded.abs().max() > 1.0  # real logits, not a degenerate zero model
    relative = float((kept - decoded).abs().max() / decoded.abs().max())
    assert relative <= 1e-5, relative


def test_engine_scores_and_tokens_equal_on_a_quantized_file(q4_k_file):
    if Q.Q4_K not in kernel_types():
        pytest.skip("no Q4_K kernel yet")
    prompt = list(range(5, 45))
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    runs = []
    for dequantize in (False, True):
        with Engine(q4_k_file, block_size=16, dequantize_weights=dequantize) as engine:
            runs.append((engine.score(prompt), engine.generate([prompt], params)[0].token_ids))
    (kept_scores, kept_tokens), (scores, tokens) = runs
    assert kept_tokens == tokens
    np.testing.assert_allclose(kept_scores, scores, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("file_type", ["q8_0_file", "q4_k_file"])
def test_quantized_kernels_on_a_gpu_match_bf16_dequantized_on_load(request, file_type):
    """On a GPU the blocks go to the Triton kernels with bf16 activations, the oracle to cuBLAS on
    weights decoded to bf16 at load: the same values in a different summation order, so bf16 rounding
    (~1e-2 of the logits' range) is all that may differ."""
    path = request.getfixturevalue(file_type)
    prompt = list(range(5, 45))
    model = GGUFModel(path)
    out = []
    for dequantize in (False, True):
        runner = ModelRunner(model, 0, model.config.num_layers, device="cuda", dequantize=dequantize)
        runner.allocate_kv_cache(num_blocks=12, block_size=16)
        batch = MicroBatch(
            0, [SequenceChunk("r", prompt, 0, list(range(12)), sample=False, return_logits=True)]
        )
        out.append(torch.from_numpy(runner.finish(batch, runner.forward(batch)).logits["r"]))
        assert bool(_quant_tensors(runner)) != dequantize
        if file_type == "q8_0_file" and not dequantize:  # the GEMM weights as planes, the embedding as read
            kinds = _quant_tensors(runner)
            assert kinds.pop("embed") == Q.Q8_0 and set(kinds.values()) == {Q8_0_PLANES}, kinds
    kept, decoded = out
    assert float((kept - decoded).abs().max() / decoded.abs().max()) <= 3e-2


# random weights of a recipe -------------------------------------------------------------------------
SPEC = random_spec("v3-tiny", seed=5, wtype="UD-Q2_K_XL")
PROMPTS = [list(range(5, 40)), [40, 41, 42]]


def test_recipe_types_reach_the_device():
    """The random recipe model holds each tensor in the recipe's type, as QuantTensors where a kernel
    exists; the shared experts (Q6_K) run beside the routed ones (Q2_K/Q3_K) as their own MLP."""
    model = RandomModel(SPEC)
    types = {name: info.qtype for name, info in model.tensors.items()}
    assert types["layers.1.moe.w_gate"] == Q.Q2_K and types["layers.1.moe.w_down"] == Q.Q3_K
    assert types["layers.1.shared.w_up"] == Q.Q6_K and types["layers.0.mlp.w_down"] == Q.Q6_K
    assert types["layers.2.attn.wq_b"] == Q.Q4_K and types["layers.2.attn.wkv_b"] == Q.Q8_0
    assert types["embed"] == Q.Q4_K and types["head"] == Q.Q6_K and types["layers.3.moe.router"] == Q.F32
    runner = ModelRunner(model, 0, model.config.num_layers)
    moe = runner.shard.layers[1].moe
    if Q.Q2_K in kernel_types():
        assert isinstance(moe.w_gate_up, QuantTensor) and moe.w_gate_up.qtype == Q.Q2_K
        assert moe.w_gate_up.shape == (16, 512, 256)
    if Q.Q6_K in kernel_types():
        assert moe.shared_mlp is not None and moe.shared_mlp.gate_up.qtype == Q.Q6_K


@pytest.fixture(scope="module")
def one_stage():
    with Engine(SPEC, block_size=16, devices="cpu") as engine:
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        return [r.token_ids for r in engine.generate(PROMPTS, params)], engine.score(PROMPTS[0])


def test_recipe_model_two_cpu_stages_match_one(ray_local, one_stage):
    tokens, scores = one_stage
    assert np.isfinite(scores).all() and np.std(scores) > 0
    with Engine(SPEC, pipeline=2, use_ray=True, block_size=16, devices="cpu") as engine:
        assert [s.num_layers for s in engine.plan.stages] == [2, 2]
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        assert [r.token_ids for r in engine.generate(PROMPTS, params)] == tokens
        # one stage in this process sums its matmuls on two threads, a stage actor on one: the same to ~1e-6
        np.testing.assert_allclose(engine.score(PROMPTS[0]), scores, rtol=1e-5, atol=1e-5)


def test_a_file_written_in_the_recipe_loads_like_the_random_recipe_model(tmp_path):
    """Our writer's V3-tiny-shaped file (real tensor names, split in 3 shards as gguf-split writes them)
    with every tensor in the recipe's type loads with the random-weight path's types and per-layer device
    bytes, and runs."""
    from mlapipe.kernels.quant.random_blocks import random_quant_tensor
    from mlapipe.runtime.gguf_model import our_name
    from mlapipe.runtime.planner import layer_weight_bytes

    random_model = RandomModel(SPEC)
    cfg = random_model.config
    shape = dict(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.expert_intermediate_size,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        num_hidden_layers=cfg.num_layers,
        first_k_dense_replace=cfg.num_dense_layers,
        n_routed_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_token,
        n_group=cfg.num_expert_groups,
        topk_group=cfg.num_expert_groups_used,
    )
    base = write_tiny_model(tmp_path / "f32.gguf", "v3", seed=6, **shape)
    replace = {}
    for t in gguf.GGUFReader(base).tensors:
        info = random_model.tensors[our_name(t.name)]
        if info.qtype != Q.F32:
            blocks = random_quant_tensor(info.shape, int(info.qtype), info.shape[-1] ** -0.5, t.name)
            replace[t.name] = (blocks.data.numpy(), info.qtype)
    path = rewrite_gguf(base, str(tmp_path / "ud_q2_k_xl.gguf"), replace, shards=3)
    assert path.endswith("ud_q2_k_xl-00001-of-00003.gguf")
    assert len(list(tmp_path.glob("ud_q2_k_xl-0000?-of-00003.gguf"))) == 3
    model = GGUFModel(path)
    assert {n: (t.qtype, t.num_bytes) for n, t in model.tensors.items()} == {
        n: (t.qtype, t.num_bytes) for n, t in random_model.tensors.items()
    }
    assert layer_weight_bytes(model) == layer_weight_bytes(random_model)
    with Engine(path, block_size=16) as engine:
        scores = engine.score(list(range(5, 30)))
    assert np.isfinite(scores).all() and np.std(scores) > 0


def test_the_block_manager_is_sized_from_the_memory_fraction():
    """The cache is what the weights and compute buffer leave of the fraction, in whole blocks; the
    scheduler's blocks and the stage's allocation follow it."""
    mib = 2**20
    with Engine(
        SPEC, devices="cpu", block_size=16, n_ctx=256, kv_memory_fraction=0.5, device_memory=64 * mib
    ) as engine:
        plan = engine.plan
        (stage,) = plan.stages
        per_token = engine.config.latent_dim * 4 * 4  # fp32 latent rows on CPU, 4 layers
        left = 32 * mib - stage.weight_bytes - stage.compute_bytes
        assert plan.num_kv_tokens == left // per_token // 16 * 16 > 4 * 256  # more than the fixed 4 x n_ctx
        assert engine.blocks.num_blocks * 16 == plan.num_kv_tokens
        kv = engine.executor.runner.kv_cache
        assert kv.shape[:3] == (4, engine.blocks.num_blocks, 16)
    with pytest.raises(ValueError, match="does not fit on cpu"):
        Engine(SPEC, devices="cpu", kv_memory_fraction=0.9, device_memory=4 * mib)


@pytest.mark.parametrize(
    "shape, shared, inter, types, joined",
    [
        # all Q8_0, 2 shared experts of 128: their down projection splits at whole 32-blocks -> one launch
        ("v2-lite", 2, 128, ("Q8_0", "Q8_0", "Q8_0", "Q8_0"), True),
        # llama.cpp's V2-Lite-like Q4_K: routed down falls back to Q5_0, shared down stays Q4_K and its
        # 2 x 128 columns do not split at 256-blocks -> the shared experts run as their own MLP
        ("v2-lite", 2, 128, ("Q4_K", "Q5_0", "Q4_K", "Q4_K"), False),
        # the Q2_K-class mix: routed Q2_K / Q3_K, shared Q6_K -> their own MLP
        ("v3", 1, 256, ("Q2_K", "Q3_K", "Q6_K", "Q6_K"), False),
    ],
)
def test_quantized_moe_block_equals_the_plain_composition(shape, shared, inter, types, joined):
    """Both forms of the MoE block (decode-sized, prefill-sized) on QuantTensor experts equal routed
    experts plus the shared MLP on the decoded weights."""
    from dataclasses import replace

    from mlapipe.kernels.quant.random_blocks import random_quant_tensor
    from mlapipe.kernels.quant.reference import dequantize_rows
    from mlapipe.runtime.shapes import SHAPES
    from mlapipe.workers.layers import FUSED_SHARED_MAX_TOKENS, MoEBlock
    from tests.test_moe_block import unfused

    base = SHAPES[shape]
    cfg = replace(
        base, hidden_size=256, num_experts=16, num_shared_experts=shared, expert_intermediate_size=inter,
    )  # fmt: skip
    E, H, n = cfg.num_experts, cfg.hidden_size, shared
    routed_gate_up, routed_down, shared_gate_up, shared_down = (Q[t] for t in types)
    shapes = {
        "moe.w_gate": ((E, inter, H), routed_gate_up),
        "moe.w_up": ((E, inter, H), routed_gate_up),
        "moe.w_down": ((E, H, inter), routed_down),
        "shared.w_gate": ((n * inter, H), shared_gate_up),
        "shared.w_up": ((n * inter, H), shared_gate_up),
        "shared.w_down": ((H, n * inter), shared_down),
    }
    quantized = {name: random_quant_tensor(s, int(t), s[-1] ** -0.5, name) for name, (s, t) in shapes.items()}
    g = torch.Generator().manual_seed(1)
    router = {"moe.router": torch.randn(E, H, generator=g) * H**-0.5}
    if cfg.gating == "sigmoid":
        router["moe.router_bias"] = torch.randn(E, generator=g) * 0.01
    decoded = {k: dequantize_rows(w.data, w.qtype).reshape(w.shape) for k, w in quantized.items()}
    block = MoEBlock(cfg, quantized | router)
    assert isinstance(block.w_gate_up, QuantTensor) and block.shared_in_stack == joined
    assert (block.shared_mlp is None) == joined
    x = torch.randn(FUSED_SHARED_MAX_TOKENS + 9, H, generator=g)
    expected = unfused(cfg, decoded | router, x)
    torch.testing.assert_close(block.forward(x), expected, rtol=1e-5, atol=1e-5)  # the prefill form
    decode_form = torch.cat([block.forward(x[i : i + 16]) for i in (0, 16)])
    torch.testing.assert_close(decode_form, expected[:32], rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 0.1
