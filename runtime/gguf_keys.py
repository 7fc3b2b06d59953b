"""Every GGUF metadata key mlapipe reads: its type, its valid range, its default, and what it becomes.

This table is the one place that says so: ModelConfig reads through it, the shard reader reads the
split.* keys through it, and whole-file checks validate against it. The defaults are the ones
llama.cpp / ik_llama.cpp apply to deepseek2 when a key is absent (llama-model.cpp, llama-hparams.cpp);
"derived" defaults (vocab size from the token list, per-head lengths from n_embd / n_head, ...) are
computed by ModelConfig.from_gguf_metadata and marked DERIVED here.

Types are checked, never coerced: gguf decodes every integer type to a Python int, floats to float,
bools to bool and strings to str, so an epsilon stored as the string "3", a layer count stored as a
float or a bool where an int belongs is an error naming the key. (llama.cpp is stricter still: it
wants the exact integer width; any integer type is accepted here since none loses a valid value.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ARCH = "deepseek2"


class ConfigError(ValueError):
    """The model's metadata is missing a key, holds a wrong-typed or out-of-range value, or values the
    model cannot run with."""


class _Sentinel:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUIRED = _Sentinel("REQUIRED")
DERIVED = _Sentinel("DERIVED")  # absent: ModelConfig.from_gguf_metadata computes it from other keys


@dataclass(frozen=True)
class MetadataKey:
    key: str  # the full GGUF key
    kind: type  # int, float, bool or str
    low: float | None = None  # inclusive range for numbers
    high: float | None = None
    default: Any = REQUIRED
    per_layer: bool = False  # may be an array of one value per layer (llama.cpp's get_key_or_arr)
    choices: tuple[str, ...] = ()  # allowed strings
    feeds: str = ""  # the ModelConfig field (or the reader) it goes to


def _k(name: str, kind: type, low=None, high=None, default: Any = REQUIRED, feeds: str = "", **extra):
    return MetadataKey(f"{ARCH}.{name}", kind, low, high, default, feeds=feeds, **extra)


_DIM = 1 << 16  # bound on any hidden or head width: real models are far below, a corrupt value far above
_MAX_TOKENS = 1 << 24

KEYS: tuple[MetadataKey, ...] = (
    MetadataKey("general.architecture", str, feeds="must be deepseek2"),
    # model
    _k("block_count", int, 1, 1024, feeds="num_layers"),
    _k("embedding_length", int, 1, _DIM, feeds="hidden_size"),
    _k("vocab_size", int, 1, _MAX_TOKENS, DERIVED, feeds="vocab_size (absent: len(tokenizer.ggml.tokens))"),
    _k("context_length", int, 1, _MAX_TOKENS, feeds="context_length"),
    _k("attention.layer_norm_rms_epsilon", float, 1e-12, 1.0, feeds="rms_norm_eps"),
    # mla
    _k("attention.head_count", int, 1, 1024, per_layer=True, feeds="num_heads"),
    _k(
        "attention.head_count_kv",
        int,
        1,
        1024,
        DERIVED,
        per_layer=True,
        feeds="1 (llama.cpp's absorbed MQA form) or head_count (older and ik_llama.cpp files); not used",
    ),
    _k("attention.q_lora_rank", int, 0, _DIM, 0, feeds="q_lora_rank (0: direct attn_q, V2-Lite)"),
    _k("attention.kv_lora_rank", int, 1, _DIM, feeds="kv_lora_rank"),
    _k(
        "attention.key_length",
        int,
        1,
        _DIM,
        DERIVED,
        feeds="qk_nope + rope per head; with *_mla keys: kv_lora_rank + rope (checked, not used)",
    ),
    _k(
        "attention.value_length",
        int,
        1,
        _DIM,
        DERIVED,
        feeds="v_head_dim; with *_mla keys: kv_lora_rank (checked, not used)",
    ),
    _k("attention.key_length_mla", int, 1, _DIM, None, feeds="qk_nope + rope per head (mainline files)"),
    _k("attention.value_length_mla", int, 1, _DIM, None, feeds="v_head_dim (mainline files)"),
    _k("rope.dimension_count", int, 2, 4096, feeds="qk_rope_head_dim"),
    # dense mlp
    _k("feed_forward_length", int, 0, 1 << 20, 0, per_layer=True, feeds="intermediate_size"),
    _k("leading_dense_block_count", int, 0, 1024, DERIVED, feeds="num_dense_layers (absent: 0 with experts)"),
    # moe
    _k("expert_count", int, 0, 4096, 0, feeds="num_experts"),
    _k("expert_used_count", int, 0, 4096, 0, feeds="num_experts_per_token"),
    _k("expert_shared_count", int, 0, 256, 0, feeds="num_shared_experts"),
    _k("expert_feed_forward_length", int, 0, 1 << 20, 0, feeds="expert_intermediate_size"),
    _k("expert_weights_scale", float, 0.0, 1000.0, 1.0, feeds="expert_weights_scale (0: unset, as 1)"),
    _k("expert_weights_norm", bool, default=False, feeds="expert_weights_norm"),
    _k(
        "expert_gating_func",
        int,
        0,
        3,
        0,
        feeds="gating: 1 softmax, 2 sigmoid; absent or 0: softmax (llama.cpp's deepseek2 default)",
    ),
    _k("expert_group_count", int, 0, 4096, 0, feeds="num_expert_groups (absent, 0 or 1: no group limit)"),
    _k("expert_group_used_count", int, 0, 4096, 0, feeds="num_expert_groups_used"),
    # rope / yarn
    _k("rope.freq_base", float, 1e-3, 1e12, 10000.0, feeds="rope_freq_base"),
    _k(
        "rope.scaling.type",
        str,
        default=DERIVED,
        choices=("none", "linear", "yarn"),
        feeds="absent: 'linear' if a factor is given (llama.cpp), else none; only none and yarn run",
    ),
    _k("rope.scaling.factor", float, 0.0, 1e6, 0.0, feeds="rope_scaling_factor (0: unset, as 1)"),
    _k("rope.scale_linear", float, 0.0, 1e6, 0.0, feeds="older name of rope.scaling.factor"),
    _k(
        "rope.scaling.original_context_length",
        int,
        1,
        _MAX_TOKENS,
        DERIVED,
        feeds="rope_original_context (absent: context_length)",
    ),
    _k(
        "rope.scaling.yarn_log_multiplier",
        float,
        0.0,
        10.0,
        0.0,
        feeds="yarn_log_multiplier (converters write 0.1 * mscale_all_dim)",
    ),
    _k("rope.scaling.yarn_beta_fast", float, 0.0, 1024.0, 32.0, feeds="yarn_beta_fast"),
    _k("rope.scaling.yarn_beta_slow", float, 0.0, 1024.0, 1.0, feeds="yarn_beta_slow"),
    # split files (gguf-split); every shard has them, the first also has everything else
    MetadataKey("split.no", int, 0, 65535, 0, feeds="this shard's index (0-based)"),
    MetadataKey("split.count", int, 0, 65535, 0, feeds="number of shards (0 or absent: not split)"),
    MetadataKey("split.tensors.count", int, 0, (1 << 31) - 1, DERIVED, feeds="tensors in all shards"),
)
KEY_TABLE: dict[str, MetadataKey] = {k.key: k for k in KEYS}


def arch_key(name: str) -> str:
    return f"{ARCH}.{name}"


def read(meta: Mapping[str, Any], key: str) -> Any:
    """The key's value checked against its table row; absent: its default (None for DERIVED)."""
    spec = KEY_TABLE[key]
    if key not in meta:
        if spec.default is REQUIRED:
            raise ConfigError(f"missing metadata key {key!r}")
        return None if spec.default is DERIVED else spec.default
    return check(spec, meta[key])


def check(spec: MetadataKey, value: Any) -> Any:
    if spec.per_layer and isinstance(value, list):
        if not value:
            raise ConfigError(f"metadata key {spec.key!r} is an empty array")
        values = [check_scalar(spec, v) for v in value]
        if len(set(values)) != 1:
            raise ConfigError(
                f"metadata key {spec.key!r} differs between layers ({sorted(set(values))}): "
                "per-layer values are not supported"
            )
        return values[0]
    return check_scalar(spec, value)


def check_scalar(spec: MetadataKey, value: Any) -> Any:
    if not _is_kind(value, spec.kind):
        raise ConfigError(
            f"metadata key {spec.key!r} holds {_describe(value)}, expected {_KIND_NAMES[spec.kind]}"
        )
    if spec.choices and value not in spec.choices:
        raise ConfigError(f"metadata key {spec.key!r} = {value!r}: expected one of {', '.join(spec.choices)}")
    if spec.kind in (int, float):
        if value != value:  # NaN
            raise ConfigError(f"metadata key {spec.key!r} is NaN")
        if (spec.low is not None and value < spec.low) or (spec.high is not None and value > spec.high):
            raise ConfigError(f"metadata key {spec.key!r} = {value} is outside {spec.low:g}..{spec.high:g}")
    return value


def check_all(meta: Mapping[str, Any]) -> None:
    """Checks every key of the table that `meta` holds (absent ones are not an error here)."""
    for key, spec in KEY_TABLE.items():
        if key in meta:
            check(spec, meta[key])


_KIND_NAMES = {int: "an integer", float: "a float", bool: "a bool", str: "a string"}


def _is_kind(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, float)
    return isinstance(value, kind)


def _describe(value: Any) -> str:
    for kind, name in ((bool, "a bool"), (int, "an integer"), (float, "a float"), (str, "a string")):
        if isinstance(value, kind):
            return f"{name} ({value!r})" if not isinstance(value, str) or len(value) < 40 else name
    if isinstance(value, list):
        return "an array"
    return type(value).__name__
