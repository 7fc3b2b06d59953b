"""Next-token choice on the last stage: greedy, or seeded temperature / top-k / top-p sampling."""

from __future__ import annotations

import torch

from mlapipe.runtime.sampling_params import SamplingParams


def _generator(seed: int, step: int) -> torch.Generator:
    # A fresh generator per (seed, step): the token depends only on the request, never on which
    # other requests shared the batch or on the order they ran in.
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (1 << 63))


def sample_token(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """logits (vocab,) fp32 -> token id."""
    if params.greedy:
        return int(torch.argmax(logits))
    # Shifted so the largest logit is 0 before dividing: no temperature can overflow it to inf (whose
    # softmax is NaN); SamplingParams keeps the temperature where float32 can divide by it.
    logits = logits.float().cpu()
    logits = (logits - logits.max()) / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs[before >= params.top_p] = 0.0  # keep the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    seed = params.seed if params.seed is not None else int(torch.randint(0, 1 << 62, ()).item())
    return int(torch.multinomial(probs, 1, generator=_generator(seed, step)))
