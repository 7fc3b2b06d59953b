"""Scheduler and KV blocks, pure Python: no torch, no Ray, no model."""

import pytest

from mlapipe.runtime.block_manager import BlockManager, OutOfBlocks
from mlapipe.runtime.microbatch import StepOutput
from mlapipe.runtime.sampling_params import SamplingParams
from mlapipe.runtime.scheduler import Request, Scheduler


def _scheduler(num_blocks=64, block_size=4, ubatch=8, n_ctx=64, groups=1, eos=None):
    return Scheduler(BlockManager(num_blocks, block_size), ubatch, n_ctx, groups, eos_token_id=eos)


def _finish(s: Scheduler, batch, token=7):
    sampled = {c.request_id: [token] * batch.num_steps for c in batch.chunks if c.sample}
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
        sampled = {
            c.request_id: [9 if c.request_id in ("eos", "ign") else 5] for c in batch.chunks if c.sample
        }
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


def test_a_raising_batch_is_retried_request_by_request_and_only_the_culprit_fails():
    s = _scheduler(ubatch=16)
    for name in "abc":
        s.add(Request(name, [1, 2, 3], SamplingParams(max_tokens=2)))
    shared = s.schedule()
    assert [c.request_id for c in shared.chunks] == ["a", "b", "c"]
    assert s.retry_or_fail_batch(shared.batch_id, "stage 0 raised MemoryError") == []  # nobody fails yet
    retries = []
    while (batch := s.schedule()) is not None:  # one group: each retry once the one before is back
        retries.append([(c.request_id, c.num_cached, c.num_new) for c in batch.chunks])
        if batch.chunks[0].request_id == "b":
            failed = s.retry_or_fail_batch(batch.batch_id, "stage 0 raised MemoryError")
            assert [r.finish_reason for r in failed] == ["error: stage 0 raised MemoryError"]
        else:
            _finish(s, batch)
        if len(retries) == 3:
            break
    assert retries == [[("a", 0, 3)], [("b", 0, 3)], [("c", 0, 3)]]  # the whole prompt again, alone
    together = s.schedule()  # back to sharing micro-batches once the retries are through
    assert [(c.request_id, c.num_new) for c in together.chunks] == [("a", 1), ("c", 1)]


def _run_to_end(s: Scheduler, next_token) -> tuple[dict, list[int]]:
    """Drives the scheduler like the engine, with a fake model: the token after position p of request r
    is next_token(r, p), whichever step of a round computed it. Returns (outputs, steps per batch)."""
    outputs, steps = {}, []
    while s.has_unfinished:
        batches = s.schedule_all()
        assert batches
        for batch in batches:
            steps.append(batch.num_steps)
            sampled = {}
            for c in batch.chunks:
                if not c.sample:
                    continue
                # a round's step k feeds the token at position num_cached + k
                assert len(c.block_table) * s.blocks.block_size >= c.num_cached + batch.num_steps
                sampled[c.request_id] = [
                    next_token(c.request_id, c.seq_len - 1 + k) for k in range(batch.num_steps)
                ]
            for r in s.update(StepOutput(batch.batch_id, sampled))[1]:
                outputs[r.request_id] = (r.finish_reason, list(r.output_token_ids))
    return outputs, steps


def test_decode_rounds_give_the_same_tokens_as_single_steps():
    def token(rid, position):
        return 9 if (rid == "eos" and position == 6) else 20 + position

    def run(decode_steps):
        s = Scheduler(BlockManager(64, 4), 16, 40, 2, eos_token_id=9, decode_steps=decode_steps)
        s.add(Request("long", [1, 2, 3], SamplingParams(max_tokens=13)))
        s.add(Request("short", [1, 2], SamplingParams(max_tokens=3)))
        s.add(Request("eos", [1, 2, 3], SamplingParams(max_tokens=20)))  # stops inside a round
        s.add(Request("ctx", list(range(30)), SamplingParams(max_tokens=30)))  # reaches n_ctx=40
        result = _run_to_end(s, token)
        assert s.blocks.num_free == s.blocks.num_blocks
        return result

    single, single_steps = run(1)
    rounds, round_steps = run(4)
    assert rounds == single
    assert single["eos"] == ("stop", [22, 23, 24, 25, 9]) and single["ctx"][0] == "length"
    assert set(single_steps) == {1} and max(round_steps) == 4
    assert len(round_steps) < len(single_steps)


def test_a_round_waits_for_prefill_and_respects_the_shortest_request():
    s = Scheduler(BlockManager(64, 4), 4, 64, 2, decode_steps=8)
    s.add(Request("a", [1, 2], SamplingParams(max_tokens=5)))
    s.add(Request("b", list(range(9)), SamplingParams(max_tokens=20)))
    first = s.schedule_all()  # prefill: single steps
    assert first and all(b.num_steps == 1 for b in first)
    for batch in first:
        s.update(StepOutput(batch.batch_id, {c.request_id: [7] for c in batch.chunks if c.sample}))
    batches = s.schedule_all()  # b's prompt is not done: no round yet
    assert all(b.num_steps == 1 for b in batches)
    for batch in batches:
        s.update(StepOutput(batch.batch_id, {c.request_id: [7] for c in batch.chunks if c.sample}))
    while any(r.num_tokens - r.num_computed > 1 for r in s.running) or s.in_flight:
        for batch in s.schedule_all():
            s.update(StepOutput(batch.batch_id, {c.request_id: [7] for c in batch.chunks if c.sample}))
    remaining = min(r.sampling.max_tokens - len(r.output_token_ids) for r in s.running)
    batches = s.schedule_all()
    assert {b.num_steps for b in batches} == {min(8, remaining)} and remaining > 1


def test_abort_frees_blocks_now_or_when_its_batch_returns():
    s = _scheduler(num_blocks=16)
    for rid in ("running", "waiting", "in_flight"):
        s.add(Request(rid, list(range(6)), SamplingParams(max_tokens=50)))
    first = s.schedule()  # ubatch 8: "running" whole, 2 tokens of "waiting"
    _finish(s, first)
    ended = s.abort("running")
    assert ended.finish_reason == "abort" and s.blocks.table("running") == []
    assert s.abort("waiting", "stop").finish_reason == "stop"  # a stop string found by the caller
    batch = s.schedule()
    assert [c.request_id for c in batch.chunks] == ["in_flight"]
    assert s.abort("in_flight") is None  # the stages may still write its blocks: not freed yet
    assert s.blocks.table("in_flight")
    _, finished = _finish(s, batch)
    assert [r.finish_reason for r in finished] == ["abort"]
    assert s.blocks.num_free == 16 and not s.has_unfinished
    assert s.abort("in_flight") is None and s.abort("unknown") is None
