"""DeepSeek layer math: decoder layer (MLA attention + dense MLP or MoE), and a shard of layers.

A shard is what one pipeline stage owns: a range of layers, plus the embedding on the first stage and
the final norm and output projection on the last. `forward` returns hidden states; `compute_logits`
is separate so that only the last stage computes logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlapipe.kernels import reference
from mlapipe.kernels.quant import planes
from mlapipe.kernels.quant.tensor import QuantTensor
from mlapipe.runtime.config import ModelConfig
from mlapipe.workers import ops, stacking
from mlapipe.workers.attention import AttentionMetadata, MLAAttention

# Batches up to this many tokens (decode steps, short chunks) run the MoE block's launch-bound form; larger
# ones (prefill chunks) its matmul-rate form. At one token the fused form saves ~20 us a layer of small
# launches (workers/NOTES.md, v6); at 2048 tokens the grouped kernel runs at ~42% of the matmul rate
# (kernels/NOTES-moe.md), below cuBLAS's dense GEMMs, and the fma router re-reads its weights per 16 tokens.
FUSED_SHARED_MAX_TOKENS = 128


class MoEBlock:
    """Router -> routed experts (fused gate|up, SiLU*up, down, weighted sum) -> plus shared experts.

    The shared experts' MLP of width n*I is n experts of width I summed (its down projection splits by
    columns). Decode-sized batches run them as experts E..E+n-1 that every token takes with weight 1, in
    the routed experts' launch, with the router's logits from a fixed-order kernel: few launches, and a
    token's bits do not depend on its batch. Prefill-sized batches run them as one dense MLP (cuBLAS,
    ~2x the grouped kernel's matmul rate) over the same stacked weights, and the router through cuBLAS.

    Quantized experts (QuantTensors) stack the same way when the shared experts have the routed ones'
    types and their down projection splits at block boundaries; otherwise (a Q2_K-class mix keeps shared
    experts in Q6_K) the shared experts run as their own quantized MLP first, and the routed launch's last
    kernel adds its output (its split partials at decode sizes: kernels/partials.py).
    """

    def __init__(self, cfg: ModelConfig, weights: dict):
        self.cfg = cfg
        self.router = weights["moe.router"]  # (E, hidden), kept fp32: routing decides discrete choices
        self.router_bias = weights.get("moe.router_bias")  # (E,) V3 only
        gate, up, down = weights["moe.w_gate"], weights["moe.w_up"], weights["moe.w_down"]
        E, inter, _ = gate.shape
        routed_gate_up = stacking.gate_up_per_expert(gate, up)
        if routed_gate_up is None:
            raise ValueError(
                "routed gate and up projections must share one type (weight_storage keeps both dense)"
            )
        shared_gate = weights.get("shared.w_gate")  # (n*I, hidden)
        n = 0 if shared_gate is None else shared_gate.shape[0] // inter
        self.num_experts, self.num_shared, self.inter = E, n, inter
        self.w_gate_up, self.w_down = routed_gate_up, down
        self.shared_in_stack = False
        self.shared_mlp = None  # (gate|up or (gate, up), down) when the shared experts run on their own
        if n:
            shared_up, shared_down = weights["shared.w_up"], weights["shared.w_down"]
            as_experts = stacking.gate_up_per_expert(
                stacking.rows_as_experts(shared_gate, n), stacking.rows_as_experts(shared_up, n)
            )
            down_experts = stacking.columns_as_experts(shared_down, n)
            gate_up = None if as_experts is None else stacking.cat_experts([routed_gate_up, as_experts])
            down_all = None if down_experts is None else stacking.cat_experts([down, down_experts])
            if gate_up is not None and down_all is not None:
                self.w_gate_up, self.w_down, self.shared_in_stack = gate_up, down_all, True
            else:
                self.shared_mlp = SwiGLU(shared_gate, shared_up, shared_down)
        # Q8_0 stacks as planes on a GPU (kernels/quant/planes.py), once every stack is built
        self.w_gate_up, self.w_down = planes.for_gemm(self.w_gate_up), planes.for_gemm(self.w_down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, E = self.cfg, self.num_experts
        fused = x.shape[0] <= FUSED_SHARED_MAX_TOKENS
        # the prefill form takes the torch path (cuBLAS) on every device
        router_logits = (
            ops.router_logits(x, self.router) if fused else reference.router_logits(x, self.router)
        )
        shared_in_launch = self.num_shared if fused and self.shared_in_stack else 0
        experts = E + shared_in_launch
        w_gate_up, w_down = self.w_gate_up[:experts], self.w_down[:experts]
        # the routing and the experts' row order for the grouped GEMMs: one kernel at decode sizes
        weights, ids, layout = ops.moe_route_and_align(
            router_logits,
            self.router_bias,
            cfg.num_experts_per_token,
            cfg.gating,
            cfg.num_expert_groups,
            cfg.num_expert_groups_used,
            cfg.expert_weights_norm,
            cfg.expert_weights_scale,
            shared_in_launch,
            w_gate_up,
            w_down,
        )
        if self.shared_mlp is not None:  # added by the routed launch's last kernel (its partials at decode)
            shared = self.shared_mlp.forward(x, unsummed=True)
            return ops.fused_moe(x, w_gate_up, w_down, weights, ids, layout, plus=shared)
        out = ops.fused_moe(x, w_gate_up, w_down, weights, ids, layout)
        if self.num_shared and not shared_in_launch:
            out = self._add_shared_dense(x, out)
        return out

    def _add_shared_dense(self, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """routed + the shared experts, as one MLP of width n*I over views of the stacked weights."""
        E, n, T, inter = self.num_experts, self.num_shared, x.shape[0], self.inter
        if isinstance(self.w_gate_up, QuantTensor):  # n (1 or 2) quantized linears per projection
            out = routed
            for j in range(E, E + n):
                gate_up = ops.linear(x, self.w_gate_up[j])
                out = out + ops.linear(ops.silu_mul(gate_up.view(T, 2, inter)), self.w_down[j])
            return out
        gate_up = (x @ self.w_gate_up[E:].reshape(n * 2 * inter, -1).t()).view(T, n, 2, inter)
        act = ops.silu_mul(gate_up)  # (T, n, I)
        # one GEMM per shared expert accumulated onto the routed sum: an einsum over (n, I) would first
        # copy the (n, H, I) down weights into (H, n * I) order on every call (~20 us a layer at 2048
        # tokens), and a separate add would read and write the sum once more
        out = routed
        for j in range(n):
            out = torch.addmm(out, act[:, j], self.w_down[E + j].t())
        return out


class SwiGLU:
    """down(silu(gate x) * up x) with gate|up stacked into one linear where they share a type; for the
    leading dense layers and for shared experts that cannot join the routed launch."""

    def __init__(self, gate, up, down):
        self.inter = gate.shape[0]
        self.gate_up = planes.for_gemm(stacking.cat_rows([gate, up]))
        self.gate, self.up = (None, None) if self.gate_up is not None else map(planes.for_gemm, (gate, up))
        self.down = planes.for_gemm(down)
        self.plain = all(isinstance(w, torch.Tensor) for w in (gate, up, down))
        if self.plain:  # keep today's three matmuls (and their bits) for plain weights
            self.gate, self.up, self.gate_up = gate, up, None

    def forward(self, h: torch.Tensor, unsummed: bool = False) -> torch.Tensor:
        """unsummed: the down projection may return its split partials (ops.linear) for a caller that
        sums them itself. The gate|up projection's partials always go to the SiLU*up kernel, which sums them."""
        if self.plain:
            return reference.dense_mlp(h, self.gate, self.up, self.down)
        if self.gate_up is not None:  # rows [0, I) gate, [I, 2I) up: one SiLU*up kernel over the pairs
            gate_up = ops.linear(h, self.gate_up, unsummed=True)
            partials_dtype = h.dtype if gate_up.dim() == 3 else None
            act = ops.silu_mul(gate_up.unflatten(-1, (2, self.inter)), partials_dtype)
        else:
            act = F.silu(ops.linear(h, self.gate)) * ops.linear(h, self.up)
        return ops.linear(act, self.down, unsummed=unsummed)


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, index: int, weights: dict, amb_mib: float):
        self.cfg = cfg
        self.index = index
        self.attn_norm = weights["attn_norm"]
        self.ffn_norm = weights["ffn_norm"]
        self.attention = MLAAttention(cfg, weights, amb_mib)
        if cfg.is_moe_layer(index):
            self.moe: MoEBlock | None = MoEBlock(cfg, weights)
        else:
            self.moe = None
            self.mlp = SwiGLU(*(weights[f"mlp.{n}"] for n in ("w_gate", "w_up", "w_down")))

    def forward(
        self, x: torch.Tensor, delta: torch.Tensor | None, meta: AttentionMetadata, kv_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream; delta: the previous layer's FFN output not yet added to it (None on a
        shard's first layer). Returns the stream after attention and this layer's FFN output: each residual
        add runs in the kernel of the norm that reads its sum."""
        eps = self.cfg.rms_norm_eps
        if delta is None:
            h = ops.rms_norm(x, self.attn_norm, eps)
        else:
            x, h = ops.add_rms_norm(x, delta, self.attn_norm, eps)
        x, h = ops.add_rms_norm(x, self.attention.forward(h, meta, kv_cache), self.ffn_norm, eps)
        return x, (self.moe if self.moe is not None else self.mlp).forward(h)


class ModelShard:
    """Layers [first_layer, end_layer) of the model, with the embedding and/or the head if it has them."""

    def __init__(
        self,
        cfg: ModelConfig,
        first_layer: int,
        end_layer: int,
        weights: dict,
        amb_mib: float = 0.0,
        dtype: torch.dtype = torch.float32,  # activations (what a quantized embedding decodes to)
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.first_layer, self.end_layer = first_layer, end_layer
        self.embed = weights.get("embed")
        self.norm = weights.get("norm")
        self.head = planes.for_gemm(weights.get("head"))
        self.layers = []
        for i in range(first_layer, end_layer):
            # Taken out of `weights`, so a layer's loaded tensors are freed once the layer has built its
            # fused ones (stacked experts, stacked projections): one layer's worth of extra memory at most.
            prefix = f"layers.{i}."
            own = {k[len(prefix) :]: weights.pop(k) for k in [k for k in weights if k.startswith(prefix)]}
            self.layers.append(DecoderLayer(cfg, i, own, amb_mib))

    @property
    def is_first(self) -> bool:
        return self.embed is not None

    @property
    def is_last(self) -> bool:
        return self.head is not None

    def set_amb(self, amb_mib: float) -> None:
        for layer in self.layers:
            layer.attention.amb_mib = amb_mib

    def forward(
        self,
        inputs: torch.Tensor,  # (T,) token ids on the first stage, else (T, hidden) from the previous stage
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,  # (num_layers_here, num_blocks, block_size, C + R)
    ) -> torch.Tensor:
        x = ops.embedding(inputs, self.embed, self.dtype) if self.is_first else inputs
        delta = None
        for local, layer in enumerate(self.layers):
            x, delta = layer.forward(x, delta, meta, kv_cache[local])
        return x if delta is None else x + delta

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(T, hidden) -> (T, vocab) fp32."""
        return ops.linear(ops.rms_norm(hidden, self.norm, self.cfg.rms_norm_eps), self.head).float()
