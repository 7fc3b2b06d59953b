"""MLA attention of one layer over the paged latent cache, in both exact forms.

- absorbed ("decode"): W_UK folded into the query, MQA over the 576-wide latent rows, W_UV applied to
  the 512-wide result. Reads the small cache once for all heads: the choice for few new tokens.
- naive ("prefill", decompressed, FlashMLA-2): K_nope and V per head from W_UK/W_UV times the cache,
  then ordinary attention with head dims 192/128. Fewer FLOPs per (query, key) pair: the choice for
  many new tokens. Its per-step intermediate is bounded by amb head steps.

The naive form is the oracle of the absorbed one (tests compare them); both share the masked softmax
in kernels/reference.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlapipe.kernels.amb import plan_prefill_head_steps, plan_reference_head_steps
from mlapipe.kernels.host import upload
from mlapipe.kernels.quant import planes
from mlapipe.runtime.config import ModelConfig
from mlapipe.workers import ops, stacking

# W_UV inside the decode's split merge (one launch fewer a layer) for models of up to this many heads. Every
# program re-reads its head's split partials, so the cost grows with the heads: on an H200 at one token 7.1
# vs 10.5 us for merge + einsum at 16 heads (V2-Lite), 31.8 vs 12.4 us at 128 (V3: kernels/NOTES.md). A
# static property, so a token's bits never depend on its batch.
PROJECT_IN_MERGE_MAX_HEADS = 16


@dataclass
class SequenceGroup:
    """A subset of the micro-batch's sequences that takes one attention path."""

    token_rows: torch.Tensor  # (Tg,) rows of the batch's tokens that belong to these sequences
    block_table: torch.Tensor  # (Sg, max_blocks) int32
    seq_lens: torch.Tensor  # (Sg,) int32
    query_start_loc: torch.Tensor  # (Sg+1,) int32, into the group's own rows
    max_seq_len: int
    max_new_tokens: int
    total_seq_len: int  # cached + new tokens over the group's sequences
    seq_lens_host: list[int] | None = None  # the same values on the host, so launches never read the GPU
    query_starts_host: list[int] | None = None
    prefill_plan: object = None  # made by the first layer's prefill, reused by the others


@dataclass
class AttentionMetadata:
    """Per micro-batch, built once by the stage and shared by all its layers."""

    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64: flat cache row of each new token
    cos: torch.Tensor  # (T, R/2)
    sin: torch.Tensor  # (T, R/2)
    absorbed: SequenceGroup | None
    naive: SequenceGroup | None


def build_group(
    seq_indices: list[int],
    num_new: list[int],
    num_cached: list[int],
    block_tables: list[list[int]],
    row_starts: list[int],
    device: torch.device,
) -> SequenceGroup | None:
    if not seq_indices:
        return None
    rows, starts, lens = [], [0], []
    for s in seq_indices:
        rows.extend(range(row_starts[s], row_starts[s] + num_new[s]))
        starts.append(starts[-1] + num_new[s])
        lens.append(num_cached[s] + num_new[s])
    width = max(1, max(len(block_tables[s]) for s in seq_indices))
    table = [block_tables[s] + [0] * (width - len(block_tables[s])) for s in seq_indices]
    return SequenceGroup(
        token_rows=upload(rows, torch.int64, device),
        block_table=upload(table, torch.int32, device),
        seq_lens=upload(lens, torch.int32, device),
        query_start_loc=upload(starts, torch.int32, device),
        max_seq_len=max(lens),
        max_new_tokens=max(num_new[s] for s in seq_indices),
        total_seq_len=sum(lens),
        seq_lens_host=lens,
        query_starts_host=starts,
    )


def _partials_dtype(t: torch.Tensor, x: torch.Tensor, per_head: bool = False) -> torch.dtype | None:
    """x's dtype where t holds a split linear's partials (one dimension more than its rows), else None."""
    return x.dtype if t.dim() == x.dim() + 1 + per_head else None


class MLAAttention:
    def __init__(self, cfg: ModelConfig, weights: dict, amb_mib: float = 0.0):
        self.cfg = cfg
        self.amb_mib = amb_mib
        # The query projection (or q-LoRA's down projection) and the latent projection read the same
        # x: one GEMM over their stacked rows instead of two (at decode each is a launch-bound GEMV).
        # Weights of two quant types cannot stack: then they stay two linears.
        first_q = weights.get("attn.wq", weights.get("attn.wq_a"))
        self.q_rows = first_q.shape[0]
        self.w_q_latent = planes.for_gemm(stacking.cat_rows([first_q, weights["attn.wkv_a"]]))
        self.w_q_and_latent = None
        if self.w_q_latent is None:
            self.w_q_and_latent = tuple(planes.for_gemm(w) for w in (first_q, weights["attn.wkv_a"]))
        self.has_q_lora = "attn.wq_a" in weights
        self.q_norm = weights.get("attn.q_norm")
        self.wq_b = planes.for_gemm(weights.get("attn.wq_b"))
        self.kv_norm = weights["attn.kv_norm"]
        self.w_uk = weights["attn.w_uk"]  # (H, N, C)
        self.w_uv = weights["attn.w_uv"]  # (H, V, C)
        self.wo = planes.for_gemm(weights["attn.wo"])
        self.amb_steps_taken = 0  # head steps of the decompressed path, reported by stage stats

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        """x (T, hidden); kv_cache (num_blocks, block_size, C + R), written in place for the new tokens."""
        cfg = self.cfg
        T, H = x.shape[0], cfg.num_heads
        N = cfg.qk_nope_head_dim
        # A pure decode batch lets a quantized split linear hand its fp32 partials (n, T, width) straight to
        # the kernels that read q and the latent, which sum them as its sum kernel would: the same bits,
        # one launch fewer a layer (kernels/partials.py). partials_dtype() says which tensors are partials.
        pure_decode = meta.naive is None and meta.absorbed is not None
        if self.w_q_latent is not None:
            projected = ops.linear(x, self.w_q_latent, unsummed=pure_decode)
            q, latent = projected[..., : self.q_rows], projected[..., self.q_rows :]
        else:
            q, latent = (ops.linear(x, w, unsummed=pure_decode) for w in self.w_q_and_latent)
        if self.has_q_lora:
            q_a = ops.rms_norm(q, self.q_norm, cfg.rms_norm_eps, _partials_dtype(q, x))
            q = ops.linear(q_a, self.wq_b, unsummed=pure_decode)
        q = q.unflatten(-1, (H, cfg.qk_head_dim))  # (T, H, D), or its partials (n, T, H, D)

        # Every sequence takes one path, so a path that is alone owns all rows, in order: no gather, no scatter.
        # The absorbed path's query (rope, W_UK and the concatenation in one kernel) is taken from the
        # unroped q, in a mixed batch too, so a decode token's bits do not depend on its batch's other rows.
        # The new tokens' latent rows (normed c_kv, roped k_pe) go straight into their cache slots: in a pure
        # decode batch by the same launch as the absorbed query.
        if pure_decode:
            q_absorbed = ops.absorb_and_write_latent(
                q, latent, self.w_uk, self.kv_norm, meta.cos, meta.sin, cfg.rms_norm_eps, kv_cache,
                meta.slot_mapping, kv_cache.dtype, _partials_dtype(q, x, per_head=True), _partials_dtype(latent, x),
            )  # fmt: skip
            return self._output(self._attend_absorbed(q_absorbed, meta.absorbed, kv_cache, x.dtype))
        ops.write_latent_cache(
            latent, self.kv_norm, meta.cos, meta.sin, cfg.rms_norm_eps, kv_cache, meta.slot_mapping
        )
        if meta.naive is None:  # no sequences at all
            return self._output(x.new_empty(T, H, cfg.v_head_dim))
        out = None
        if meta.absorbed is not None:  # mixed: each path gathers its rows and scatters its output back
            rows = meta.absorbed.token_rows
            q_absorbed = ops.absorb_query(q[rows], self.w_uk, meta.cos[rows], meta.sin[rows], kv_cache.dtype)
            out = x.new_empty(T, H, cfg.v_head_dim)
            out[rows] = self._attend_absorbed(q_absorbed, meta.absorbed, kv_cache, x.dtype)
        # the rope part rotated in place: q is then the whole query the decompressed path takes, with no
        # concatenated copy
        ops.apply_rope_pairs(q[..., N:], meta.cos, meta.sin, out=q[..., N:])
        if out is None:  # a pure prefill batch
            return self._output(self._decompressed(q, meta.naive, kv_cache))
        rows = meta.naive.token_rows
        out[rows] = self._decompressed(q[rows], meta.naive, kv_cache)
        return self._output(out)

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        """(T, H, V) -> (T, hidden); the layer's add_rms_norm sums a split launch's partials itself."""
        return ops.linear(out.reshape(out.shape[0], -1), self.wo, unsummed=True)

    def _attend_absorbed(
        self, q_absorbed: torch.Tensor, group: SequenceGroup, kv_cache: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """MQA over the latent cache, then W_UV: (Tg, H, C + R) -> (Tg, H, V) in the activations' dtype.
        Where the cache, W_UV and the activations share a dtype, W_UV runs inside the split merge for models
        with few heads (PROJECT_IN_MERGE_MAX_HEADS)."""
        cfg = self.cfg
        few_heads = cfg.num_heads <= PROJECT_IN_MERGE_MAX_HEADS
        project = few_heads and q_absorbed.dtype == self.w_uv.dtype == dtype
        out, _ = ops.mla_decode(
            q_absorbed,
            kv_cache,
            group.block_table,
            group.seq_lens,
            group.query_start_loc,
            cfg.softmax_scale,
            cfg.kv_lora_rank,
            max_query_len=group.max_new_tokens,
            max_seq_len=group.max_seq_len,
            w_uv=self.w_uv if project else None,
        )
        return out if project else torch.einsum("thc,hvc->thv", out.to(dtype), self.w_uv)

    def _decompressed(
        self, q_full: torch.Tensor, group: SequenceGroup, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        """Decompressed MLA for the group's tokens, in amb head steps: (Tg, H, N + R) -> (Tg, H, V)."""
        steps = self._head_steps(group, q_full.device)
        self.amb_steps_taken += len(steps)
        if group.prefill_plan is None:
            group.prefill_plan = ops.prefill_plan(
                group.block_table, group.seq_lens_host, group.query_starts_host, kv_cache.shape[1]
            )
        out, _ = ops.mla_prefill(
            q_full,
            kv_cache,
            group.block_table,
            group.seq_lens,
            group.query_start_loc,
            self.w_uk,
            self.w_uv,
            self.cfg.softmax_scale,
            head_steps=steps,
            plan=group.prefill_plan,
        )
        return out

    def _head_steps(self, group: SequenceGroup, device: torch.device) -> list[tuple[int, int]]:
        """amb head steps for the path that will run: the K*Q scores of the longest sequence on the
        reference path, the decompressed K/V of all the group's sequences on the fused one."""
        cfg = self.cfg
        if ops.uses_reference(device):
            return plan_reference_head_steps(
                cfg.num_heads, group.max_seq_len, group.max_new_tokens, self.amb_mib
            )
        return plan_prefill_head_steps(
            cfg.num_heads, group.total_seq_len, cfg.qk_nope_head_dim, cfg.v_head_dim, 2, self.amb_mib
        )
