"""Pure-torch references for every kernel in this package.

Each function here has the same signature as its Triton launcher (`kernels/<op>.py`), so tests call
both on the same random inputs, and the CPU path of the model runs these directly. They are written
for clarity, not speed: per-sequence loops, materialized scores, fp32 math.

Shapes use these letters: T tokens in the batch, S sequences, H heads, E experts, K experts per token,
L cached tokens of one sequence, D latent width (kv_lora_rank + rope dim, 576 on real models),
C kv_lora_rank (512), R rope dim (64), N qk_nope dim (128), V v head dim (128).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# norm and rope


def sum_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A split linear's fp32 partials (n, ...) -> (...) in dtype: added in order to zero, then rounded, as
    its sum kernel does (kernels/partials.py)."""
    total = torch.zeros_like(partials[0])
    for partial in partials:
        total = total + partial
    return total.to(dtype)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, partials_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x (..., W), weight (W,): x / rms(x) * weight, computed in fp32, returned in x.dtype. With
    partials_dtype, x is (n, T, W) fp32 split partials, first summed in order and rounded to it."""
    if partials_dtype is not None:
        x = sum_partials(x, partials_dtype)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm: (x + delta, rms_norm(x + delta, weight, eps)). delta (n, T, W)
    fp32: a split linear's partial sums, added in order to zero and rounded to x.dtype first."""
    if delta.dim() == 3:
        delta = sum_partials(delta, x.dtype)
    total = x + delta
    return total, rms_norm(total, weight, eps)


def apply_rope_pairs(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotates adjacent pairs (x[2i], x[2i+1]) by angle i, as GGUF deepseek2 lays rope dims out.

    x (T, ..., R); cos, sin (T, R/2) for each token's position. With `out` (x's shape and dtype; x itself
    for in place) the result is written there and out is returned.
    """
    shape = x.shape
    pairs = x.float().reshape(shape[0], -1, shape[-1] // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).reshape(shape).to(x.dtype)
    if out is None:
        return rotated
    return out.copy_(rotated)


def write_latent_cache(
    latent: torch.Tensor,
    kv_norm: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    partials_dtype: torch.dtype | None = None,
) -> None:
    """Writes each new token's latent cache row in place: rms_norm(latent[:, :C]) * kv_norm, then the
    pairwise rope of latent[:, C:], each rounded to latent.dtype and then cast to kv_cache.dtype.

    latent (T, C + R), rows may be strided (a column slice of a wider projection); kv_norm (C,);
    cos, sin (T, R/2) fp32; kv_cache (num_blocks, block_size, C + R); slot_mapping (T,) int64 flat rows.
    With partials_dtype, latent is (n, T, C + R) fp32 split partials, first summed and rounded to it.
    """
    if partials_dtype is not None:
        latent = sum_partials(latent, partials_dtype)
    if latent.shape[0] == 0:  # apply_rope_pairs cannot reshape an empty batch
        return
    C = kv_norm.shape[0]
    c_kv = rms_norm(latent[:, :C], kv_norm, eps)
    k_pe = apply_rope_pairs(latent[:, None, C:], cos, sin)[:, 0]
    flat_cache = kv_cache.view(-1, kv_cache.shape[-1])
    flat_cache[slot_mapping] = torch.cat((c_kv, k_pe), dim=-1).to(kv_cache.dtype)


# ----------------------------------------------------------------------------------------------------
# attention: shared softmax/mask, then the two exact forms of MLA over a paged latent cache


def gather_latent(kv_cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached latent rows of one sequence: (L, D), read through its block table."""
    block_size = kv_cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = kv_cache[block_table_row[:num_blocks].long()]  # (nb, block_size, D)
    return blocks.reshape(-1, kv_cache.shape[-1])[:length]


def causal_attend(
    scores: torch.Tensor, values: torch.Tensor, query_positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax and weighted sum, shared by the naive and absorbed forms.

    scores (H, Tq, L), already multiplied by the softmax scale; values (H or 1, L, Dv);
    query_positions (Tq,): absolute position of each query; key j is visible iff j <= position.
    Returns out (H, Tq, Dv) and the log-sum-exp (H, Tq), both fp32.
    """
    key_index = torch.arange(scores.shape[-1], device=scores.device)
    hidden = key_index[None, :] > query_positions[:, None]  # (Tq, L)
    scores = scores.float().masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return probs @ values.float(), lse


def _sequence_spans(seq_lens: torch.Tensor, query_start_loc: torch.Tensor):
    """Yields (query slice, total length, position of the first new token) for each sequence."""
    for s in range(seq_lens.shape[0]):
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        total = int(seq_lens[s])
        yield s, slice(start, end), total, total - (end - start)


def absorb_query(
    q: torch.Tensor,
    w_uk: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out_dtype: torch.dtype,
    partials_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The absorbed query of mla_decode: q (T, H, N + R), w_uk (H, N, C), cos, sin (T, R/2) fp32 ->
    (T, H, C + R) in out_dtype: q_nope @ w_uk[h] in fp32, then the pairwise rope of q[..., N:], each
    rounded to q.dtype and then to out_dtype. q is not modified. With partials_dtype, q is
    (n, T, H, N + R) fp32 split partials, first summed in order and rounded to it."""
    if partials_dtype is not None:
        q = sum_partials(q, partials_dtype)
    N = w_uk.shape[1]
    if q.shape[0] == 0:  # apply_rope_pairs cannot reshape an empty batch
        return q.new_empty(0, q.shape[1], w_uk.shape[2] + q.shape[2] - N, dtype=out_dtype)
    q_latent = torch.einsum("thn,hnc->thc", q[..., :N].float(), w_uk.float()).to(q.dtype)
    return torch.cat((q_latent, apply_rope_pairs(q[..., N:], cos, sin)), dim=-1).to(out_dtype)


def absorb_and_write_latent(
    q: torch.Tensor,
    latent: torch.Tensor,
    w_uk: torch.Tensor,
    kv_norm: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    out_dtype: torch.dtype,
    q_partials_dtype: torch.dtype | None = None,
    latent_partials_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """write_latent_cache(latent, ...) then absorb_query(q, ...): a decode step's two jobs before attention."""
    write_latent_cache(latent, kv_norm, cos, sin, eps, kv_cache, slot_mapping, latent_partials_dtype)
    return absorb_query(q, w_uk, cos, sin, out_dtype, q_partials_dtype)


def mla_decode(
    q: torch.Tensor,  # (T, H, D) absorbed queries: W_UK^T q_nope (C) then roped q_pe (R)
    kv_cache: torch.Tensor,  # (num_blocks, block_size, D) latent cache, new tokens already written
    block_table: torch.Tensor,  # (S, max_blocks) int32
    seq_lens: torch.Tensor,  # (S,) int32: cached + new tokens per sequence
    query_start_loc: torch.Tensor,  # (S+1,) int32: sequence s owns q[query_start_loc[s]:query_start_loc[s+1]]
    softmax_scale: float,
    kv_lora_rank: int,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_kv_splits: int | None = None,
    w_uv: torch.Tensor | None = None,  # (H, V, C) in q.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA: MQA with K = latent row (D wide) and V = its first C values, shared by all heads.

    Returns out (T, H, C) in q.dtype and lse (T, H) fp32. Queries of a sequence are its last new tokens,
    causal among themselves. max_query_len, max_seq_len and num_kv_splits are launch hints of the Triton
    kernel (kernels/mla_decode.py); they do not change the result and are ignored here. With w_uv, out is
    (T, H, V): that q.dtype latent times w_uv[h], accumulated in fp32, rounded to q.dtype.
    """
    T, H, _ = q.shape
    out = torch.zeros(T, H, kv_lora_rank, dtype=torch.float32, device=q.device)
    lse = torch.full((T, H), float("-inf"), dtype=torch.float32, device=q.device)
    for s, rows, total, first_new in _sequence_spans(seq_lens, query_start_loc):
        if rows.stop == rows.start:
            continue
        latent = gather_latent(kv_cache, block_table[s], total).float()  # (L, D)
        positions = torch.arange(first_new, total, device=q.device)
        scores = torch.einsum("thd,ld->htl", q[rows].float(), latent) * softmax_scale
        o, l = causal_attend(scores, latent[None, :, :kv_lora_rank], positions)
        out[rows] = o.transpose(0, 1)
        lse[rows] = l.transpose(0, 1)
    if w_uv is not None:
        projected = torch.einsum("thc,hvc->thv", out.to(q.dtype).float(), w_uv.float())
        return projected.to(q.dtype), lse
    return out.to(q.dtype), lse


def mla_prefill(
    q: torch.Tensor,  # (T, H, N + R): q_nope then roped q_pe
    kv_cache: torch.Tensor,  # (num_blocks, block_size, C + R), new tokens already written
    block_table: torch.Tensor,  # (S, max_blocks) int32
    seq_lens: torch.Tensor,  # (S,) int32
    query_start_loc: torch.Tensor,  # (S+1,) int32
    w_uk: torch.Tensor,  # (H, N, C): k_nope_h = w_uk[h] @ c_kv
    w_uv: torch.Tensor,  # (H, V, C): v_h = w_uv[h] @ c_kv
    softmax_scale: float,
    head_steps: list[tuple[int, int]] | None = None,
    plan=None,  # the Triton launcher's per-micro-batch launch plan; the reference derives everything itself
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decompressed ("naive", FlashMLA-2) MLA: K_nope and V per head from the latent cache, then
    ordinary causal attention with K head dim N + R and V head dim V.

    head_steps (from kernels.amb) bounds the per-step intermediate; each head's math is the same
    whatever the steps, so the output does not depend on them. Returns out (T, H, V) in q.dtype and
    lse (T, H) fp32.
    """
    T, H, _ = q.shape
    kv_lora_rank = w_uk.shape[-1]
    nope = w_uk.shape[1]
    out = torch.zeros(T, H, w_uv.shape[1], dtype=torch.float32, device=q.device)
    lse = torch.full((T, H), float("-inf"), dtype=torch.float32, device=q.device)
    for s, rows, total, first_new in _sequence_spans(seq_lens, query_start_loc):
        if rows.stop == rows.start:
            continue
        latent = gather_latent(kv_cache, block_table[s], total).float()
        c_kv, k_pe = latent[:, :kv_lora_rank], latent[:, kv_lora_rank:]
        positions = torch.arange(first_new, total, device=q.device)
        for h0, h1 in head_steps or [(0, H)]:
            # Explicit per-head batched products (never folded into one wide GEMM, whose blocking could
            # depend on the step's head count), so the bits of a head do not depend on head_steps.
            step = h1 - h0
            c_kv_h = c_kv.expand(step, -1, -1)  # (h, L, C)
            k_nope = torch.bmm(c_kv_h, w_uk[h0:h1].float().transpose(1, 2))  # (h, L, N)
            values = torch.bmm(c_kv_h, w_uv[h0:h1].float().transpose(1, 2))  # (h, L, V)
            qh = q[rows, h0:h1].float().transpose(0, 1)  # (h, Tq, N + R)
            scores = torch.bmm(qh[..., :nope], k_nope.transpose(1, 2))
            scores = scores + torch.bmm(qh[..., nope:], k_pe.t().expand(step, -1, -1))
            o, l = causal_attend(scores * softmax_scale, values, positions)
            out[rows, h0:h1] = o.transpose(0, 1)
            lse[rows, h0:h1] = l.transpose(0, 1)
    return out.to(q.dtype), lse


# ----------------------------------------------------------------------------------------------------
# mixture of experts


def router_logits(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """x (T, hidden) any float dtype; router (E, hidden) -> (T, E) fp32 logits, x upcast to fp32, fp32
    products and sums (the Triton kernel fixes each logit's summation order; this one leaves it to torch)."""
    return x.float() @ router.float().t()


def moe_routing(
    router_logits: torch.Tensor,  # (T, E)
    bias: torch.Tensor | None,  # (E,) selection-only bias (V3 exp_probs_b), or None
    top_k: int,
    gating: str,  # "softmax" (V2) or "sigmoid" (V3)
    num_groups: int,  # expert groups; 1 = no group limit
    topk_groups: int,  # groups kept when num_groups > 1
    renormalize: bool,
    scale: float,
    num_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek router: weights (T, K + num_shared) fp32 and expert ids (T, K + num_shared) int64; the
    last num_shared slots are the shared experts, numbered E.., with weight 1.

    Groups are scored by their best expert under softmax gating (V2 group_limited_greedy) and by the
    sum of their two best biased scores under sigmoid gating (V3 noaux_tc), as the reference code does.
    """
    logits = router_logits.float()
    if gating == "softmax":
        scores = logits.softmax(dim=-1)
    elif gating == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ValueError(f"unknown gating function {gating!r}")
    choice = scores if bias is None else scores + bias.float()
    T, E = choice.shape
    if num_groups > 1:
        grouped = choice.view(T, num_groups, E // num_groups)
        if gating == "sigmoid":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        kept = group_scores.topk(topk_groups, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(E // num_groups, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    shared_ids = torch.arange(E, E + num_shared, device=ids.device).expand(T, -1)
    shared_weights = torch.ones(T, num_shared, device=weights.device)
    return torch.cat((weights * scale, shared_weights), dim=1), torch.cat((ids, shared_ids), dim=1)


def fused_moe(
    hidden: torch.Tensor,  # (T, Hd)
    w_gate_up: torch.Tensor,  # (E, 2I, Hd): rows [0, I) gate, [I, 2I) up
    w_down: torch.Tensor,  # (E, Hd, I)
    topk_weights: torch.Tensor,  # (T, K) fp32
    topk_ids: torch.Tensor,  # (T, K)
) -> torch.Tensor:
    """Routed experts: sum_k w_k * down_e(silu(gate_e x) * up_e x), slots summed in order k = 0..K-1."""
    inter = w_down.shape[-1]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    x = hidden.float()
    for k in range(topk_ids.shape[1]):
        slot = torch.zeros_like(out)
        for e in topk_ids[:, k].unique().tolist():
            rows = (topk_ids[:, k] == e).nonzero().squeeze(1)
            gate_up = x[rows] @ w_gate_up[e].float().t()
            act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            slot[rows] = (act @ w_down[e].float().t()) * topk_weights[rows, k, None].float()
        out += slot
    return out.to(hidden.dtype)


def silu_mul(x: torch.Tensor, partials_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (..., 2, I): silu(x[..., 0, :]) * x[..., 1, :] (..., I), as torch computes it. With partials_dtype,
    x is (n, ..., 2, I) fp32 split partials, first summed in order and rounded to it."""
    if partials_dtype is not None:
        x = sum_partials(x, partials_dtype)
    return F.silu(x[..., 0, :]) * x[..., 1, :]


def dense_mlp(
    hidden: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """SwiGLU MLP: down(silu(gate x) * up x). hidden (T, Hd); w_gate, w_up (I, Hd); w_down (Hd, I)."""
    return F.linear(F.silu(F.linear(hidden, w_gate)) * F.linear(hidden, w_up), w_down)


# ----------------------------------------------------------------------------------------------------
# quantized weights (kernels/quant/): decode the blocks to fp32 with the type's torch decoder, then the
# math above


def quant_linear(x: torch.Tensor, w) -> torch.Tensor:
    """x (T, K) @ decode(w: QuantTensor (N, K))^T in fp32, (T, N) in x's dtype."""
    from mlapipe.kernels.quant.dispatch import dequantize

    return (x.float() @ dequantize(w).t()).to(x.dtype)


def quant_fused_moe(
    hidden: torch.Tensor,  # (T, Hd)
    w_gate_up,  # QuantTensor (E, 2I, Hd)
    w_down,  # QuantTensor (E, Hd, I)
    topk_weights: torch.Tensor,  # (T, K) fp32
    topk_ids: torch.Tensor,  # (T, K)
    scratch_mib: float = 0,  # the kernel's bf16 scratch bound; no meaning here
) -> torch.Tensor:
    """fused_moe on the experts decoded to fp32."""
    from mlapipe.kernels.quant.dispatch import dequantize

    return fused_moe(hidden, dequantize(w_gate_up), dequantize(w_down), topk_weights, topk_ids)
