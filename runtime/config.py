"""ModelConfig: everything the DeepSeek forward pass needs, read from deepseek2 GGUF metadata."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

ARCHITECTURE = "deepseek2"
GATING_BY_GGUF_CODE = {1: "softmax", 2: "sigmoid"}  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE


class ConfigError(ValueError):
    """The model's metadata is missing a key or holds values the model cannot run with."""


@dataclass(frozen=True)
class ModelConfig:
    # model
    num_layers: int
    hidden_size: int
    vocab_size: int
    context_length: int
    rms_norm_eps: float
    # mla
    num_heads: int
    q_lora_rank: int  # 0 = no q-LoRA: a direct attn_q projection (V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # dense mlp (leading layers)
    intermediate_size: int
    num_dense_layers: int
    # moe
    num_experts: int
    num_experts_per_token: int
    num_shared_experts: int
    expert_intermediate_size: int
    expert_weights_scale: float
    expert_weights_norm: bool
    gating: str  # "softmax" (V2) or "sigmoid" (V3)
    num_expert_groups: int
    num_expert_groups_used: int
    # yarn
    rope_freq_base: float
    rope_scaling_factor: float  # 1 = no YaRN
    rope_original_context: int
    yarn_log_multiplier: float
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0

    def __post_init__(self) -> None:
        positive = ("num_layers", "hidden_size", "vocab_size", "num_heads", "kv_lora_rank")
        for name in positive + ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"rope dimension must be even, got {self.qk_rope_head_dim}")
        if not 0 <= self.num_dense_layers <= self.num_layers:
            raise ConfigError(f"leading dense layers {self.num_dense_layers} outside 0..{self.num_layers}")
        if self.has_moe:
            if not 0 < self.num_experts_per_token <= self.num_experts:
                raise ConfigError(
                    f"experts used per token {self.num_experts_per_token} outside 1..{self.num_experts}"
                )
            if self.gating not in ("softmax", "sigmoid"):
                raise ConfigError(f"unknown expert gating function {self.gating!r}")
            if self.num_expert_groups > 1 and (
                self.num_experts % self.num_expert_groups
                or not 0 < self.num_expert_groups_used <= self.num_expert_groups
            ):
                raise ConfigError(
                    f"expert groups {self.num_expert_groups} (used {self.num_expert_groups_used}) "
                    f"do not divide {self.num_experts} experts"
                )

    # derived -------------------------------------------------------------------------------------
    @property
    def has_moe(self) -> bool:
        return self.num_experts > 0 and self.num_dense_layers < self.num_layers

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Cached numbers per token per layer: the compressed KV plus the shared rope key (576)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def yarn_mscale(self) -> float:
        """YaRN attention correction as llama.cpp applies it to deepseek2: 1 + log_mul * ln(factor)."""
        if self.rope_scaling_factor <= 1:
            return 1.0
        return 1.0 + self.yarn_log_multiplier * math.log(self.rope_scaling_factor)

    @property
    def softmax_scale(self) -> float:
        return self.yarn_mscale**2 / math.sqrt(self.qk_head_dim)

    def is_moe_layer(self, layer: int) -> bool:
        return self.has_moe and layer >= self.num_dense_layers

    def latent_kv_bytes_per_token(self, element_size: int = 2) -> int:
        return self.num_layers * self.latent_dim * element_size

    # construction --------------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> ModelConfig:
        """Builds the config from GGUF key/value pairs (already decoded to Python values)."""
        arch = meta.get("general.architecture")
        if arch != ARCHITECTURE:
            raise ConfigError(f"unsupported architecture {arch!r}: mlapipe runs {ARCHITECTURE!r} models")

        def key(name: str) -> str:
            return f"{ARCHITECTURE}.{name}"

        def need(name: str) -> Any:
            if key(name) not in meta:
                raise ConfigError(f"missing metadata key {key(name)!r}")
            return meta[key(name)]

        def get(name: str, default: Any) -> Any:
            return meta.get(key(name), default)

        num_heads = int(need("attention.head_count"))
        rope_dim = int(need("rope.dimension_count"))
        # Files split into attn_k_b/attn_v_b store key/value lengths of the absorbed form (576/512) and
        # the per-head ones under *_mla; older files store the per-head ones directly.
        key_length = int(get("attention.key_length_mla", need("attention.key_length")))
        value_length = int(get("attention.value_length_mla", need("attention.value_length")))
        gating_code = int(get("expert_gating_func", 1))
        if gating_code not in GATING_BY_GGUF_CODE:
            raise ConfigError(f"unknown expert gating function code {gating_code}")
        vocab = meta.get("tokenizer.ggml.tokens")
        vocab_size = int(get("vocab_size", len(vocab) if vocab is not None else 0))
        scaling_type = str(get("rope.scaling.type", "none"))
        factor = float(get("rope.scaling.factor", 1.0)) if scaling_type == "yarn" else 1.0
        if scaling_type not in ("none", "yarn"):
            raise ConfigError(f"unsupported rope scaling {scaling_type!r} (deepseek2 uses yarn)")
        num_experts = int(get("expert_count", 0))
        return cls(
            num_layers=int(need("block_count")),
            hidden_size=int(need("embedding_length")),
            vocab_size=vocab_size,
            context_length=int(need("context_length")),
            rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            num_heads=num_heads,
            q_lora_rank=int(get("attention.q_lora_rank", 0)),
            kv_lora_rank=int(need("attention.kv_lora_rank")),
            qk_nope_head_dim=key_length - rope_dim,
            qk_rope_head_dim=rope_dim,
            v_head_dim=value_length,
            intermediate_size=int(need("feed_forward_length")),
            num_dense_layers=int(get("leading_dense_block_count", 0 if num_experts else need("block_count"))),
            num_experts=num_experts,
            num_experts_per_token=int(get("expert_used_count", 0)),
            num_shared_experts=int(get("expert_shared_count", 0)),
            expert_intermediate_size=int(get("expert_feed_forward_length", 0)),
            expert_weights_scale=float(get("expert_weights_scale", 1.0)),
            expert_weights_norm=bool(get("expert_weights_norm", False)),
            gating=GATING_BY_GGUF_CODE[gating_code],
            num_expert_groups=int(get("expert_group_count", 1)) or 1,
            num_expert_groups_used=int(get("expert_group_used_count", 1)) or 1,
            rope_freq_base=float(get("rope.freq_base", 10000.0)),
            rope_scaling_factor=factor,
            rope_original_context=int(get("rope.scaling.original_context_length", need("context_length"))),
            yarn_log_multiplier=float(get("rope.scaling.yarn_log_multiplier", 0.0)),
        )

    def describe(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]
