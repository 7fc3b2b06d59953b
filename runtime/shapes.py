"""Named model shapes (the real DeepSeek geometries) for random-weight runs: speed without a download.

A model spec "random:v2-lite" or "random:v3:layers=4:seed=1:wtype=UD-Q2_K_XL" stands where a GGUF path
would; stages then make their own layers' weights on the device instead of reading a file. `wtype` is a
GGML type or a recipe (runtime/recipes.py); without it every matrix is BF16.
"""

from __future__ import annotations

import math
from dataclasses import replace

from mlapipe.runtime.config import ModelConfig

RANDOM_PREFIX = "random:"

SHAPES = {
    "v2-lite": ModelConfig(
        num_layers=27,
        hidden_size=2048,
        vocab_size=102400,
        context_length=163840,
        rms_norm_eps=1e-6,
        num_heads=16,
        q_lora_rank=0,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        intermediate_size=10944,
        num_dense_layers=1,
        num_experts=64,
        num_experts_per_token=6,
        num_shared_experts=2,
        expert_intermediate_size=1408,
        expert_weights_scale=1.0,
        expert_weights_norm=False,
        gating="softmax",
        num_expert_groups=1,
        num_expert_groups_used=1,
        rope_freq_base=10000.0,
        rope_scaling_factor=40.0,
        rope_original_context=4096,
        yarn_log_multiplier=0.0707,
    ),
    "v3": ModelConfig(
        num_layers=61,
        hidden_size=7168,
        vocab_size=129280,
        context_length=163840,
        rms_norm_eps=1e-6,
        num_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        intermediate_size=18432,
        num_dense_layers=3,
        num_experts=256,
        num_experts_per_token=8,
        num_shared_experts=1,
        expert_intermediate_size=2048,
        expert_weights_scale=2.5,
        expert_weights_norm=True,
        gating="sigmoid",
        num_expert_groups=8,
        num_expert_groups_used=4,
        rope_freq_base=10000.0,
        rope_scaling_factor=40.0,
        rope_original_context=4096,
        yarn_log_multiplier=0.1,
    ),
    # V3's structure (q-LoRA, sigmoid routing in groups, one shared expert, YaRN) at test size: every row
    # length a multiple of 256, so K-quant and i-quant recipes apply to every matrix as they do on V3;
    # one leading dense layer, so a 4-layer model has MoE layers on every stage of a 2-stage pipeline.
    "v3-tiny": ModelConfig(
        num_layers=4,
        hidden_size=256,
        vocab_size=384,  # the tiny models' trained vocabulary (runtime/tiny_models.py), so files can match
        context_length=4096,
        rms_norm_eps=1e-6,
        num_heads=2,
        q_lora_rank=256,
        kv_lora_rank=256,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        intermediate_size=512,
        num_dense_layers=1,
        num_experts=16,
        num_experts_per_token=4,
        num_shared_experts=1,
        expert_intermediate_size=256,
        expert_weights_scale=2.5,
        expert_weights_norm=True,
        gating="sigmoid",
        num_expert_groups=4,
        num_expert_groups_used=2,
        rope_freq_base=10000.0,
        rope_scaling_factor=40.0,
        rope_original_context=64,
        yarn_log_multiplier=0.1,
    ),
}


def is_random_spec(model: str) -> bool:
    return model.startswith(RANDOM_PREFIX)


def random_spec(shape: str, layers: int | None = None, seed: int = 0, wtype: str | None = None) -> str:
    spec = f"{RANDOM_PREFIX}{shape}"
    if layers:
        spec += f":layers={layers}"
    spec += f":seed={seed}"
    return spec + (f":wtype={wtype}" if wtype else "")


def parse_random_spec(spec: str) -> tuple[ModelConfig, int, str]:
    """'random:v2-lite:layers=4:seed=1:wtype=q8_0' -> (config, seed, weight type or recipe name)."""
    parts = spec[len(RANDOM_PREFIX) :].split(":")
    if parts[0] not in SHAPES:
        raise ValueError(f"unknown model shape {parts[0]!r}; choose from {', '.join(SHAPES)}")
    options = dict(p.split("=", 1) for p in parts[1:])
    cfg = SHAPES[parts[0]]
    if "layers" in options:
        layers = int(options["layers"])
        cfg = replace(cfg, num_layers=layers, num_dense_layers=min(cfg.num_dense_layers, layers))
    return cfg, int(options.get("seed", 0)), options.get("wtype", "BF16")


class RandomModel:
    """Stands in for a GGUFModel: a named shape's config and tensor index, no file and no tokenizer.
    Stages generate the weights on their own device (workers/model_runner.py)."""

    def __init__(self, spec: str):
        from mlapipe.runtime.gguf_model import TensorInfo, expected_shapes, gguf_name
        from mlapipe.runtime.recipes import recipe_by_name, tensor_bytes

        self.path = spec
        self.config, self.seed, wtype = parse_random_spec(spec)
        self.recipe = recipe_by_name(wtype)
        self.metadata: dict = {}
        self.on_layer_read = None
        cfg = self.config
        shapes = {"embed": (cfg.vocab_size, cfg.hidden_size), "norm": (cfg.hidden_size,)}
        shapes["head"] = (cfg.vocab_size, cfg.hidden_size)
        for layer in range(cfg.num_layers):
            shapes |= expected_shapes(cfg, layer, "kv_b")
        self.tensors = {}
        for name, shape in shapes.items():
            file_name = gguf_name(name)
            layer = int(name.split(".")[1]) if name.startswith("layers.") else None
            qtype = self.recipe.type_for(file_name, shape[-1], layer, cfg.num_layers)
            self.tensors[name] = TensorInfo(file_name, shape, qtype, tensor_bytes(qtype, shape))

    @property
    def mla_layout(self) -> str:
        return "kv_b"

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())

    def type_summary(self) -> dict[str, tuple[int, int]]:
        """quant type -> (tensor count, bytes), as GGUFModel.type_summary."""
        summary: dict[str, tuple[int, int]] = {}
        for t in self.tensors.values():
            count, size = summary.get(t.qtype.name, (0, 0))
            summary[t.qtype.name] = (count + 1, size + t.num_bytes)
        return summary
