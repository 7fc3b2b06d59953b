"""Which implementation runs each kernel: the Triton launcher on a GPU, the torch reference elsewhere.

The two have the same signatures (kernels/reference.py mirrors kernels/<op>.py), so the model code
calls these names and never branches on the device itself.

Weights may be plain tensors or QuantTensors (GGUF block bytes, kernels/quant/tensor.py): `linear`,
`embedding` and `fused_moe` take either. On a GPU a QuantTensor goes to the quantized kernels
(kernels/quant); elsewhere it is decoded by the torch reference decoder and takes the plain path, which
is exactly the computation on weights dequantized at load.
"""

from __future__ import annotations

import importlib
import os

import torch

from mlapipe.kernels import reference
from mlapipe.kernels.quant.tensor import QuantTensor

# kernel name -> module holding its Triton launcher of the same name
TRITON_MODULES = {
    "mla_decode": "mlapipe.kernels.mla_decode",
    "mla_prefill": "mlapipe.kernels.mla_prefill",
    "absorb_query": "mlapipe.kernels.mla_absorb",
    "absorb_and_write_latent": "mlapipe.kernels.mla_absorb",
    "router_logits": "mlapipe.kernels.router",
    "moe_routing": "mlapipe.kernels.moe_routing",
    "moe_route_and_align": "mlapipe.kernels.moe_route_align",
    "fused_moe": "mlapipe.kernels.fused_moe",
    "rms_norm": "mlapipe.kernels.fused_norm_rope",
    "add_rms_norm": "mlapipe.kernels.fused_norm_rope",
    "silu_mul": "mlapipe.kernels.silu_mul",
    "apply_rope_pairs": "mlapipe.kernels.fused_norm_rope",
    "write_latent_cache": "mlapipe.kernels.fused_norm_rope",
}


def uses_reference(device: torch.device) -> bool:
    """CPU tensors, or MLAPIPE_REFERENCE_KERNELS=1 (debugging on a GPU), take the torch references."""
    return device.type != "cuda" or os.environ.get("MLAPIPE_REFERENCE_KERNELS") == "1"


def _triton_impl(name: str):
    try:  # importlib caches modules, so this is a dictionary lookup after the first call
        module = importlib.import_module(TRITON_MODULES[name])
    except ImportError:
        return None
    return getattr(module, name, None)


def _pick(name: str, device: torch.device):
    if not uses_reference(device):
        impl = _triton_impl(name)
        if impl is not None:
            return impl
    return getattr(reference, name)


def mla_decode(q, kv_cache, block_table, seq_lens, query_start_loc, softmax_scale, kv_lora_rank, **hints):
    impl = _pick("mla_decode", q.device)
    return impl(q, kv_cache, block_table, seq_lens, query_start_loc, softmax_scale, kv_lora_rank, **hints)


def absorb_query(q, w_uk, cos, sin, out_dtype, partials_dtype=None):
    return _pick("absorb_query", q.device)(q, w_uk, cos, sin, out_dtype, partials_dtype)


def absorb_and_write_latent(q, latent, w_uk, kv_norm, cos, sin, eps, kv_cache, slot_mapping, out_dtype, *partials):
    impl = _pick("absorb_and_write_latent", q.device)
    return impl(q, latent, w_uk, kv_norm, cos, sin, eps, kv_cache, slot_mapping, out_dtype, *partials)


def mla_prefill(
    q, kv_cache, block_table, seq_lens, query_start_loc, w_uk, w_uv, softmax_scale, head_steps=None, plan=None
):
    impl = _pick("mla_prefill", q.device)
    return impl(
        q,
        kv_cache,
        block_table,
        seq_lens,
        query_start_loc,
        w_uk,
        w_uv,
        softmax_scale,
        head_steps=head_steps,
        plan=plan,
    )


def prefill_plan(block_table, lengths, starts, page):
    """The Triton prefill's per-micro-batch launch plan (kernels.mla_prefill.PrefillPlan), or None where
    the reference runs (it needs none)."""
    if uses_reference(block_table.device):
        return None
    from mlapipe.kernels.mla_prefill import prefill_plan as make_plan

    return make_plan(block_table, lengths, starts, page)


def router_logits(x, router):
    return _pick("router_logits", x.device)(x, router)


def moe_routing(
    router_logits, bias, top_k, gating, num_groups, topk_groups, renormalize, scale, num_shared=0
):
    impl = _pick("moe_routing", router_logits.device)
    return impl(router_logits, bias, top_k, gating, num_groups, topk_groups, renormalize, scale, num_shared)


def moe_route_and_align(
    router_logits,
    bias,
    top_k,
    gating,
    num_groups,
    topk_groups,
    renormalize,
    scale,
    num_shared,
    w_gate_up,
    w_down,
):
    """moe_routing's weights and ids, and the expert-sorted layout that fused_moe over (w_gate_up, w_down)
    reads: one kernel for all three at decode sizes. The layout is None where the torch reference runs
    (it needs none)."""
    args = (router_logits, bias, top_k, gating, num_groups, topk_groups, renormalize, scale, num_shared)
    impl = None if uses_reference(router_logits.device) else _triton_impl("moe_route_and_align")
    if impl is None:
        return (*moe_routing(*args), None)
    if isinstance(w_gate_up, QuantTensor) or isinstance(w_down, QuantTensor):
        from mlapipe.kernels.quant.fused_moe import row_tile
    else:
        from mlapipe.kernels.fused_moe import row_tile
    num_rows = router_logits.shape[0] * (top_k + num_shared)
    return impl(*args, row_tile(num_rows, w_gate_up.shape[0], router_logits.device))


def fused_moe(hidden, w_gate_up, w_down, topk_weights, topk_ids, layout=None, plus=None):
    """layout: moe_route_and_align's, or None (the Triton kernels order the rows themselves). plus: a
    (T, hidden) tensor added to the result (in hidden's dtype, as torch's add), or a split linear's fp32
    partials of one (summed and rounded first): the shared experts' MLP when it cannot join the launch."""
    if isinstance(w_gate_up, QuantTensor) or isinstance(w_down, QuantTensor):
        if not uses_reference(hidden.device):
            from mlapipe.kernels.quant.fused_moe import quant_fused_moe

            return quant_fused_moe(hidden, w_gate_up, w_down, topk_weights, topk_ids, layout=layout, plus=plus)
        # decode only the experts the batch routes to, renumbered 0..U-1
        used = topk_ids.unique()
        topk_ids = torch.searchsorted(used, topk_ids)
        w_gate_up, w_down = (dequantize(w[used], hidden.dtype) for w in (w_gate_up, w_down))
    impl = _pick("fused_moe", hidden.device)
    if layout is None:  # the torch reference takes none
        out = impl(hidden, w_gate_up, w_down, topk_weights, topk_ids)
    else:
        out = impl(hidden, w_gate_up, w_down, topk_weights, topk_ids, layout=layout)
    if plus is None:
        return out
    return out + (reference.sum_partials(plus, out.dtype) if plus.dim() == 3 else plus)


# quantized weights ------------------------------------------------------------------------------------
def dequantize(w, dtype: torch.dtype) -> torch.Tensor:
    """A QuantTensor decoded to `dtype` (Triton on a GPU, the torch reference decoder elsewhere); a plain
    tensor as it is."""
    if not isinstance(w, QuantTensor):
        return w
    if not uses_reference(w.device):
        from mlapipe.kernels.quant.dequantize import dequantize as gpu_dequantize

        return gpu_dequantize(w, dtype)
    return reference_dequantize(w).to(dtype)


def reference_dequantize(w: QuantTensor) -> torch.Tensor:
    """fp32 values of a QuantTensor by the torch reference decoders (bit-exact with gguf's numpy ones)."""
    from mlapipe.kernels.quant.reference import dequantize_rows

    return dequantize_rows(w.data, w.qtype).reshape(w.shape)


def linear(x: torch.Tensor, w, unsummed: bool = False) -> torch.Tensor:
    """x (T, K) times w (N, K) transposed -> (T, N): a matmul for a plain weight, the quantized linear
    kernel for a QuantTensor on a GPU. unsummed: the quantized kernel may return its split launch's fp32
    partials (n, T, N) instead, for a consumer that sums them itself (kernels/partials.py: one launch
    fewer); callers tell the two apart by the rank."""
    if not isinstance(w, QuantTensor):
        return x @ w.t()
    if not uses_reference(x.device):
        from mlapipe.kernels.quant.linear import quant_linear

        return quant_linear(x, w, unsummed)
    return x @ reference_dequantize(w).to(x.dtype).t()


def embedding(token_ids: torch.Tensor, table, dtype: torch.dtype) -> torch.Tensor:
    """Rows of the embedding table (T, hidden) in `dtype`; a QuantTensor table decodes only the gathered
    rows (no decoded copy of the table exists)."""
    if not isinstance(table, QuantTensor):
        return table[token_ids]
    if not uses_reference(token_ids.device):
        from mlapipe.kernels.quant.dequantize import quant_embedding

        return quant_embedding(token_ids, table, dtype)
    rows = QuantTensor(table.data[token_ids], table.qtype, (token_ids.shape[0], table.shape[-1]))
    return reference_dequantize(rows).to(dtype)


def rms_norm(x, weight, eps, partials_dtype=None):
    return _pick("rms_norm", x.device)(x, weight, eps, partials_dtype)


def silu_mul(x, partials_dtype=None):
    return _pick("silu_mul", x.device)(x, partials_dtype)


def add_rms_norm(x, delta, weight, eps):
    return _pick("add_rms_norm", x.device)(x, delta, weight, eps)


def apply_rope_pairs(x, cos, sin, out=None):
    return _pick("apply_rope_pairs", x.device)(x, cos, sin, out=out)


def write_latent_cache(latent, kv_norm, cos, sin, eps, kv_cache, slot_mapping, partials_dtype=None):
    impl = _pick("write_latent_cache", latent.device)
    return impl(latent, kv_norm, cos, sin, eps, kv_cache, slot_mapping, partials_dtype)
