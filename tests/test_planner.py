"""Pipeline planner: layer split by bytes or by user proportion, per-stage memory under amb, refusals."""

import itertools
import math
import os
import random
import subprocess
import sys
from dataclasses import replace

import pytest

from mlapipe.kernels.amb import MIB
from mlapipe.runtime.config import ModelConfig
from mlapipe.runtime.planner import (
    PlanError,
    check_fits,
    layer_weight_bytes,
    plan_for_model,
    plan_pipeline,
    split_layers,
)
from mlapipe.runtime.shapes import SHAPES


def v2_lite_config(**overrides) -> ModelConfig:
    """DeepSeek-V2-Lite's shape (BACKGROUND.md), built without a file."""
    return replace(SHAPES["v2-lite"], **overrides)


def _stage_totals(ranges, layer_bytes, embed, head):
    totals = [sum(layer_bytes[a:b]) for a, b in ranges]
    totals[0] += embed
    totals[-1] += head
    return totals


def _brute_force_best(layer_bytes, embed, head, num_stages):
    n, best = len(layer_bytes), math.inf
    for cuts in itertools.combinations(range(1, n), num_stages - 1):
        ends = [*cuts, n]
        ranges = list(zip([0, *cuts], ends))
        best = min(best, max(_stage_totals(ranges, layer_bytes, embed, head)))
    return best


def _assert_contiguous_cover(ranges, num_layers):
    assert ranges[0][0] == 0 and ranges[-1][1] == num_layers
    for (_, end), (first, _) in itertools.pairwise(ranges):
        assert end == first
    assert all(end - first >= 1 for first, end in ranges)


# layer split ----------------------------------------------------------------------------------------
def test_equal_layers_split_evenly():
    assert split_layers([10] * 8, 0, 0, 2) == [(0, 4), (4, 8)]
    assert split_layers([10] * 9, 0, 0, 3) == [(0, 3), (3, 6), (6, 9)]


def test_embedding_and_output_take_layers_off_the_end_stages():
    # stage 0 holds the 20-byte embedding, so it gets 3 layers to stage 1's 5: 50 / 50
    assert split_layers([10] * 8, 20, 0, 2) == [(0, 3), (3, 8)]
    assert split_layers([10] * 8, 0, 20, 2) == [(0, 5), (5, 8)]


@pytest.mark.parametrize("num_stages", [1, 2, 3, 5])
def test_split_minimises_the_heaviest_stage(num_stages):
    rng = random.Random(num_stages)
    for _ in range(20):
        layer_bytes = [rng.randint(1, 100) for _ in range(rng.randint(num_stages, 10))]
        embed, head = rng.randint(0, 200), rng.randint(0, 200)
        ranges = split_layers(layer_bytes, embed, head, num_stages)
        _assert_contiguous_cover(ranges, len(layer_bytes))
        heaviest = max(_stage_totals(ranges, layer_bytes, embed, head))
        assert heaviest == _brute_force_best(layer_bytes, embed, head, num_stages)


def test_every_stage_gets_a_layer_even_when_one_is_huge():
    # A giant embedding would leave stage 0 nothing if bytes alone decided.
    assert split_layers([1] * 4, 10**9, 0, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert split_layers([1] * 3, 10**9, 10**9, 3) == [(0, 1), (1, 2), (2, 3)]


def test_user_split_follows_proportions_like_tensor_split():
    assert split_layers([1] * 27, 0, 0, 2, split=[3, 1]) == [(0, 21), (21, 27)]  # 20.25 -> 21
    assert split_layers([1] * 8, 0, 0, 2, split=[1, 1]) == [(0, 4), (4, 8)]
    # the bytes do not matter once the user splits
    assert split_layers([100, 1, 1, 1], 0, 0, 2, split=[1, 1]) == [(0, 2), (2, 4)]
    assert split_layers([1] * 6, 0, 0, 3, split=[0.5, 0.25, 0.25]) == [(0, 3), (3, 5), (5, 6)]


def test_user_split_still_gives_every_stage_a_layer():
    # 100:1:1 over 4 layers gives ends 4, 4, 4; boundaries are pushed apart
    ranges = split_layers([1] * 4, 0, 0, 3, split=[100, 1, 1])
    assert ranges == [(0, 2), (2, 3), (3, 4)]
    ranges = split_layers([1] * 5, 0, 0, 3, split=[1, 1, 100])
    _assert_contiguous_cover(ranges, 5)
    assert ranges[-1] == (2, 5)


def test_any_user_split_covers_all_layers_with_at_least_one_each():
    rng = random.Random(1)
    for _ in range(200):
        num_layers = rng.randint(1, 12)
        num_stages = rng.randint(1, num_layers)
        split = [rng.choice([0.01, 0.5, 1, 3, 100]) for _ in range(num_stages)]
        _assert_contiguous_cover(split_layers([1] * num_layers, 0, 0, num_stages, split), num_layers)


@pytest.mark.parametrize(
    "num_stages, split, message",
    [
        (5, None, "5 pipeline stages for 4 layers"),
        (0, None, "at least one stage"),
        (2, [1, 1, 1], "3 values for 2 pipeline stages"),
        (2, [1, 0], "must be positive"),
    ],
)
def test_impossible_splits_are_refused(num_stages, split, message):
    with pytest.raises(ValueError, match=message):
        split_layers([1] * 4, 0, 0, num_stages, split)


# memory plan ------------------------------------------------------------------------------------------
def _plan(num_stages=2, **options):
    cfg = v2_lite_config()
    layer_bytes = [100 * MIB] * cfg.num_layers
    options = {"num_kv_tokens": 32768, "ubatch": 512} | options
    return plan_pipeline(cfg, layer_bytes, 200 * MIB, 200 * MIB, num_stages, **options)


def test_kv_is_tokens_times_latent_times_layers():
    plan = _plan(num_stages=3, num_kv_tokens=1000)
    for stage in plan.stages:
        assert stage.kv_bytes == 1000 * 576 * 2 * stage.num_layers
    assert sum(s.num_layers for s in plan.stages) == 27


def test_weights_include_embedding_first_and_output_last():
    plan = _plan(num_stages=3)
    first, middle, last = plan.stages
    assert first.weight_bytes == first.num_layers * 100 * MIB + 200 * MIB and first.has_embed
    assert middle.weight_bytes == middle.num_layers * 100 * MIB
    assert last.weight_bytes == last.num_layers * 100 * MIB + 200 * MIB and last.has_head


def test_lower_amb_lowers_compute_bytes_and_takes_more_head_steps():
    unlimited, medium, tiny = (_plan(amb_mib=amb).stages[0] for amb in (0, 64, 0.001))
    assert unlimited.num_head_steps == 1 < medium.num_head_steps < tiny.num_head_steps == 16
    assert unlimited.compute_bytes > medium.compute_bytes > tiny.compute_bytes
    # 32768 tokens x (128 + 64 + 128) x 2 bytes = 20 MiB per head: all 16 heads are 320 MiB, so 64 MiB
    # allows 3 heads per step, 6 steps; amb changes only the attention part, never weights or KV
    assert medium.num_head_steps == 6
    assert unlimited.compute_bytes - medium.compute_bytes == (16 - 3) * 20 * MIB
    assert unlimited.weight_bytes == tiny.weight_bytes and unlimited.kv_bytes == tiny.kv_bytes


def test_amb_per_stage():
    plan = _plan(num_stages=2, amb_mib=[0, 64])
    assert [s.amb_mib for s in plan.stages] == [0, 64]
    assert [s.num_head_steps for s in plan.stages] == [1, 6]
    assert "amb unlimited, 1 head step)" in plan.format()
    assert "amb 64 MiB, 6 head steps)" in plan.format()
    with pytest.raises(ValueError, match="3 amb values"):
        _plan(num_stages=2, amb_mib=[0, 64, 64])


def test_attention_is_sized_for_one_sequence_not_the_whole_cache():
    whole = _plan(num_kv_tokens=4 * 32768)
    one_sequence = _plan(num_kv_tokens=4 * 32768, n_ctx=32768)
    assert whole.stages[0].kv_bytes == one_sequence.stages[0].kv_bytes
    assert whole.stages[0].compute_bytes > one_sequence.stages[0].compute_bytes


def test_larger_ubatch_grows_moe_and_logits_buffers():
    small, large = _plan(amb_mib=1, ubatch=256), _plan(amb_mib=1, ubatch=2048)
    for a, b in zip(small.stages, large.stages):
        assert b.compute_bytes > a.compute_bytes
    # the last stage holds ubatch x vocab fp32 logits: 2048 x 102400 x 4 = 800 MiB
    assert large.stages[-1].compute_bytes >= 800 * MIB > large.stages[0].compute_bytes


def test_format_reads_like_buffer_lines():
    text = _plan(num_stages=2, amb_mib=256).format()
    lines = text.splitlines()
    assert lines[0].startswith("stage 0 (layers 0-")
    assert ", embed): weights " in lines[0] and ", output): weights " in lines[1]
    for line in lines[:2]:
        assert (
            " MiB, KV " in line
            and " MiB, compute " in line
            and "(amb 256 MiB, " in line
            and ", total " in line
        )
    assert lines[-1].startswith("pipeline: 2 stage(s), total ")


# fitting -----------------------------------------------------------------------------------------------
def test_check_fits_passes_when_everything_fits():
    plan = _plan(num_stages=2)
    check_fits(plan, [s.total_bytes for s in plan.stages], ["cuda:0", "cuda:1"])


def test_check_fits_names_the_device_the_numbers_and_the_remedies():
    plan = _plan(num_stages=2, amb_mib=0)
    short = plan.stages[1]
    free = [plan.stages[0].total_bytes, short.total_bytes - 300 * MIB]
    with pytest.raises(PlanError) as error:
        check_fits(plan, free, ["cuda:0 (NVIDIA H200)", "cuda:1 (NVIDIA H200)"])
    message = str(error.value)
    assert "stage 1" in message and "cuda:1 (NVIDIA H200)" in message and "cuda:0" not in message
    assert f"needs {short.total_bytes / MIB:.2f} MiB" in message
    assert f"{free[1] / MIB:.2f} MiB free" in message and "short by 300.00 MiB" in message
    for remedy in ("amb", "ubatch", "n_ctx", "more pipeline stages"):
        assert remedy in message


def test_check_fits_wants_one_free_value_per_stage():
    with pytest.raises(ValueError, match="2 stages, 1 free-memory values"):
        check_fits(_plan(num_stages=2), [1 << 40], ["cuda:0"])


# from a GGUF file ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from mlapipe.runtime.tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("planner") / "tiny.gguf", "v3", num_hidden_layers=4)


def test_layer_weight_bytes_counts_matrices_at_element_size_and_vectors_in_fp32(tiny_model):
    from mlapipe.runtime.gguf_model import GGUFModel

    model = GGUFModel(tiny_model)
    cfg = model.config
    layers, embed, head = layer_weight_bytes(model, element_size=2)
    assert len(layers) == cfg.num_layers
    assert embed == cfg.vocab_size * cfg.hidden_size * 2
    assert head == cfg.vocab_size * cfg.hidden_size * 2 + cfg.hidden_size * 4  # output + final norm
    vectors = sum(math.prod(t.shape) for t in model.tensors.values() if len(t.shape) == 1)
    routers = sum(math.prod(t.shape) for n, t in model.tensors.items() if n.endswith("moe.router"))
    assert routers > 0
    assert sum(layers) + embed + head == 2 * model.num_parameters + 2 * (vectors + routers)
    # a MoE layer outweighs the leading dense one
    assert layers[1] > layers[0]


def test_plan_for_model_matches_plan_pipeline(tiny_model):
    from mlapipe.runtime.gguf_model import GGUFModel

    model = GGUFModel(tiny_model)
    plan = plan_for_model(model, 2, num_kv_tokens=256, amb_mib=0.01)
    assert [s.num_layers for s in plan.stages] and sum(s.num_layers for s in plan.stages) == 4
    assert all(s.num_head_steps == model.config.num_heads for s in plan.stages)


def _inspect(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlapipe.runtime.cli", "inspect", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )


def test_inspect_prints_the_plan_after_the_usual_output(tiny_model):
    plain = _inspect("-m", tiny_model)
    done = _inspect("-m", tiny_model, "--pipeline", "2", "--amb", "0,0.01", "--ubatch", "64", "-c", "256")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(plain.stdout)  # the existing output is unchanged, the plan follows it
    plan_lines = done.stdout[len(plain.stdout) :].splitlines()
    assert plan_lines[0] == "pipeline plan (n_ctx 256, KV cache 1024 tokens, ubatch 64, bf16 weights and KV):"
    assert plan_lines[1].startswith("stage 0 (layers 0-") and "embed" in plan_lines[1]
    assert "amb unlimited, 1 head step)" in plan_lines[1]
    assert plan_lines[2].startswith("stage 1 (layers ") and "-3, output)" in plan_lines[2]
    assert "(amb 0.01 MiB, 4 head steps)" in plan_lines[2]


def test_inspect_split_and_bad_pipeline(tiny_model):
    done = _inspect("-m", tiny_model, "--pipeline", "2", "--split", "3,1")
    assert done.returncode == 0, done.stderr
    assert "stage 0 (layers 0-2, embed)" in done.stdout and "stage 1 (layers 3-3, output)" in done.stdout
    bad = _inspect("-m", tiny_model, "--pipeline", "5")
    assert bad.returncode == 2
    assert "mlapipe: error: 5 pipeline stages for 4 layers" in bad.stderr


# quantized weights on the full V3 shape -----------------------------------------------------------------
H200 = 139 * 2**30  # what torch reports for an H200, rounded down


def _recipe_bytes(model, names) -> int:
    """Device bytes of `names` computed from the recipe itself: whole blocks of each tensor's recipe type
    (GGML_QUANT_SIZES) for matrices that stay quantized, bf16 for the MLA up-projections (decoded at
    load), fp32 for norms and the router."""
    import gguf

    from mlapipe.runtime.gguf_model import gguf_name

    total = 0
    for name in names:
        shape = model.tensors[name].shape
        count = math.prod(shape)
        qtype = model.recipe.type_for(gguf_name(name), shape[-1], _layer(name), model.config.num_layers)
        if qtype == gguf.GGMLQuantizationType.F32:
            total += 4 * count
        elif name.endswith("attn.wkv_b"):
            total += 2 * count
        else:
            block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            total += count // block_elems * block_bytes
    return total


def _layer(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("layers.") else None


def _stage_names(model, stage) -> list[str]:
    names = [
        n for n in model.tensors if _layer(n) is not None and stage.first_layer <= _layer(n) < stage.end_layer
    ]
    return names + ["embed"] * stage.has_embed + ["norm", "head"] * stage.has_head


def _v3_plan(recipe: str, num_stages: int, **options):
    from mlapipe.runtime.planner import plan_kv_from_memory
    from mlapipe.runtime.shapes import RandomModel

    model = RandomModel(f"random:v3:wtype={recipe}")
    layers, embed, head = layer_weight_bytes(model)
    options = dict(total_bytes=[H200] * num_stages, n_ctx=4096, ubatch=512) | options
    return model, layers, plan_kv_from_memory(model.config, layers, embed, head, num_stages, **options)


def test_ud_q2_k_xl_on_two_h200s_bytes_balance_and_kv_tokens():
    from mlapipe.runtime.planner import GIB

    model, layers, plan = _v3_plan("UD-Q2_K_XL", 2)
    assert sum(s.num_layers for s in plan.stages) == 61
    for stage in plan.stages:  # bytes per stage: the recipe's block sizes, summed
        assert stage.weight_bytes == _recipe_bytes(model, _stage_names(model, stage))
    total = sum(s.weight_bytes for s in plan.stages)
    assert 225 * GIB < total < 240 * GIB  # a Q2_K-class mix of the 671B model (the R1 release: 211 GiB)
    first, last = plan.stages
    assert abs(first.weight_bytes - last.weight_bytes) <= max(layers)  # balanced within one layer
    # KV: 0.9 of the device, less weights and compute, over 576 x 2 bytes per token per layer, whole blocks
    per_stage = [
        (int(0.9 * H200) - s.weight_bytes - s.compute_bytes) // (576 * 2 * s.num_layers) // 64 * 64
        for s in plan.stages
    ]
    assert plan.kv_tokens_per_stage == per_stage and plan.num_kv_tokens == min(per_stage)
    assert plan.num_kv_tokens > 100_000  # room for batch jobs, not 4 x n_ctx
    assert all(s.kv_bytes == plan.num_kv_tokens * 576 * 2 * s.num_layers for s in plan.stages)
    assert all(s.total_bytes <= 0.9 * H200 for s in plan.stages)
    assert f"KV cache: {plan.num_kv_tokens:,} tokens" in plan.format()
    # a smaller fraction leaves less cache
    _, _, tighter = _v3_plan("UD-Q2_K_XL", 2, kv_memory_fraction=0.88)
    assert tighter.num_kv_tokens < plan.num_kv_tokens


def test_ud_q2_k_xl_on_one_h200_is_refused_with_the_numbers():
    with pytest.raises(PlanError) as error:
        _v3_plan("UD-Q2_K_XL", 1, device_names=["NVIDIA H200 on node-a"])
    message = str(error.value)
    assert "stage 0 (layers 0-60) does not fit on NVIDIA H200 on node-a" in message
    assert "the device offers 125.10 GiB (0.9 of 139.00 GiB)" in message
    assert "weights 232.25 GiB" in message and "short by " in message
    assert "2 pipeline stages of this device size" in message and "bits per parameter" in message


def test_q4_k_m_on_four_h200s_and_refused_on_two():
    from mlapipe.runtime.planner import GIB

    model, layers, plan = _v3_plan("Q4_K_M", 4)
    assert len(plan.stages) == 4 and sum(s.num_layers for s in plan.stages) == 61
    for stage in plan.stages:
        assert stage.weight_bytes == _recipe_bytes(model, _stage_names(model, stage))
    assert 370 * GIB < sum(s.weight_bytes for s in plan.stages) < 390 * GIB  # the release: 377 GiB
    heaviest = max(s.weight_bytes for s in plan.stages)
    assert heaviest - min(s.weight_bytes for s in plan.stages) <= max(layers)
    assert plan.num_kv_tokens == min(plan.kv_tokens_per_stage) > 100_000
    with pytest.raises(PlanError) as error:
        _v3_plan("Q4_K_M", 2)
    message = str(error.value)
    assert "stage 0 (layers 0-" in message and "stage 1 (layers " in message
    assert "the device offers 125.10 GiB" in message and "4 pipeline stages of this device size" in message


def test_kv_fraction_refuses_a_cache_below_one_sequence():
    options = dict(n_ctx=163840, amb_mib=256)
    _, _, roomy = _v3_plan("UD-Q2_K_XL", 2, kv_memory_fraction=1.0, **options)
    # a fraction that leaves each stage half a sequence of cache after its weights and compute buffer
    need = max(s.weight_bytes + s.compute_bytes + 163840 * 576 * 2 * s.num_layers // 2 for s in roomy.stages)
    with pytest.raises(PlanError, match="fewer than one sequence of n_ctx=163,840"):
        _v3_plan("UD-Q2_K_XL", 2, kv_memory_fraction=need / H200, **options)


def test_recipes_fall_back_like_llama_cpp_quantize():
    """V2-Lite's expert rows are 1408 long, not whole 256-blocks: llama.cpp's quantize gives Q4_K rows
    Q5_0, Q2_K/Q3_K/IQ rows IQ4_NL, Q6_K rows Q8_0; a row no 32-block divides gets F16."""
    import gguf

    from mlapipe.runtime.recipes import compatible_type, recipe_by_name, use_more_bits
    from mlapipe.runtime.shapes import RandomModel

    Q = gguf.GGMLQuantizationType
    down = "layers.5.moe.w_down"
    for wtype, expected in (("q4_k", Q.Q5_0), ("Q2_K", Q.IQ4_NL), ("q6_k", Q.Q8_0), ("q8_0", Q.Q8_0)):
        model = RandomModel(f"random:v2-lite:wtype={wtype}")
        assert model.tensors[down].qtype == expected, wtype
        assert model.tensors["layers.5.moe.w_gate"].qtype == Q[wtype.upper()]  # rows of 2048
    assert compatible_type(Q.Q4_K, 48) == Q.F16
    # the Q4_K_M mix: routed down Q6_K in llama.cpp's "more bits" layers only, about half of 61
    more = [layer for layer in range(61) if use_more_bits(layer, 61)]
    assert 25 <= len(more) <= 35 and more[0] == 0 and more[-1] == 60
    model = RandomModel("random:v3:wtype=Q4_K_M")
    downs = {model.tensors[f"layers.{i}.moe.w_down"].qtype for i in range(3, 61)}
    assert downs == {Q.Q4_K, Q.Q6_K}
    with pytest.raises(ValueError, match="unknown weight type or recipe 'q9_k'"):
        recipe_by_name("q9_k")


def test_inspect_plans_named_devices_and_refuses_with_the_numbers():
    args = ["--shape", "v3", "--wtype", "UD-Q2_K_XL", "--device-memory", "139GiB"]
    done = _inspect(*args, "--pipeline", "2")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "pipeline plan (2 x 139.00 GiB at 0.9, n_ctx 4096" in out
    assert "KV cache: " in out and " tokens (tokens that fit per device: stage 0 " in out
    table = out[out.index("weights per device by type") :].splitlines()
    assert table[1].startswith("  stage 0: Q2_K ") and "Q3_K" in table[1] and "Q6_K" in table[1]
    assert table[2].startswith("  stage 1: ")
    refused = _inspect(*args, "--pipeline", "1")
    assert refused.returncode == 2
    assert "does not fit on device 0 (139.00 GiB)" in refused.stderr
    assert "2 pipeline stages of this device size" in refused.stderr


def test_quantized_experts_add_the_dequantize_scratch_only_where_prefill_takes_it():
    """kernels/quant/fused_moe.py decodes a layer's experts to bf16 once a micro-batch brings 64 rows per
    expert (the smallest per-type threshold): V2-Lite at ubatch 2048 (192 rows per expert), not at 512 (48)."""
    cfg = v2_lite_config()
    experts_bf16 = 64 * 3 * 1408 * 2048 * 2  # below the 4 GiB bound
    for ubatch, extra in ((512, 0), (2048, experts_bf16)):
        plans = [
            plan_pipeline(cfg, [MIB] * 27, 0, 0, 2, num_kv_tokens=4096, ubatch=ubatch, quantized_experts=q)
            for q in (False, True)
        ]  # stage 0: no fp32 logits, which would outweigh everything at ubatch 8192
        assert plans[1].stages[0].compute_bytes - plans[0].stages[0].compute_bytes == extra
