"""Perplexity of a model over a text, by llama.cpp's llama-perplexity method (tools/perplexity).

The whole text is tokenized once (with the file's BOS). It is cut into non-overlapping chunks of n_ctx
tokens (the tail that does not fill a chunk is dropped); each chunk runs from an empty cache with its
first token replaced by BOS, and only the second half is scored, so every scored token has at least
n_ctx/2 tokens of context: token j of a chunk counts for j > n_ctx // 2. The estimate is
exp(mean NLL) over all scored tokens, and its uncertainty is llama.cpp's: the standard error of the
mean NLL, sqrt((E[nll^2] - E[nll]^2) / (count - 1)), times the perplexity.

Every chunk goes through Engine.score, so it runs on whatever pipeline the engine has.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mlapipe.runtime.engine import Engine, PromptError


@dataclass(frozen=True)
class Perplexity:
    running: list[float]  # the estimate after each chunk (llama's "[i]ppl")
    ppl: float
    uncertainty: float  # +/- one standard error, in perplexity units
    num_chunks: int
    num_scored: int  # tokens that entered the mean


def chunks(tokens: Sequence[int], n_ctx: int, max_chunks: int | None, bos: int | None) -> list[list[int]]:
    """The chunks llama-perplexity evaluates: tokens[i*n_ctx : (i+1)*n_ctx], the first one set to BOS."""
    if n_ctx < 4:
        raise ValueError(f"-c {n_ctx} is too small for perplexity: it needs at least 4 tokens per chunk")
    if len(tokens) < 2 * n_ctx:  # llama-perplexity's rule
        raise PromptError(
            f"the text tokenizes to only {len(tokens)} tokens; perplexity with -c {n_ctx} needs at least "
            f"{2 * n_ctx} (2 x n_ctx): give a longer text or a smaller -c"
        )
    count = (
        len(tokens) // n_ctx
        if max_chunks is None or max_chunks < 0
        else min(max_chunks, len(tokens) // n_ctx)
    )
    out = []
    for i in range(count):
        chunk = list(tokens[i * n_ctx : (i + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return out


def scored_half(scores: Sequence[float], n_ctx: int) -> Sequence[float]:
    """Engine.score gives log p(token j) for j = 1..n_ctx-1; llama counts j = n_ctx//2 + 1 .. n_ctx-1."""
    return scores[n_ctx // 2 :]


def perplexity(
    engine: Engine,
    text: str,
    n_ctx: int = 512,
    max_chunks: int | None = None,
    on_chunk: Callable[[int, float], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,  # (tokens in the text, chunks to evaluate)
) -> Perplexity:
    if n_ctx > engine.n_ctx:
        raise ValueError(
            f"-c {n_ctx} is larger than the engine's context ({engine.n_ctx}; the model was trained for "
            f"{engine.config.context_length})"
        )
    tok = engine.tokenizer
    if tok is None:
        raise PromptError(f"{engine.model.path} has no tokenizer: perplexity needs text")
    bos = tok.bos_token_id if tok.add_bos else None
    nll: list[float] = []
    running = []
    tokens = tok.encode(text)
    work = chunks(tokens, n_ctx, max_chunks, bos)
    if on_start:
        on_start(len(tokens), len(work))
    for i, chunk in enumerate(work):
        nll += [-s for s in scored_half(engine.score(chunk), n_ctx)]
        running.append(math.exp(math.fsum(nll) / len(nll)))
        if on_chunk:
            on_chunk(i + 1, running[-1])
    mean = math.fsum(nll) / len(nll)
    variance = math.fsum(v * v for v in nll) / len(nll) - mean * mean
    ppl = math.exp(mean)
    spread = math.sqrt(variance / (len(nll) - 1)) if variance > 0 else 0.0
    return Perplexity(running, ppl, spread * ppl, len(work), len(nll))
