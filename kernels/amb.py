"""amb (attention max batch): split attention heads into steps so one step's intermediate fits a budget.

Seed rule (ik_llama.cpp PRs 237 and 260): if the intermediate of all heads is S bytes and the budget is
M MiB, run n = ceil(S / M) steps over about H / n heads each and concatenate the per-step outputs along
the head axis. Unlike ik_llama.cpp the steps need not divide the heads: they are split as evenly as
possible, and n grows past ceil(S / M) when the largest step would still exceed the budget. One head
per step is the floor; `plan_head_steps` never goes below it. Budget 0 means unlimited.
"""

from __future__ import annotations

import math

MIB = 1 << 20


def kq_bytes_per_head(num_kv_tokens: int, num_new_tokens: int, element_size: int) -> int:
    """The materialized K*Q scores of one head (the non-fused reference path, seed PR 237)."""
    return num_kv_tokens * num_new_tokens * element_size


def decompressed_kv_bytes_per_head(
    num_kv_tokens: int, qk_nope_dim: int, v_dim: int, rope_dim: int, element_size: int
) -> int:
    """Decompressed K (nope + rope) and V of one head over the whole context (FlashMLA-2, seed PR 260)."""
    return num_kv_tokens * (qk_nope_dim + rope_dim + v_dim) * element_size


def split_heads(num_heads: int, num_steps: int) -> list[tuple[int, int]]:
    """[start, end) head ranges, as even as possible, the larger ones first."""
    base, extra = divmod(num_heads, num_steps)
    steps, start = [], 0
    for i in range(num_steps):
        end = start + base + (1 if i < extra else 0)
        steps.append((start, end))
        start = end
    return steps


def plan_head_steps(num_heads: int, bytes_per_head: int, budget_mib: float) -> list[tuple[int, int]]:
    """Head steps whose intermediate (heads in step x bytes_per_head) stays within budget_mib."""
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    if budget_mib <= 0 or bytes_per_head <= 0:
        return [(0, num_heads)]
    budget = budget_mib * MIB
    num_steps = min(num_heads, max(1, math.ceil(num_heads * bytes_per_head / budget)))
    while num_steps < num_heads and math.ceil(num_heads / num_steps) * bytes_per_head > budget:
        num_steps += 1
    return split_heads(num_heads, num_steps)


def prefill_bytes_per_head(num_kv_tokens: int, qk_nope_dim: int, v_dim: int, element_size: int) -> int:
    """What the Triton prefill (kernels/mla_prefill.py) holds per head in one step: K_nope and V over the
    gathered context. The rope key is shared by all heads and read from the latent, so it is not counted
    per head (the latent gather, (L, C + R), does not depend on the steps)."""
    return decompressed_kv_bytes_per_head(num_kv_tokens, qk_nope_dim, v_dim, 0, element_size)


def plan_prefill_head_steps(
    num_heads: int, num_kv_tokens: int, qk_nope_dim: int, v_dim: int, element_size: int, budget_mib: float
) -> list[tuple[int, int]]:
    """Head steps for the decompressed prefill under budget_mib (0 = unlimited); num_kv_tokens is the sum
    of the prefill sequences' lengths (cached prefix plus new tokens)."""
    per_head = prefill_bytes_per_head(num_kv_tokens, qk_nope_dim, v_dim, element_size)
    return plan_head_steps(num_heads, per_head, budget_mib)


def plan_reference_head_steps(
    num_heads: int, num_kv_tokens: int, num_new_tokens: int, budget_mib: float, element_size: int = 4
) -> list[tuple[int, int]]:
    """Head steps for the materialized path (reference: fp32 K*Q scores) under budget_mib (seed PR 237)."""
    return plan_head_steps(
        num_heads, kq_bytes_per_head(num_kv_tokens, num_new_tokens, element_size), budget_mib
    )


def step_bytes(head_steps: list[tuple[int, int]], bytes_per_head: int) -> list[int]:
    """The intermediate each step holds: its head count times bytes_per_head."""
    return [(end - start) * bytes_per_head for start, end in head_steps]
