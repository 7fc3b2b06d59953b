"""Triton MLA kernels (absorbed decode, decompressed prefill, path choice) against kernels/reference.py.

Without a GPU the kernels run in Triton's interpreter (fp16/fp32 only: bf16 dots are broken there) at
small widths; on a GPU the same tests run compiled, plus bf16 tests at the real DeepSeek widths.
Every batch is built FlashMLA-style: random pages in a random order, unused cache slots full of NaN and
unused block-table entries far out of range, so a stray read shows up as NaN or a crash.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("MLAPIPE_AUTOTUNE", "0")

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

from mlapipe.kernels import reference  # noqa: E402
from mlapipe.kernels.mla_attention import mla_attention, split_batch_by_path, uses_decode  # noqa: E402
from mlapipe.kernels.mla_decode import choose_num_splits, mla_decode  # noqa: E402
from mlapipe.kernels.mla_prefill import mla_prefill, prefill_plan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_OF_RANGE_BLOCK = 1 << 30  # what an unused block-table entry holds: reading through it must crash

# fp32 dots: exact fp32 in the interpreter, TF32 (10-bit mantissa) when compiled for a GPU
FP32_TOL = 2e-4 if DEVICE == "cpu" else 1e-2
# (dtype, atol, rtol) for outputs; lse gets the same atol
TOLERANCES = {torch.float32: (FP32_TOL, FP32_TOL), torch.float16: (2e-2, 2e-2), torch.bfloat16: (3e-2, 3e-2)}


@dataclass
class Batch:
    kv_cache: torch.Tensor  # (num_blocks, page, C + R)
    block_table: torch.Tensor  # (S, max_blocks) int32
    seq_lens: torch.Tensor  # (S,) int32
    query_start_loc: torch.Tensor  # (S+1,) int32
    num_tokens: int


def make_batch(q_lens, seq_lens, page, width, dtype, spare_blocks=3) -> Batch:
    """Random latent pages in a random order; NaN wherever no sequence has a token."""
    assert all(q <= s for q, s in zip(q_lens, seq_lens))
    blocks_per_seq = [(n + page - 1) // page for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    kv_cache = torch.full((num_blocks, page, width), float("nan"), dtype=dtype)
    order = torch.randperm(num_blocks).tolist()
    max_blocks = max(blocks_per_seq) + 2  # trailing unused entries in every row
    block_table = torch.full((len(seq_lens), max_blocks), OUT_OF_RANGE_BLOCK, dtype=torch.int32)
    for s, (length, count) in enumerate(zip(seq_lens, blocks_per_seq)):
        ids = [order.pop() for _ in range(count)]
        block_table[s, :count] = torch.tensor(ids, dtype=torch.int32)
        for k, block in enumerate(ids):
            used = min(page, length - k * page)
            kv_cache[block, :used] = torch.randn(used, width).to(dtype)
    query_start_loc = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    return Batch(
        kv_cache.to(DEVICE),
        block_table.to(DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        query_start_loc.to(DEVICE),
        int(sum(q_lens)),
    )


def assert_matches(out, lse, ref_out, ref_lse, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------------
# absorbed decode

# (q_lens, seq_lens): each a reason
DECODE_BATCHES = [
    ([1, 1, 1], [37, 5, 16]),  # plain decode: odd length, shorter than a page, exactly one page
    ([1, 0, 4, 16], [70, 9, 23, 40]),  # a sequence with no new tokens; causal chunks of 4 and 16
    ([3], [3]),  # a chunk with no cached prefix: the first row sees one key
]


@pytest.mark.parametrize("heads", [1, 16, 128])
@pytest.mark.parametrize("q_lens,seq_lens", DECODE_BATCHES)
def test_decode_matches_reference(heads, q_lens, seq_lens):
    dtype, kv_lora_rank, rope = torch.float32, 32, 16
    batch = make_batch(q_lens, seq_lens, page=16, width=kv_lora_rank + rope, dtype=dtype)
    q = torch.randn(batch.num_tokens, heads, kv_lora_rank + rope, dtype=dtype, device=DEVICE)
    args = (q, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, 0.3, kv_lora_rank)
    assert_matches(*mla_decode(*args), *reference.mla_decode(*args), dtype)


@pytest.mark.parametrize("num_kv_splits", [1, 2, 7])  # 7: more splits than tiles, some splits empty
@pytest.mark.parametrize("page", [1, 16, 64])  # 1: every key on its own page; 64: tiles inside a page
def test_decode_splits_and_pages_fp16(num_kv_splits, page):
    dtype, kv_lora_rank, rope, heads = torch.float16, 64, 16, 16
    q_lens, seq_lens = [2, 1, 0, 5], [131, 1, 12, 77]  # odd lengths, a one-token sequence
    batch = make_batch(q_lens, seq_lens, page=page, width=kv_lora_rank + rope, dtype=dtype)
    q = torch.randn(batch.num_tokens, heads, kv_lora_rank + rope, dtype=dtype, device=DEVICE)
    args = (q, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, 0.2, kv_lora_rank)
    out, lse = mla_decode(*args, num_kv_splits=num_kv_splits)
    assert_matches(out, lse, *reference.mla_decode(*args), dtype)


def test_decode_split_count_does_not_change_the_result_beyond_rounding():
    dtype, kv_lora_rank, rope, heads = torch.float32, 32, 16, 16
    batch = make_batch([1, 2], [300, 45], page=16, width=kv_lora_rank + rope, dtype=dtype)
    q = torch.randn(batch.num_tokens, heads, kv_lora_rank + rope, dtype=dtype, device=DEVICE)
    args = (q, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, 0.3, kv_lora_rank)
    whole, whole_lse = mla_decode(*args, num_kv_splits=1)
    split, split_lse = mla_decode(*args, num_kv_splits=5)
    tol = 1e-5 if DEVICE == "cpu" else FP32_TOL
    torch.testing.assert_close(split, whole, atol=tol, rtol=tol)
    torch.testing.assert_close(split_lse, whole_lse, atol=tol, rtol=tol)


def test_choose_num_splits():
    assert choose_num_splits(num_seqs=64, row_blocks=1, max_seq_len=65536, num_sms=132) == 9
    assert choose_num_splits(num_seqs=1, row_blocks=2, max_seq_len=65536, num_sms=132) == 64  # capped
    assert choose_num_splits(num_seqs=1, row_blocks=1, max_seq_len=300, num_sms=132) == 2  # >= 256 keys each
    assert choose_num_splits(num_seqs=512, row_blocks=2, max_seq_len=65536, num_sms=132) == 1


def test_decode_rejects_bad_layouts():
    batch = make_batch([1], [5], page=16, width=48, dtype=torch.float32)
    q = torch.randn(1, 4, 48, device=DEVICE)
    with pytest.raises(ValueError, match="power"):
        mla_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, 0.3, 40)
    with pytest.raises(ValueError, match="dtypes"):
        mla_decode(
            q.half(), batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, 0.3, 32
        )


# ----------------------------------------------------------------------------------------------------
# decompressed prefill

NOPE, V_DIM = 16, 64  # K head dim is NOPE + rope = 32 here, V 64: the kernel never assumes they match

PREFILL_BATCHES = [
    ([1, 37, 0, 130], [10, 37, 17, 200]),  # one token, no prefix + odd, no new tokens, prefix + 2 blocks
    ([5], [5]),  # shorter than a query block and a page
]


def prefill_inputs(heads, q_lens, seq_lens, dtype, page=16, kv_lora_rank=32, rope=16):
    batch = make_batch(q_lens, seq_lens, page=page, width=kv_lora_rank + rope, dtype=dtype)
    q = torch.randn(batch.num_tokens, heads, NOPE + rope, dtype=dtype, device=DEVICE)
    w_uk = (torch.randn(heads, NOPE, kv_lora_rank) / kv_lora_rank**0.5).to(dtype).to(DEVICE)
    w_uv = (torch.randn(heads, V_DIM, kv_lora_rank) / kv_lora_rank**0.5).to(dtype).to(DEVICE)
    return batch, (
        q,
        batch.kv_cache,
        batch.block_table,
        batch.seq_lens,
        batch.query_start_loc,
        w_uk,
        w_uv,
        0.25,
    )


@pytest.mark.parametrize("heads", [1, 16, 128])
@pytest.mark.parametrize("q_lens,seq_lens", PREFILL_BATCHES)
def test_prefill_matches_reference(heads, q_lens, seq_lens):
    dtype = torch.float32
    _, args = prefill_inputs(heads, q_lens, seq_lens, dtype)
    assert_matches(*mla_prefill(*args), *reference.mla_prefill(*args), dtype)


@pytest.mark.parametrize("page", [1, 64])
def test_prefill_fp16_pages(page):
    dtype = torch.float16
    _, args = prefill_inputs(4, [3, 70], [40, 150], dtype, page=page)
    # The kernel rounds decompressed K/V to fp16 as a GPU run would; the reference keeps fp32.
    out, lse = mla_prefill(*args)
    assert_matches(out, lse, *reference.mla_prefill(*args), dtype)
    _, kv_cache, block_table, seq_lens, query_start_loc = args[:5]
    plan = prefill_plan(block_table, seq_lens.tolist(), query_start_loc.tolist(), page)
    planned, planned_lse = mla_prefill(*args, plan=plan)  # the model's path: no host reads at launch
    assert torch.equal(planned, out) and torch.equal(planned_lse, lse)


def test_prefill_padded_plan_changes_no_real_row():
    """A CUDA graph's plan (workers/prefill_graphs.py) pads rows no sequence owns, sequence slots with no
    new tokens and latent rows no sequence reads (here NaN ones): the real rows keep their bits and the
    padding rows are zeros."""
    dtype = torch.float32
    batch, args = prefill_inputs(3, [3, 70], [40, 150], dtype)
    q, kv_cache, block_table, seq_lens, query_start_loc = args[:5]
    plan = prefill_plan(block_table, seq_lens.tolist(), query_start_loc.tolist(), kv_cache.shape[1])
    out, lse = mla_prefill(*args, plan=plan)

    pad_tokens, pad_rows, pad_seqs = 13, 40, 2
    nan_row = torch.isnan(kv_cache.reshape(-1, kv_cache.shape[-1])[:, 0]).nonzero()[0]
    latent_rows = torch.cat((plan.latent_rows, nan_row.expand(pad_rows)))
    meta = torch.cat((plan.meta, torch.zeros(4, pad_seqs, dtype=plan.meta.dtype, device=DEVICE)), dim=1)
    padded_plan = type(plan)(
        num_tokens=q.shape[0] + pad_tokens,
        num_sequences=plan.num_sequences + pad_seqs,
        max_query_len=q.shape[0] + pad_tokens,
        latent_rows=latent_rows,
        meta=meta,
        zero_unowned_rows=True,
    )
    padded_q = torch.cat((q, torch.randn(pad_tokens, *q.shape[1:], dtype=dtype, device=DEVICE)))
    padded, padded_lse = mla_prefill(padded_q, *args[1:], plan=padded_plan)
    assert torch.equal(padded[: q.shape[0]], out) and torch.equal(padded_lse[: q.shape[0]], lse)
    assert torch.equal(padded[q.shape[0] :], torch.zeros_like(padded[q.shape[0] :]))


@pytest.mark.parametrize("use_triton", [True, False])
def test_prefill_head_steps_are_bit_identical(use_triton):
    if not use_triton and DEVICE == "cuda":
        pytest.skip("the torch reference's batched GEMMs pick algorithms by head count on a GPU; it runs on CPU")
    heads = 5  # odd: the steps cannot divide it
    _, args = prefill_inputs(heads, [2, 40], [33, 90], torch.float32)
    run = mla_prefill if use_triton else reference.mla_prefill
    whole, whole_lse = run(*args, head_steps=None)
    for steps in ([(0, 3), (3, 5)], [(h, h + 1) for h in range(heads)]):
        out, lse = run(*args, head_steps=steps)
        assert torch.equal(out, whole) and torch.equal(lse, whole_lse), steps


def test_prefill_rejects_steps_that_do_not_tile_the_heads():
    _, args = prefill_inputs(4, [2], [9], torch.float32)
    with pytest.raises(ValueError, match="tile"):
        mla_prefill(*args, head_steps=[(0, 2), (3, 4)])


# ----------------------------------------------------------------------------------------------------
# path choice


def test_path_choice_by_new_tokens():
    assert uses_decode(1) and uses_decode(127) and not uses_decode(128) and not uses_decode(0)
    assert uses_decode(200, threshold=256) and not uses_decode(5, threshold=4)
    batch = make_batch([1, 0, 130, 4], [10, 3, 140, 4], page=16, width=48, dtype=torch.float32)
    decode, prefill = split_batch_by_path(batch.block_table, batch.seq_lens, batch.query_start_loc)
    assert decode.seq_ids == [0, 3] and prefill.seq_ids == [2]
    assert decode.token_ids.tolist() == [0, 131, 132, 133, 134]
    assert decode.query_start_loc.tolist() == [0, 1, 5] and decode.max_query_len == 4
    assert prefill.token_ids.tolist() == list(range(1, 131)) and prefill.num_kv_tokens == 140
    assert torch.equal(decode.block_table, batch.block_table[[0, 3]])


@pytest.mark.parametrize("threshold", [1, 8, 1 << 20])  # all prefill, mixed, all decode
def test_mixed_batch_matches_decompressed_reference(threshold):
    dtype, heads = torch.float32, 4
    batch, args = prefill_inputs(heads, [1, 0, 20, 3], [30, 4, 45, 3], dtype)
    q, kv_cache, block_table, seq_lens, query_start_loc, w_uk, w_uv, scale = args
    out = mla_attention(
        q, kv_cache, block_table, seq_lens, query_start_loc, w_uk, w_uv, scale, threshold=threshold
    )
    expected, _ = reference.mla_prefill(*args)
    torch.testing.assert_close(out, expected, atol=FP32_TOL, rtol=FP32_TOL)
    small_budget = mla_attention(*args, amb_mib=1e-3, threshold=threshold)  # one head per prefill step
    assert torch.equal(small_budget, out)


# ----------------------------------------------------------------------------------------------------
# GPU, bf16, real DeepSeek widths (576 = 512 + 64 latent, 128 + 64 / 128 heads)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128])
def test_decode_bf16_real_widths(heads):
    dtype = torch.bfloat16
    batch = make_batch([1, 1, 0, 7], [1000, 63, 10, 2500], page=64, width=576, dtype=dtype)
    q = torch.randn(batch.num_tokens, heads, 576, dtype=dtype, device=DEVICE)
    args = (q, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, 192**-0.5, 512)
    assert_matches(*mla_decode(*args), *reference.mla_decode(*args), dtype)


@pytest.mark.gpu
def test_prefill_bf16_real_widths():
    dtype, heads = torch.bfloat16, 16
    batch = make_batch([300, 0, 1], [1100, 64, 700], page=64, width=576, dtype=dtype)
    q = torch.randn(batch.num_tokens, heads, 192, dtype=dtype, device=DEVICE)
    w_uk = (torch.randn(heads, 128, 512) / 512**0.5).to(dtype).to(DEVICE)
    w_uv = (torch.randn(heads, 128, 512) / 512**0.5).to(dtype).to(DEVICE)
    args = (
        q,
        batch.kv_cache,
        batch.block_table,
        batch.seq_lens,
        batch.query_start_loc,
        w_uk,
        w_uv,
        192**-0.5,
    )
    out, lse = mla_prefill(*args)
    assert_matches(out, lse, *reference.mla_prefill(*args), dtype)
    stepped, stepped_lse = mla_prefill(*args, head_steps=[(0, 6), (6, 11), (11, 16)])
    assert torch.equal(stepped, out) and torch.equal(stepped_lse, lse)
    # the per-micro-batch plan the model passes (host lists, rows gathered once) gives the same bits
    plan = prefill_plan(batch.block_table, batch.seq_lens.tolist(), batch.query_start_loc.tolist(), 64)
    planned, planned_lse = mla_prefill(*args, plan=plan)
    assert torch.equal(planned, out) and torch.equal(planned_lse, lse)
