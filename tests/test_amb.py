"""amb head-step planning (kernels/amb.py): the seed rule, even splits, and every step within budget."""

from __future__ import annotations

import math

import pytest

from mlapipe.kernels import amb

MIB = amb.MIB


def test_unlimited_budget_is_one_step():
    assert amb.plan_head_steps(128, 10 * MIB, 0) == [(0, 128)]
    assert amb.plan_prefill_head_steps(128, 163840, 128, 128, 2, 0) == [(0, 128)]


def test_seed_rule_steps_are_ceil_of_size_over_budget():
    # 128 heads x 3 MiB = 384 MiB under 100 MiB: ceil(3.84) = 4 steps of 32 heads (96 MiB each)
    steps = amb.plan_head_steps(128, 3 * MIB, 100)
    assert steps == [(0, 32), (32, 64), (64, 96), (96, 128)]


def test_steps_need_not_divide_the_heads():
    steps = amb.plan_head_steps(10, MIB, 4)  # ceil(10 / 4) = 3 steps: 4 + 3 + 3 heads
    assert steps == [(0, 4), (4, 7), (7, 10)]


def test_steps_grow_past_the_seed_count_when_the_largest_step_would_not_fit():
    # ceil(5 * 3 / 7) = 3 steps would give a step of 2 heads = 6 MiB <= 7: fits. With budget 5 MiB:
    # ceil(15 / 5) = 3 steps of 2, 2, 1 heads -> 6 MiB > 5, so one head per step.
    assert amb.plan_head_steps(5, 3 * MIB, 5) == [(h, h + 1) for h in range(5)]


def test_one_head_per_step_is_the_floor_even_over_budget():
    assert amb.plan_head_steps(3, 10 * MIB, 1) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("num_heads", [1, 7, 16, 128])
@pytest.mark.parametrize("num_kv_tokens", [1, 999, 16384, 163840])
@pytest.mark.parametrize("budget_mib", [1, 64, 256, 1024])
def test_every_planned_step_stays_within_budget(num_heads, num_kv_tokens, budget_mib):
    per_head = amb.prefill_bytes_per_head(num_kv_tokens, 128, 128, 2)
    steps = amb.plan_prefill_head_steps(num_heads, num_kv_tokens, 128, 128, 2, budget_mib)
    # steps tile the heads in order, as evenly as possible
    assert steps[0][0] == 0 and steps[-1][1] == num_heads
    assert all(a[1] == b[0] for a, b in zip(steps, steps[1:]))
    sizes = [end - start for start, end in steps]
    assert max(sizes) - min(sizes) <= 1
    for used in amb.step_bytes(steps, per_head):
        assert used <= budget_mib * MIB or per_head > budget_mib * MIB  # one head over budget: the floor
    if per_head <= budget_mib * MIB:
        assert len(steps) >= math.ceil(num_heads * per_head / (budget_mib * MIB))


@pytest.mark.parametrize("num_new_tokens", [1, 512, 2048])
def test_reference_path_plans_on_kq_scores(num_new_tokens):
    # seed PR 237: K*Q of 163840 cached tokens x 512 new tokens x 128 heads x 4 bytes = 40 GiB unbounded
    steps = amb.plan_reference_head_steps(128, 163840, num_new_tokens, budget_mib=1024)
    per_head = amb.kq_bytes_per_head(163840, num_new_tokens, 4)
    if per_head <= 1024 * MIB:
        assert max(amb.step_bytes(steps, per_head)) <= 1024 * MIB
    else:  # 2048 new tokens: one head's scores (1.25 GiB) exceed the budget; one head per step is the floor
        assert steps == [(h, h + 1) for h in range(128)]
    assert len(steps) >= min(128, math.ceil(128 * per_head / (1024 * MIB)))  # more when uneven


def test_prefill_bytes_count_k_nope_and_v_not_the_shared_rope_key():
    assert amb.prefill_bytes_per_head(1000, 128, 128, 2) == 1000 * 256 * 2
    assert amb.decompressed_kv_bytes_per_head(1000, 128, 128, 64, 2) == 1000 * 320 * 2


def test_split_heads_is_even_and_larger_first():
    assert amb.split_heads(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert amb.split_heads(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_rejects_non_positive_heads():
    with pytest.raises(ValueError):
        amb.plan_head_steps(0, MIB, 1)
