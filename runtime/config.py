"""ModelConfig: everything the DeepSeek forward pass needs, read from deepseek2 GGUF metadata."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from mlapipe.runtime import gguf_keys as keys
from mlapipe.runtime.gguf_keys import ConfigError

ARCHITECTURE = "deepseek2"
GATING_BY_GGUF_CODE = {1: "softmax", 2: "sigmoid"}  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE


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
        if self.num_dense_layers and self.intermediate_size <= 0:
            raise ConfigError("feed_forward_length must be positive: the model has leading dense layers")
        if self.has_moe:
            if self.expert_intermediate_size <= 0:
                raise ConfigError("expert_feed_forward_length must be positive: the model has MoE layers")
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
            per_group = self.num_experts // self.num_expert_groups
            if self.num_expert_groups > 1 and per_group < 2:  # a group is scored by its top-2 experts
                raise ConfigError(
                    f"expert groups {self.num_expert_groups} leave {per_group} of the {self.num_experts} "
                    "experts per group; group-limited routing scores each group by its best two"
                )
            if (
                self.num_expert_groups > 1
                and self.num_expert_groups_used * per_group < self.num_experts_per_token
            ):
                raise ConfigError(
                    f"{self.num_expert_groups_used} of {self.num_expert_groups} expert groups hold "
                    f"{self.num_expert_groups_used * per_group} experts, fewer than the "
                    f"{self.num_experts_per_token} used per token"
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
        """Builds the config from GGUF key/value pairs (decoded to Python values by gguf), reading every
        key through runtime/gguf_keys.py's table: types are checked there, never coerced."""
        arch = meta.get("general.architecture")
        if arch != ARCHITECTURE:
            raise ConfigError(f"unsupported architecture {arch!r}: mlapipe runs {ARCHITECTURE!r} models")

        def get(name: str) -> Any:
            return keys.read(meta, keys.arch_key(name))

        num_layers = get("block_count")
        hidden = get("embedding_length")
        num_heads = get("attention.head_count")
        head_count_kv = get("attention.head_count_kv")
        if head_count_kv not in (None, 1, num_heads):
            raise ConfigError(
                f"attention.head_count_kv = {head_count_kv}: deepseek2 files hold 1 (the absorbed form) "
                f"or attention.head_count ({num_heads})"
            )
        kv_lora = get("attention.kv_lora_rank")
        rope_dim = get("rope.dimension_count")
        key_length, value_length = _head_lengths(get, hidden // num_heads, kv_lora, rope_dim)
        gating_code = get("expert_gating_func")
        if gating_code == 0:  # LLAMA_EXPERT_GATING_FUNC_TYPE_NONE: files from before V3 (llama.cpp's default)
            gating_code = 1
        if gating_code not in GATING_BY_GGUF_CODE:
            raise ConfigError(
                f"expert_gating_func = {gating_code}: only 1 (softmax) and 2 (sigmoid) are supported"
            )
        vocab_size = get("vocab_size")
        if vocab_size is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            if not isinstance(tokens, list) or not tokens:
                raise ConfigError(
                    "missing metadata key 'deepseek2.vocab_size' (and no tokenizer.ggml.tokens)"
                )
            vocab_size = len(tokens)
        context = get("context_length")
        factor, scaling = _rope_scaling(get)
        num_experts = get("expert_count")
        dense = get("leading_dense_block_count")
        if dense is None:
            dense = 0 if num_experts else num_layers
        original_context = get("rope.scaling.original_context_length")
        return cls(
            num_layers=num_layers,
            hidden_size=hidden,
            vocab_size=vocab_size,
            context_length=context,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
            num_heads=num_heads,
            q_lora_rank=get("attention.q_lora_rank"),
            kv_lora_rank=kv_lora,
            qk_nope_head_dim=key_length - rope_dim,
            qk_rope_head_dim=rope_dim,
            v_head_dim=value_length,
            intermediate_size=get("feed_forward_length"),
            num_dense_layers=dense,
            num_experts=num_experts,
            num_experts_per_token=get("expert_used_count"),
            num_shared_experts=get("expert_shared_count"),
            expert_intermediate_size=get("expert_feed_forward_length"),
            expert_weights_scale=get("expert_weights_scale") or 1.0,  # 0: unset (llama.cpp: no scaling)
            expert_weights_norm=get("expert_weights_norm"),
            gating=GATING_BY_GGUF_CODE[gating_code],
            num_expert_groups=get("expert_group_count") or 1,
            num_expert_groups_used=get("expert_group_used_count") or 1,
            rope_freq_base=get("rope.freq_base"),
            rope_scaling_factor=factor if scaling == "yarn" else 1.0,
            rope_original_context=original_context if original_context is not None else context,
            yarn_log_multiplier=get("rope.scaling.yarn_log_multiplier"),
            yarn_beta_fast=get("rope.scaling.yarn_beta_fast"),
            yarn_beta_slow=get("rope.scaling.yarn_beta_slow"),
        )

    def describe(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


def _head_lengths(get, default: int, kv_lora: int, rope_dim: int) -> tuple[int, int]:
    """Per-head key (nope + rope) and value lengths. Mainline llama.cpp files store the absorbed form's
    lengths (kv_lora + rope, kv_lora) under key_length / value_length and the per-head ones under the
    *_mla keys; older and ik_llama.cpp files store the per-head ones directly (llama-hparams.cpp)."""
    key_mla, value_mla = get("attention.key_length_mla"), get("attention.value_length_mla")
    key_length, value_length = get("attention.key_length"), get("attention.value_length")
    if (key_mla is None) != (value_mla is None):
        present = "attention.key_length_mla" if key_mla is not None else "attention.value_length_mla"
        raise ConfigError(f"{present} is given without its pair: mainline files hold both *_mla keys")
    if key_mla is not None:
        if key_length not in (None, kv_lora + rope_dim) or value_length not in (None, kv_lora):
            raise ConfigError(
                f"attention.key_length / value_length = {key_length} / {value_length} contradict the *_mla "
                f"keys: with them a file holds kv_lora_rank + rope ({kv_lora + rope_dim}) / kv_lora_rank ({kv_lora})"
            )
        key_length, value_length = key_mla, value_mla
    key_length = default if key_length is None else key_length
    value_length = default if value_length is None else value_length
    if key_length <= rope_dim:
        raise ConfigError(
            f"attention.key_length {key_length} leaves no non-rope part beside rope.dimension_count {rope_dim}"
        )
    return key_length, value_length


def _rope_scaling(get) -> tuple[float, str]:
    """(factor, type) as llama.cpp reads them: the factor under rope.scaling.factor or the older
    rope.scale_linear, 0 meaning none; the type defaults to 'linear' when absent (llama-hparams.cpp)."""
    factor = get("rope.scaling.factor") or get("rope.scale_linear") or 1.0
    scaling = get("rope.scaling.type") or ("linear" if factor != 1.0 else "none")
    if scaling == "linear" and factor != 1.0:
        raise ConfigError(
            f"rope.scaling.type linear (factor {factor:g}) is not supported: deepseek2 uses yarn"
        )
    if scaling == "yarn" and factor < 1.0:
        raise ConfigError(f"rope.scaling.factor {factor:g} below 1 with yarn scaling")
    return factor, scaling
