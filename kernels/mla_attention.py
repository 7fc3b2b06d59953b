"""MLA attention for a mixed batch: each sequence takes the absorbed decode or the decompressed prefill.

Path rule: a sequence with fewer new tokens than `threshold` goes through the absorbed decode kernel
(MQA over the 576-wide latent: few queries, the cache read once for all heads); the others through the
decompressed prefill (K head dim 192, V 128: fewer FLOPs per (query, key) pair, which wins once there
are many queries). DEFAULT_DECODE_THRESHOLD = 128 is where the two cross on H200 (kernels/NOTES.md has
the measurement; ik_llama.cpp and vLLM switch at about the same count). Sequences with no new tokens
take neither path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlapipe.kernels import amb, reference

DEFAULT_DECODE_THRESHOLD = 128


def uses_decode(num_new_tokens: int, threshold: int = DEFAULT_DECODE_THRESHOLD) -> bool:
    return 0 < num_new_tokens < threshold


@dataclass(frozen=True)
class SubBatch:
    """The sequences of a batch that take one path, re-indexed as a batch of their own."""

    seq_ids: list[int]  # indices into the full batch's sequences
    token_ids: torch.Tensor  # (T',) int64: rows of the full batch's q / out
    block_table: torch.Tensor  # (S', max_blocks)
    seq_lens: torch.Tensor  # (S',) int32
    query_start_loc: torch.Tensor  # (S'+1,) int32, starting at 0
    max_query_len: int
    max_seq_len: int
    num_kv_tokens: int  # sum of seq_lens: what a prefill step decompresses


def _sub_batch(seq_ids, lengths, starts, block_table, device) -> SubBatch:
    q_lens = [starts[s + 1] - starts[s] for s in seq_ids]
    token_ids = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in seq_ids]).to(device)
    new_starts = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    return SubBatch(
        seq_ids=seq_ids,
        token_ids=token_ids,
        block_table=block_table[torch.tensor(seq_ids, device=block_table.device)],
        seq_lens=torch.tensor([lengths[s] for s in seq_ids], dtype=torch.int32).to(device),
        query_start_loc=new_starts.to(device),
        max_query_len=max(q_lens),
        max_seq_len=max(lengths[s] for s in seq_ids),
        num_kv_tokens=sum(lengths[s] for s in seq_ids),
    )


def split_batch_by_path(
    block_table: torch.Tensor,  # (S, max_blocks)
    seq_lens: torch.Tensor,  # (S,)
    query_start_loc: torch.Tensor,  # (S+1,)
    threshold: int = DEFAULT_DECODE_THRESHOLD,
) -> tuple[SubBatch | None, SubBatch | None]:
    """(decode sub-batch, prefill sub-batch), either None when no sequence takes that path."""
    lengths = seq_lens.tolist()
    starts = query_start_loc.tolist()
    decode_ids, prefill_ids = [], []
    for s in range(len(lengths)):
        new_tokens = starts[s + 1] - starts[s]
        if new_tokens == 0:
            continue
        (decode_ids if uses_decode(new_tokens, threshold) else prefill_ids).append(s)
    device = seq_lens.device
    return tuple(
        _sub_batch(ids, lengths, starts, block_table, device) if ids else None
        for ids in (decode_ids, prefill_ids)
    )


def mla_attention(
    q: torch.Tensor,  # (T, H, N + R): q_nope then roped q_pe
    kv_cache: torch.Tensor,  # (num_blocks, block_size, C + R), new tokens already written
    block_table: torch.Tensor,  # (S, max_blocks) int32
    seq_lens: torch.Tensor,  # (S,) int32
    query_start_loc: torch.Tensor,  # (S+1,) int32
    w_uk: torch.Tensor,  # (H, N, C)
    w_uv: torch.Tensor,  # (H, V, C)
    softmax_scale: float,
    amb_mib: float = 0,
    threshold: int = DEFAULT_DECODE_THRESHOLD,
    use_triton: bool = True,
) -> torch.Tensor:
    """Attention output (T, H, V) in q.dtype, each sequence through the path its new-token count picks.

    The decode path absorbs W_UK into the query and applies W_UV to the 512-wide result; the prefill path
    runs in amb head steps (amb_mib: this device's budget, 0 = unlimited)."""
    if use_triton:
        from mlapipe.kernels.mla_decode import mla_decode
        from mlapipe.kernels.mla_prefill import mla_prefill
    else:
        mla_decode, mla_prefill = reference.mla_decode, reference.mla_prefill
    T, H, _ = q.shape
    nope_dim, kv_lora_rank = w_uk.shape[1], w_uk.shape[2]
    out = torch.empty(T, H, w_uv.shape[1], dtype=q.dtype, device=q.device)
    decode, prefill = split_batch_by_path(block_table, seq_lens, query_start_loc, threshold)
    if decode is not None:
        q_part = q[decode.token_ids]
        q_absorbed = torch.cat(
            (torch.einsum("thn,hnc->thc", q_part[..., :nope_dim], w_uk), q_part[..., nope_dim:]), dim=-1
        )
        latent_out, _ = mla_decode(
            q_absorbed, kv_cache, decode.block_table, decode.seq_lens, decode.query_start_loc,
            softmax_scale, kv_lora_rank, max_query_len=decode.max_query_len, max_seq_len=decode.max_seq_len,
        )  # fmt: skip
        out[decode.token_ids] = torch.einsum("thc,hvc->thv", latent_out, w_uv)
    if prefill is not None:
        steps = amb.plan_prefill_head_steps(
            H, prefill.num_kv_tokens, nope_dim, w_uv.shape[1], q.element_size(), amb_mib
        )
        prefill_out, _ = mla_prefill(
            q[prefill.token_ids].contiguous(), kv_cache, prefill.block_table, prefill.seq_lens,
            prefill.query_start_loc, w_uk, w_uv, softmax_scale, head_steps=steps,
        )  # fmt: skip
        out[prefill.token_ids] = prefill_out
    return out
