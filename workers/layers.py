"""DeepSeek layer math: decoder layer (MLA attention + dense MLP or MoE), and a shard of layers.

A shard is what one pipeline stage owns: a range of layers, plus the embedding on the first stage and
the final norm and output projection on the last. `forward` returns hidden states; `compute_logits`
is separate so that only the last stage computes logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlapipe.kernels import reference
from mlapipe.runtime.config import ModelConfig
from mlapipe.workers import ops
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
    """

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.router = weights["moe.router"]  # (E, hidden), kept fp32: routing decides discrete choices
        self.router_bias = weights.get("moe.router_bias")  # (E,) V3 only
        gate, up, down = weights["moe.w_gate"], weights["moe.w_up"], weights["moe.w_down"]
        E, inter, hidden = gate.shape
        shared_gate = weights.get("shared.w_gate")  # (n*I, hidden)
        n = 0 if shared_gate is None else shared_gate.shape[0] // inter
        self.num_experts, self.num_shared = E, n
        self.w_gate_up = gate.new_empty(E + n, 2 * inter, hidden)  # rows [0, I) gate, [I, 2I) up
        self.w_down = down.new_empty(E + n, hidden, inter)
        self.w_gate_up[:E, :inter], self.w_gate_up[:E, inter:], self.w_down[:E] = gate, up, down
        if n:
            self.w_gate_up[E:, :inter] = shared_gate.view(n, inter, hidden)
            self.w_gate_up[E:, inter:] = weights["shared.w_up"].view(n, inter, hidden)
            self.w_down[E:] = weights["shared.w_down"].view(hidden, n, inter).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, E = self.cfg, self.num_experts
        fused = x.shape[0] <= FUSED_SHARED_MAX_TOKENS
        # the prefill form takes the torch path (cuBLAS) on every device
        router_logits = (
            ops.router_logits(x, self.router) if fused else reference.router_logits(x, self.router)
        )
        shared_in_launch = self.num_shared if fused else 0
        weights, ids = ops.moe_routing(
            router_logits,
            self.router_bias,
            cfg.num_experts_per_token,
            cfg.gating,
            cfg.num_expert_groups,
            cfg.num_expert_groups_used,
            cfg.expert_weights_norm,
            cfg.expert_weights_scale,
            shared_in_launch,
        )
        experts = E + shared_in_launch
        out = ops.fused_moe(x, self.w_gate_up[:experts], self.w_down[:experts], weights, ids)
        if self.num_shared and not fused:
            out = out + self._shared_dense(x)
        return out

    def _shared_dense(self, x: torch.Tensor) -> torch.Tensor:
        """The shared experts as one MLP of width n*I over views of the stacked weights."""
        E, n, T = self.num_experts, self.num_shared, x.shape[0]
        inter = self.w_down.shape[-1]
        gate_up = (x @ self.w_gate_up[E:].reshape(n * 2 * inter, -1).t()).view(T, n, 2, inter)
        act = F.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]  # (T, n, I)
        return torch.einsum("tni,nhi->th", act, self.w_down[E:])


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, index: int, weights: dict[str, torch.Tensor], amb_mib: float):
        self.cfg = cfg
        self.index = index
        self.attn_norm = weights["attn_norm"]
        self.ffn_norm = weights["ffn_norm"]
        self.attention = MLAAttention(cfg, weights, amb_mib)
        if cfg.is_moe_layer(index):
            self.moe: MoEBlock | None = MoEBlock(cfg, weights)
        else:
            self.moe = None
            self.mlp = [weights[f"mlp.{n}"] for n in ("w_gate", "w_up", "w_down")]

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        eps = self.cfg.rms_norm_eps
        x = x + self.attention.forward(ops.rms_norm(x, self.attn_norm, eps), meta, kv_cache)
        h = ops.rms_norm(x, self.ffn_norm, eps)
        return x + (self.moe.forward(h) if self.moe is not None else reference.dense_mlp(h, *self.mlp))


class ModelShard:
    """Layers [first_layer, end_layer) of the model, with the embedding and/or the head if it has them."""

    def __init__(
        self,
        cfg: ModelConfig,
        first_layer: int,
        end_layer: int,
        weights: dict[str, torch.Tensor],
        amb_mib: float = 0.0,
    ):
        self.cfg = cfg
        self.first_layer, self.end_layer = first_layer, end_layer
        self.embed = weights.get("embed")
        self.norm = weights.get("norm")
        self.head = weights.get("head")
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
        x = self.embed[inputs] if self.is_first else inputs
        for local, layer in enumerate(self.layers):
            x = layer.forward(x, meta, kv_cache[local])
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(T, hidden) -> (T, vocab) fp32."""
        return (ops.rms_norm(hidden, self.norm, self.cfg.rms_norm_eps) @ self.head.t()).float()
