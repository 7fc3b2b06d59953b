"""What a request asks of generation, checked once here: every value a stage later uses is finite, in
range and of the type it is used as, so no request can fail inside a stage (where it would take the
micro-batch it shares with others down with it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

# Below this, logits / temperature overflows float32 (1e-40 is a subnormal; 1e-46 rounds to 0), and the
# distribution is one-hot long before: vLLM raises smaller temperatures to the same 0.01.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0  # flat long before: softmax(logits / 100) of O(10) logits is uniform to 1e-3
MAX_SEED = 2**64  # seeds are 64-bit, as in torch.Generator.manual_seed
MAX_TOKENS_LIMIT = 1 << 31  # bounded by n_ctx anyway; this only keeps the value an ordinary integer
MAX_LOGPROBS = 20  # alternatives per token, as vLLM allows


class SamplingParamsError(ValueError):
    """A sampling parameter of the wrong type or out of range; the message names it and its value."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0
    seed: int | None = None  # seeded sampling gives the same tokens on every run and batch mix
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # log p of each sampled token under the model (before temperature, top-k, top-p) and of this many
    # most likely alternatives; None: none. Such requests run one decode step per driver round trip.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        _integer("max_tokens", self.max_tokens, 1, MAX_TOKENS_LIMIT - 1)
        temperature = _real("temperature", self.temperature)
        if temperature != 0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
            raise SamplingParamsError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                f"got {self.temperature!r}"
            )
        _integer("top_k", self.top_k, 0, MAX_TOKENS_LIMIT - 1)
        top_p = _real("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            _integer("seed", self.seed, -(MAX_SEED // 2), MAX_SEED - 1)
        if not isinstance(self.stop_token_ids, (tuple, list)):
            raise SamplingParamsError(
                f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}"
            )
        for token in self.stop_token_ids:
            _integer("stop_token_ids", token, 0, MAX_TOKENS_LIMIT - 1)
        if not isinstance(self.ignore_eos, bool):
            raise SamplingParamsError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        # Normalise to plain Python types (numpy scalars and lists become int/float/tuple), so what
        # travels to the stages is exactly what was checked.
        object.__setattr__(self, "max_tokens", int(self.max_tokens))
        object.__setattr__(self, "temperature", float(temperature))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "top_p", float(top_p))
        object.__setattr__(self, "seed", None if self.seed is None else int(self.seed))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "logprobs", None if self.logprobs is None else int(self.logprobs))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _integer(name: str, value, low: int, high: int) -> None:
    # bool is an int in Python, and 2.0 is not an integer type: both are refused, never truncated.
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise SamplingParamsError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise SamplingParamsError(f"{name} must be in [{low}, {high}], got {value!r}")


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise SamplingParamsError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SamplingParamsError(f"{name} must be finite, got {value!r}")
    return float(value)
