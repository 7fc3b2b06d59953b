"""What the command line shows of generated text and of how a request went.

Only the terminal gets escaped text: the API returns text exactly as decoded. A random or broken model
can emit BEL, vertical tab, carriage return or ANSI escape bytes that ring, move the cursor or restyle
the terminal; those are shown as Python escapes (\\x07, \\x0b, \\r, \\x1b), newlines and tabs as they are.
"""

from __future__ import annotations

import unicodedata

KEPT = frozenset("\n\t")


def printable(text: str) -> str:
    """`text` with control, format and unassigned characters (Unicode category C*) escaped."""
    return "".join(map(_shown, text))


def _shown(c: str) -> str:
    if c in KEPT or unicodedata.category(c)[0] != "C":
        return c
    return c.encode("unicode_escape").decode("ascii")


def finish_description(
    reason: str | None, prompt_tokens: int, generated: int, max_tokens: int, n_ctx: int
) -> str:
    """Why a generation ended, the way llama.cpp's tools say it."""
    if reason == "length":
        if prompt_tokens + generated >= n_ctx:
            return f"length (context full at {n_ctx} tokens)"
        return f"length ({max_tokens} tokens asked)"
    if reason == "stop":
        return "stop (end of sequence)"
    return reason or "unfinished"


def speed_summary(
    prompt_tokens: int, generated: int, started: float, first: float | None, last: float | None
) -> str:
    """Time to first token (from the request) and decode tokens/s (tokens after the first, over the time
    after it), as llama.cpp separates prompt and generation speed."""
    if first is None:
        return "no tokens"
    ttft = first - started
    parts = [f"prompt {prompt_tokens} tokens, time to first token {ttft:.3f} s"]
    if generated > 1 and last is not None and last > first:
        parts.append(f"{(generated - 1) / (last - first):.1f} tokens/s")
    return ", ".join(parts)
