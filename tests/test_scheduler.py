"""Scheduler and KV blocks, pure Python: no torch, no Ray, no model."""

import pytest

from runtime.block_manager import BlockManager, OutOfBlocks
from runtime.microbatch import StepOutput
from runtime.sampling_params import SamplingParams
from runtime.scheduler import Request, Scheduler


def _scheduler(num_blocks=64, block_size=4, ubatch=8, n_ctx=64, groups=1, eos=None):
    return Scheduler(BlockManager(num_blocks, block_size), ubatch, n_ctx, groups, eos_token_id=eos)


def _finish(s: Scheduler, batch, token=7):
    sampled = {c.request_id: token for c in batch.chunks if c.sample}
    return s.update(StepOutput(batch.batch_id, sampled))


def test_block_manager_allocates_grows_and_frees():
    bm = BlockManager(4, 16)
    assert bm.allocate("a", 17) == [0, 1]
    assert bm.allocate("a", 32) == [0, 1]  # already covered
    assert bm.allocate("b", 1) == [2]
    with pytest.raises(OutOfBlocks):
        bm.allocate("b", 40)
    bm.free("a")
    assert bm.num_free == 3 and bm.usage == 0.25


def test_prompt_is_chunked_by_ubatch_then_decoded():
    s = _scheduler(ubatch=8)
    s.add(Request("r", list(range(20)), SamplingParams(max_tokens=3)))
    sizes = []
    while s.has_unfinished:
        batch = s.schedule()
        sizes.append([c.num_new for c in batch.chunks])
        assert batch.chunks[0].sample == (batch.chunks[0].seq_len == 20 + len(sizes) - 3 or sizes[-1] == [1])
        _finish(s, batch)
    assert sizes == [[8], [8], [4], [1], [1]]


def test_every_token_position_is_scheduled_once_and_in_order():
    s = _scheduler(ubatch=6)
    prompts = {f"r{i}": list(range(3 + 5 * i)) for i in range(4)}
    for rid, p in prompts.items():
        s.add(Request(rid, p, SamplingParams(max_tokens=4)))
    seen = {rid: [] for rid in prompts}
    while s.has_unfinished:
        batch = s.schedule()
        assert batch.num_tokens <= 6
        assert len({c.request_id for c in batch.chunks}) == len(batch.chunks)
        for c in batch.chunks:
            seen[c.request_id].extend(range(c.num_cached, c.seq_len))
            assert len(c.block_table) * 4 >= c.seq_len
        _finish(s, batch)
    for rid, p in prompts.items():
        assert seen[rid] == list(range(len(p) + 3))  # the 4th token is sampled, never fed back


def test_groups_keep_a_request_in_one_batch_at_a_time():
    s = _scheduler(ubatch=64, groups=2)
    for i in range(4):
        s.add(Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=5)))
    first = s.schedule()
    second = s.schedule()
    assert s.schedule() is None  # both groups in flight
    ids_first = {c.request_id for c in first.chunks}
    assert not ids_first & {c.request_id for c in (second.chunks if second else [])}
    _finish(s, first)
    third = s.schedule()
    assert {c.request_id for c in third.chunks} <= ids_first  # only requests not in flight


def test_decode_sequences_are_spread_over_free_groups():
    s = _scheduler(ubatch=64, groups=2)
    for i in range(6):
        s.add(Request(f"r{i}", [1, 2], SamplingParams(max_tokens=10)))
    _finish(s, s.schedule())  # all six prefilled in one batch
    a, b = s.schedule(), s.schedule()
    assert [len(a.chunks), len(b.chunks)] == [3, 3]


def test_stop_on_eos_and_max_tokens_and_context():
    s = _scheduler(eos=9, n_ctx=6)
    s.add(Request("eos", [1, 2], SamplingParams(max_tokens=10)))
    s.add(Request("len", [1, 2], SamplingParams(max_tokens=2)))
    s.add(Request("ctx", [1, 2, 3, 4], SamplingParams(max_tokens=10)))
    s.add(Request("ign", [1, 2], SamplingParams(max_tokens=2, ignore_eos=True)))
    reasons = {}
    while s.has_unfinished:
        batch = s.schedule()
        sampled = {c.request_id: 9 if c.request_id in ("eos", "ign") else 5 for c in batch.chunks if c.sample}
        for r in s.update(StepOutput(batch.batch_id, sampled))[1]:
            reasons[r.request_id] = (r.finish_reason, len(r.output_token_ids))
    assert reasons == {"eos": ("stop", 1), "len": ("length", 2), "ctx": ("length", 2), "ign": ("length", 2)}
    assert s.blocks.num_free == s.blocks.num_blocks


def test_admission_waits_for_blocks_and_preempts_when_full():
    s = _scheduler(num_blocks=4, block_size=4, ubatch=16, n_ctx=16)
    s.add(Request("a", list(range(8)), SamplingParams(max_tokens=8)))
    s.add(Request("b", list(range(8)), SamplingParams(max_tokens=8)))
    s.add(Request("c", list(range(8)), SamplingParams(max_tokens=8)))
    batch = s.schedule()
    assert [c.request_id for c in batch.chunks] == ["a", "b"]  # c waits: no blocks left
    _finish(s, batch)
    batch = s.schedule()  # a's 9th token needs a new block: b is preempted
    assert [c.request_id for c in batch.chunks] == ["a"]
    assert [r.request_id for r in s.waiting] == ["b", "c"]
    done = _finish(s, batch)[1]
    while s.has_unfinished:
        done += _finish(s, s.schedule())[1]
    assert sorted(r.request_id for r in done) == ["a", "b", "c"]
    assert all(len(r.output_token_ids) == 8 for r in done)


def test_score_requests_carry_targets_and_never_sample():
    s = _scheduler(ubatch=3)
    s.add(Request("s", [10, 11, 12, 13, 14], SamplingParams(), score_only=True))
    targets = []
    while s.has_unfinished:
        batch = s.schedule()
        chunk = batch.chunks[0]
        assert not chunk.sample
        targets += chunk.score_targets
        finished = s.update(StepOutput(batch.batch_id, {}, {"s": [0.0] * chunk.num_new}))[1]
    assert targets == [11, 12, 13, 14, -1]
    assert finished[0].finish_reason == "scored"


def test_failed_batch_fails_its_requests_and_frees_blocks():
    s = _scheduler()
    s.add(Request("a", [1, 2, 3], SamplingParams()))
    batch = s.schedule()
    failed = s.fail_batch(batch.batch_id, "stage 1 died")
    assert failed[0].finish_reason == "error: stage 1 died"
    assert not s.has_unfinished and s.blocks.num_free == s.blocks.num_blocks
