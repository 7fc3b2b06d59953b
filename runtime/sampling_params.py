"""What a request asks of generation."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20  # alternatives per token, as vLLM allows


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
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
