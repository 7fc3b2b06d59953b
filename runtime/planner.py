"""Which layers run on which pipeline stage, and what each stage's device must hold.

Pure Python over the GGUF index: no torch, no Ray, nothing loaded. A plan is made (and refused if it
does not fit) before any weight is read, so a bad choice of amb / ubatch / n_ctx / stages fails in
seconds with numbers, not minutes later with an out-of-memory error.

Per stage the device holds
- weights: its layers as they load (runtime/weight_storage.py: GGUF block bytes for quantized tensors
  with a kernel, `element_size` bytes per parameter for decoded ones, fp32 for 1-D tensors and the
  router), plus the embedding on stage 0 and the final norm + output matrix on the last stage;
- latent KV: `num_kv_tokens x latent_dim (576) x kv_element_size` for each of its layers;
- a compute buffer: activations that live through a layer (a few `ubatch x hidden` buffers) plus the
  largest transient intermediate: the decompressed K/V of one amb head step, the MoE / MLP
  intermediate, or (last stage) the fp32 logits. DESIGN.md says "largest of" the three; the
  activations are added rather than compared because they are alive while attention or the MoE runs.

The latent KV cache is either a given number of tokens or sized from memory (`plan_kv_from_memory`):
each device offers `kv_memory_fraction` of its memory (vLLM's gpu_memory_utilization) less what other
processes already use; what its weights and compute buffer leave is its cache, and the pipeline's cache
is the smallest stage's (every stage holds every token of its own layers, under one block table).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mlapipe.kernels.amb import MIB, decompressed_kv_bytes_per_head, plan_head_steps
from mlapipe.runtime.config import ModelConfig
from mlapipe.runtime.weight_storage import device_bytes, storage_forms

GIB = 1 << 30
DEFAULT_KV_MEMORY_FRACTION = 0.9

# Hidden-sized activation buffers alive through a layer: the residual stream, the normed input, the
# attention / FFN output, and the transport buffer the next stage's hidden state is sent from.
NUM_HIDDEN_BUFFERS = 4
# Routing metadata per (token, expert) row: fp32 weight, int32 expert id, int32 sorted position.
ROUTING_BYTES_PER_ROW = 12
FP32 = 4


class PlanError(ValueError):
    """A pipeline plan that cannot run on the given devices; the message says which and by how much."""


@dataclass
class StagePlan:
    stage: int
    first_layer: int
    end_layer: int  # exclusive
    weight_bytes: int
    kv_bytes: int
    compute_bytes: int
    has_embed: bool = False
    has_head: bool = False
    amb_mib: float = 0.0
    num_head_steps: int = 1

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.first_layer

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.compute_bytes

    def format(self) -> str:
        extras = "".join(
            ", " + part for part, has in (("embed", self.has_embed), ("output", self.has_head)) if has
        )
        amb = f"amb {self.amb_mib:g} MiB" if self.amb_mib > 0 else "amb unlimited"
        steps = f"{self.num_head_steps} head step{'s' if self.num_head_steps != 1 else ''}"
        return (
            f"stage {self.stage} (layers {self.first_layer}-{self.end_layer - 1}{extras}): "
            f"weights {_mib(self.weight_bytes)}, KV {_mib(self.kv_bytes)}, "
            f"compute {_mib(self.compute_bytes)} ({amb}, {steps}), total {_mib(self.total_bytes)}"
        )


@dataclass
class PipelinePlan:
    stages: list[StagePlan]
    num_kv_tokens: int = 0  # the cache's capacity, all sequences together
    kv_tokens_per_stage: list[int] | None = None  # what each stage's memory could hold (sized from memory)
    budget_bytes: list[int] | None = None  # memory each device offers under the fraction

    @property
    def layer_ranges(self) -> list[tuple[int, int]]:
        return [(s.first_layer, s.end_layer) for s in self.stages]

    @property
    def total_bytes(self) -> int:
        return sum(s.total_bytes for s in self.stages)

    def format(self) -> str:
        lines = [s.format() for s in self.stages]
        lines.append(f"pipeline: {len(self.stages)} stage(s), total {_mib(self.total_bytes)}")
        if self.kv_tokens_per_stage is not None:
            each = ", ".join(
                f"stage {i} {tokens:,} of {_gib(budget)}"
                for i, (tokens, budget) in enumerate(zip(self.kv_tokens_per_stage, self.budget_bytes))
            )
            lines.append(f"KV cache: {self.num_kv_tokens:,} tokens (tokens that fit per device: {each})")
        return "\n".join(lines)


# layer split -----------------------------------------------------------------------------------------
def split_layers(
    layer_bytes: Sequence[int],
    embed_bytes: int,
    head_bytes: int,
    num_stages: int,
    split: Sequence[float] | None = None,
) -> list[tuple[int, int]]:
    """Contiguous [first, end) layer ranges, one per stage, each with at least one layer.

    Without `split`: the ranges minimise the heaviest stage's weight bytes (embedding counted on stage
    0, output on the last). With `split` (e.g. 3,1): layers are shared in those
    proportions by count, as llama.cpp's `-ts 3,1` does."""
    num_layers = len(layer_bytes)
    if num_stages < 1:
        raise ValueError(f"the pipeline needs at least one stage, got {num_stages}")
    if num_stages > num_layers:
        raise ValueError(
            f"{num_stages} pipeline stages for {num_layers} layers: every stage needs at least one layer"
        )
    if split is not None:
        return _split_by_proportion(num_layers, num_stages, split)
    return _split_by_bytes(layer_bytes, embed_bytes, head_bytes, num_stages)


def _split_by_proportion(num_layers: int, num_stages: int, split: Sequence[float]) -> list[tuple[int, int]]:
    if len(split) != num_stages:
        raise ValueError(f"split {list(split)} has {len(split)} values for {num_stages} pipeline stages")
    if any(not math.isfinite(p) or p <= 0 for p in split):
        raise ValueError(f"split {list(split)}: every proportion must be positive")
    # llama.cpp's rule: layer i goes to the first stage whose cumulative share exceeds i / num_layers,
    # so a stage ends at ceil(num_layers x its cumulative share) (the epsilon absorbs float error).
    total, running, ends = sum(split), 0.0, []
    for proportion in split:
        running += proportion
        ends.append(min(num_layers, math.ceil(num_layers * running / total - 1e-9)))
    ends[-1] = num_layers
    # Rounding can leave a stage empty; push boundaries apart, first forward, then back from the end.
    for i in range(num_stages - 1):
        ends[i] = max(ends[i], (ends[i - 1] if i else 0) + 1)
    for i in reversed(range(num_stages - 1)):
        ends[i] = min(ends[i], ends[i + 1] - 1)
    return list(zip([0, *ends[:-1]], ends))


def _split_by_bytes(
    layer_bytes: Sequence[int], embed_bytes: int, head_bytes: int, num_stages: int
) -> list[tuple[int, int]]:
    """Linear partition by dynamic programming: best[s][e] = the smallest possible heaviest stage when
    layers [0, e) go to stages 0..s. Ties keep later boundaries (earlier stages get more layers)."""
    n = len(layer_bytes)
    prefix = [0]
    for size in layer_bytes:
        prefix.append(prefix[-1] + size)

    def stage_bytes(stage: int, first: int, end: int) -> int:
        extra = (embed_bytes if stage == 0 else 0) + (head_bytes if stage == num_stages - 1 else 0)
        return prefix[end] - prefix[first] + extra

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for end in range(1, n + 1):
        best[0][end] = stage_bytes(0, 0, end)
    for s in range(1, num_stages):
        for end in range(s + 1, n + 1):
            for first in range(s, end):
                heaviest = max(best[s - 1][first], stage_bytes(s, first, end))
                if heaviest <= best[s][end]:
                    best[s][end], cut[s][end] = heaviest, first
    ranges, end = [], n
    for s in reversed(range(num_stages)):
        first = cut[s][end] if s else 0
        ranges.append((first, end))
        end = first
    return ranges[::-1]


# memory plan ---------------------------------------------------------------------------------------
def plan_pipeline(
    cfg: ModelConfig,
    layer_bytes: Sequence[int],
    embed_bytes: int,
    head_bytes: int,
    num_stages: int,
    *,
    split: Sequence[float] | None = None,
    amb_mib: float | Sequence[float] = 0.0,
    ubatch: int = 512,
    num_kv_tokens: int,
    n_ctx: int | None = None,
    kv_element_size: int = 2,
    element_size: int = 2,
    quantized_experts: bool = False,
) -> PipelinePlan:
    """The memory plan of every stage. `num_kv_tokens` is the latent-KV capacity of the cache (all
    sequences together); `n_ctx` the longest one sequence can get (default: num_kv_tokens).
    `quantized_experts`: the routed experts stay in GGUF blocks, so a prefill-sized MoE may decode
    them into a bounded scratch (moe_scratch_bytes).

    The attention intermediate is sized for one sequence of min(num_kv_tokens, n_ctx) tokens, because
    the decompressed prefill (workers/attention.py) sizes its head steps from the longest sequence of a
    micro-batch, not from the whole cache: a sequence never attends past its own n_ctx tokens."""
    if len(layer_bytes) != cfg.num_layers:
        raise ValueError(f"{len(layer_bytes)} layer sizes for a model of {cfg.num_layers} layers")
    if ubatch < 1:
        raise ValueError(f"ubatch must be at least 1, got {ubatch}")
    if num_kv_tokens < 1:
        raise ValueError(f"the KV cache needs at least one token, got {num_kv_tokens}")
    ambs = _amb_per_stage(amb_mib, num_stages)
    ranges = split_layers(layer_bytes, embed_bytes, head_bytes, num_stages, split)
    attention_tokens = min(num_kv_tokens, n_ctx or num_kv_tokens)
    stages = []
    for stage, ((first, end), amb) in enumerate(zip(ranges, ambs)):
        is_first, is_last = stage == 0, stage == num_stages - 1
        weights = (
            sum(layer_bytes[first:end]) + (embed_bytes if is_first else 0) + (head_bytes if is_last else 0)
        )
        kv = num_kv_tokens * cfg.latent_dim * kv_element_size * (end - first)
        attention, num_steps = attention_bytes(cfg, attention_tokens, amb, element_size)
        ffn = ffn_bytes(cfg, range(first, end), ubatch, element_size)
        if quantized_experts and any(cfg.is_moe_layer(i) for i in range(first, end)):
            ffn += moe_scratch_bytes(cfg, ubatch, element_size)
        transient = max(attention, ffn)
        if is_last:
            transient = max(transient, ubatch * cfg.vocab_size * FP32)  # fp32 logits
        compute = NUM_HIDDEN_BUFFERS * ubatch * cfg.hidden_size * element_size + transient
        stages.append(StagePlan(stage, first, end, weights, kv, compute, is_first, is_last, amb, num_steps))
    return PipelinePlan(stages, num_kv_tokens)


def attention_bytes(
    cfg: ModelConfig, num_kv_tokens: int, amb_mib: float, element_size: int
) -> tuple[int, int]:
    """(bytes, head steps) of the decompressed attention over num_kv_tokens: the gathered latent of the
    context (shared by all heads, so amb does not shrink it) plus K (nope + rope) and V of the heads in
    the largest amb step."""
    per_head = decompressed_kv_bytes_per_head(
        num_kv_tokens, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.qk_rope_head_dim, element_size
    )
    steps = plan_head_steps(cfg.num_heads, per_head, amb_mib)
    largest_step = max(end - start for start, end in steps)
    latent = num_kv_tokens * cfg.latent_dim * element_size
    return latent + largest_step * per_head, len(steps)


# kernels/quant/fused_moe.py: a prefill-sized quantized MoE (from SCRATCH_MIN_ROWS_PER_EXPERT rows per
# expert) decodes the layer's experts into a scratch of at most DEFAULT_SCRATCH_MIB (the driver imports
# no Triton, so the two numbers are repeated here; the kernel's threshold is per type, 64 or 128: the
# smaller one counts the scratch whenever some type could take that path)
SCRATCH_MIN_ROWS_PER_EXPERT = 64
DEFAULT_SCRATCH_MIB = 4096


def moe_scratch_bytes(cfg: ModelConfig, ubatch: int, element_size: int) -> int:
    """The quantized MoE's dequantize scratch at a full micro-batch: 0 when a micro-batch never brings
    enough rows per expert to take that path (V3 at ubatch 1024: 32 rows per expert)."""
    if ubatch * cfg.num_experts_per_token < SCRATCH_MIN_ROWS_PER_EXPERT * cfg.num_experts:
        return 0
    experts = cfg.num_experts * 3 * cfg.expert_intermediate_size * cfg.hidden_size * element_size
    return min(experts, DEFAULT_SCRATCH_MIB * MIB)


def ffn_bytes(cfg: ModelConfig, layers: range, ubatch: int, element_size: int) -> int:
    """The largest feed-forward intermediate among `layers`: gate|up outputs of the routed experts
    (ubatch x top_k rows) and shared experts plus routing metadata on MoE layers; gate|up of the dense
    MLP on the leading dense layers."""
    largest = 0
    for layer in layers:
        if cfg.is_moe_layer(layer):
            rows = ubatch * cfg.num_experts_per_token
            routed = rows * 2 * cfg.expert_intermediate_size * element_size
            shared = ubatch * 2 * cfg.num_shared_experts * cfg.expert_intermediate_size * element_size
            routing = rows * ROUTING_BYTES_PER_ROW + (cfg.num_experts + 1) * FP32
            largest = max(largest, routed + shared + routing)
        else:
            largest = max(largest, ubatch * 2 * cfg.intermediate_size * element_size)
    return largest


def _amb_per_stage(amb_mib: float | Sequence[float], num_stages: int) -> list[float]:
    ambs = [float(amb_mib)] * num_stages if isinstance(amb_mib, (int, float)) else [float(a) for a in amb_mib]
    if len(ambs) != num_stages:
        raise ValueError(
            f"{len(ambs)} amb values {ambs} for {num_stages} pipeline stages (give one, or one per stage)"
        )
    if any(not math.isfinite(a) or a < 0 for a in ambs):
        raise ValueError(f"amb must be >= 0 MiB (0 = unlimited), got {ambs}")
    return ambs


# weights from the GGUF index -------------------------------------------------------------------------
def layer_weight_bytes(model, element_size: int = 2, dequantize: bool = False) -> tuple[list[int], int, int]:
    """(bytes per layer, embedding bytes, output bytes incl. the final norm) as they sit on the device
    (runtime/weight_storage.py): block bytes for tensors kept quantized, `element_size` per parameter
    for decoded matrices, fp32 for 1-D tensors and the router. `model` is a GGUFModel or RandomModel."""
    cfg = model.config
    forms = storage_forms(model.tensors, dequantize)
    layers = [0] * cfg.num_layers
    embed = head = 0
    for name, info in model.tensors.items():
        size = device_bytes(info, forms[name], element_size)
        if name.startswith("layers."):
            layers[int(name.split(".")[1])] += size
        elif name == "embed":
            embed += size
        else:  # "head" and the final "norm" run on the last stage
            head += size
    return layers, embed, head


def plan_for_model(
    model, num_stages: int, *, element_size: int = 2, dequantize: bool = False, **options
) -> PipelinePlan:
    """plan_pipeline for an open model; options as plan_pipeline takes them (num_kv_tokens required)."""
    layers, embed, head = layer_weight_bytes(model, element_size, dequantize)
    options.setdefault("quantized_experts", has_quantized_experts(model, dequantize))
    return plan_pipeline(model.config, layers, embed, head, num_stages, element_size=element_size, **options)


def stage_tensor_names(model, stage: StagePlan) -> list[str]:
    """Our names of the tensors a stage holds: its layers', the embedding on the first, norm and output
    on the last."""
    names = [
        n
        for n in model.tensors
        if n.startswith("layers.") and stage.first_layer <= int(n.split(".")[1]) < stage.end_layer
    ]
    return names + (["embed"] if stage.has_embed else []) + (["norm", "head"] if stage.has_head else [])


def has_quantized_experts(model, dequantize: bool = False) -> bool:
    forms = storage_forms(model.tensors, dequantize)
    return any(form == "quant" for name, form in forms.items() if name.endswith(".moe.w_down"))


def plan_kv_from_memory(
    cfg: ModelConfig,
    layer_bytes: Sequence[int],
    embed_bytes: int,
    head_bytes: int,
    num_stages: int,
    *,
    total_bytes: Sequence[int],
    free_bytes: Sequence[int] | None = None,
    device_names: Sequence[str] | None = None,
    kv_memory_fraction: float = DEFAULT_KV_MEMORY_FRACTION,
    block_size: int = 64,
    n_ctx: int,
    kv_element_size: int = 2,
    **options,
) -> PipelinePlan:
    """The plan with the latent cache sized from memory: device i offers
    `kv_memory_fraction x total_bytes[i] - (total_bytes[i] - free_bytes[i])` (a device without
    free_bytes is taken as empty); its weights and compute buffer come first, the cache gets the rest,
    in whole blocks. Raises PlanError, before any weight is read, when the weights and compute buffer of
    a stage do not fit, or the cache cannot hold one sequence of n_ctx tokens."""
    if not 0 < kv_memory_fraction <= 1:
        raise ValueError(f"the KV memory fraction must be in (0, 1], got {kv_memory_fraction}")
    names = list(device_names or [f"device {i}" for i in range(num_stages)])
    free = list(free_bytes) if free_bytes is not None else list(total_bytes)
    if not len(total_bytes) == len(free) == len(names) == num_stages:
        raise ValueError(f"{num_stages} stages, {len(total_bytes)} device sizes, {len(names)} device names")
    budgets = [int(kv_memory_fraction * t) - (t - f) for t, f in zip(total_bytes, free)]
    # the compute buffer is sized for one sequence of n_ctx tokens, whatever the cache holds
    common = dict(n_ctx=n_ctx, kv_element_size=kv_element_size, **options)
    base = plan_pipeline(cfg, layer_bytes, embed_bytes, head_bytes, num_stages, num_kv_tokens=n_ctx, **common)
    per_token = cfg.latent_dim * kv_element_size
    fits, problems = [], []
    for stage, budget, name in zip(base.stages, budgets, names):
        left = budget - stage.weight_bytes - stage.compute_bytes
        tokens = max(0, left) // (per_token * stage.num_layers) // block_size * block_size
        fits.append(tokens)
        if left < 0:
            problems.append(
                f"stage {stage.stage} (layers {stage.first_layer}-{stage.end_layer - 1}) does not fit on "
                f"{name}: weights {_gib(stage.weight_bytes)} + compute {_gib(stage.compute_bytes)} = "
                f"{_gib(stage.weight_bytes + stage.compute_bytes)}, the device offers {_gib(budget)} "
                f"({kv_memory_fraction:g} of {_gib(total_bytes[stage.stage])}), short by {_gib(-left)}"
            )
    if problems:
        raise PlanError(
            "; ".join(problems)
            + ". "
            + _what_would_fit(
                cfg, layer_bytes, embed_bytes, head_bytes, num_stages, min(budgets), common, per_token * n_ctx
            )
        )
    num_kv_tokens = min(fits)
    if num_kv_tokens < n_ctx:
        worst = fits.index(num_kv_tokens)
        raise PlanError(
            f"stage {worst} on {names[worst]} has room for {num_kv_tokens:,} tokens of KV cache, fewer than "
            f"one sequence of n_ctx={n_ctx:,}: lower n_ctx, raise the memory fraction "
            f"({kv_memory_fraction:g}), or add pipeline stages (now {num_stages})"
        )
    plan = plan_pipeline(
        cfg, layer_bytes, embed_bytes, head_bytes, num_stages, num_kv_tokens=num_kv_tokens, **common
    )
    plan.kv_tokens_per_stage, plan.budget_bytes = fits, budgets
    return plan


def _what_would_fit(
    cfg, layer_bytes, embed_bytes, head_bytes, num_stages, budget, common, kv_layer_bytes
) -> str:
    """The remedies, with numbers: the fewest stages of this device size that hold the weights, and the
    weight bytes (bits per parameter) that would fit on the stages given; both keep room for one
    sequence of n_ctx tokens of cache (`kv_layer_bytes` per layer)."""

    common = {k: v for k, v in common.items() if k != "split"}  # proportions are for the stages given

    def plan(stages: int) -> PipelinePlan:
        return plan_pipeline(
            cfg, layer_bytes, embed_bytes, head_bytes, stages, num_kv_tokens=common["n_ctx"], **common
        )

    def need(stage: StagePlan) -> int:
        return stage.weight_bytes + stage.compute_bytes + kv_layer_bytes * stage.num_layers

    advice = []
    for stages in range(num_stages + 1, cfg.num_layers + 1):
        if all(need(s) <= budget for s in plan(stages).stages):
            advice.append(f"{stages} pipeline stages of this device size")
            break
    total = sum(layer_bytes) + embed_bytes + head_bytes
    params = _num_parameters(cfg)
    room = max(0, sum(budget - (need(s) - s.weight_bytes) for s in plan(num_stages).stages))
    advice.append(
        f"or a smaller weight type: the weights are {_gib(total)} ({8 * total / params:.2f} bits per "
        f"parameter), {num_stages} such device(s) hold about {_gib(room)} of weights "
        f"({8 * room / params:.2f} bits per parameter)"
    )
    return "Would fit: " + ", ".join(advice)


def _num_parameters(cfg: ModelConfig) -> int:
    from mlapipe.runtime.gguf_model import expected_shapes

    count = 2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
    for layer in range(cfg.num_layers):
        count += sum(math.prod(shape) for shape in expected_shapes(cfg, layer, "kv_b").values())
    return count


# fitting -------------------------------------------------------------------------------------------
def check_fits(plan: PipelinePlan, free_bytes: Sequence[int], device_names: Sequence[str]) -> None:
    """Raises PlanError naming every stage whose device lacks the memory, with the numbers and what to
    change; returns None when every stage fits."""
    if not len(free_bytes) == len(device_names) == len(plan.stages):
        raise ValueError(
            f"{len(plan.stages)} stages, {len(free_bytes)} free-memory values, {len(device_names)} device names"
        )
    problems = []
    for stage, free, device in zip(plan.stages, free_bytes, device_names):
        if stage.total_bytes > free:
            problems.append(
                f"stage {stage.stage} (layers {stage.first_layer}-{stage.end_layer - 1}) does not fit on "
                f"{device}: needs {_mib(stage.total_bytes)} (weights {_mib(stage.weight_bytes)}, "
                f"KV {_mib(stage.kv_bytes)}, compute {_mib(stage.compute_bytes)}), "
                f"{_mib(free)} free, short by {_mib(stage.total_bytes - free)}"
            )
    if problems:
        raise PlanError(
            "; ".join(problems) + ". To fit: lower amb (smaller attention compute buffer), a smaller "
            "ubatch (smaller MoE and activation buffers), a smaller n_ctx (less KV), or more pipeline "
            f"stages (fewer layers per device; now {len(plan.stages)})"
        )


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / MIB:.2f} MiB"


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.2f} GiB"
