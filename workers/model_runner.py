"""One device's share of the model: its weights, its latent cache, and one micro-batch step.

The pipeline's stage actor wraps this; the in-process engine uses it directly. It turns the driver's
plain control message (MicroBatch) into tensors once per step, runs the shard's layers, and on the
last stage turns hidden states into sampled tokens (or scores, or logits when asked).
"""

from __future__ import annotations

import os
import zlib

import torch

from mlapipe.kernels.host import upload
from mlapipe.kernels.mla_attention import DEFAULT_DECODE_THRESHOLD, uses_decode
from mlapipe.kernels.norm_rope import rope_cos_sin, yarn_inv_freq
from mlapipe.kernels.quant.random_blocks import random_quant_tensor
from mlapipe.kernels.quant.tensor import QuantTensor
from mlapipe.runtime.config import ModelConfig
from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.microbatch import MicroBatch, StepOutput
from mlapipe.runtime.shapes import RandomModel, is_random_spec
from mlapipe.runtime.weight_storage import storage_forms
from mlapipe.workers.attention import AttentionMetadata, build_group
from mlapipe.workers.cuda_graphs import DecodeGraphs, GraphCapturer
from mlapipe.workers.kv_cache import allocate_latent_cache, slot_mapping
from mlapipe.workers.layers import ModelShard
from mlapipe.workers.ops import uses_reference
from mlapipe.workers.prefill_graphs import PrefillGraphs
from mlapipe.workers.sampler import sample_token

ATTENTION_MODES = ("auto", "absorbed", "naive")
MAX_GRAPH_BATCH = 256  # decode steps of up to this many sequences replay a CUDA graph


def load_shard_weights(
    model: GGUFModel | RandomModel,
    first_layer: int,
    end_layer: int,
    device,
    dtype: torch.dtype,
    dequantize: bool = False,
) -> dict:
    """Reads only this shard's tensors from the file (plus embedding / head where the shard has them),
    each in its device form (runtime/weight_storage.py): block bytes as a QuantTensor, read straight
    from the file to the device; decoded to `dtype`; or fp32. `dequantize` decodes every tensor."""
    forms = storage_forms(model.tensors, dequantize)
    names = shard_tensor_names(model, first_layer, end_layer)
    if isinstance(model, RandomModel):
        weights = {name: random_weight(model, name, forms[name], device, dtype) for name in names}
    else:
        weights = {name: read_weight(model, name, forms[name], device, dtype) for name in names}
    for layer in range(first_layer, end_layer):
        weights |= mla_up_projections(model.config, weights, f"layers.{layer}.")
    return weights


def shard_tensor_names(model, first_layer: int, end_layer: int) -> list[str]:
    """Our names of the shard's tensors, layer by layer (each layer's ffn_norm last)."""
    cfg = model.config
    names = ["embed"] if first_layer == 0 else []
    for layer in range(first_layer, end_layer):
        prefix = f"layers.{layer}."
        own = [n for n in model.tensors if n.startswith(prefix)]
        names += sorted(own, key=lambda n: n == prefix + "ffn_norm")
    if end_layer == cfg.num_layers:
        names += ["norm", "head"]
    return names


def read_weight(model: GGUFModel, name: str, form: str, device, dtype: torch.dtype):
    """One tensor from the file to the device: its block bytes (QuantTensor), or decoded there."""
    info = model.tensors[name]
    if form != "quant":
        return model.load(name, device, torch.float32 if form == "fp32" else dtype)
    return QuantTensor(model.load_blocks(name, device), int(info.qtype), tuple(info.shape))


def random_weight(model: RandomModel, name: str, form: str, device, dtype: torch.dtype):
    """A seeded random tensor made on the device (a 671B shape never exists on the host), scaled by
    1/sqrt(fan-in) so activations and routing stay realistic; quantized tensors as valid random blocks
    whose decoded values have that scale."""
    info = model.tensors[name]
    shape = info.shape
    std = 1.0 if name == "embed" else shape[-1] ** -0.5
    if form == "quant":  # seeded by name and model seed, like the generator below
        return random_quant_tensor(shape, int(info.qtype), std, name, model.seed, device)
    # one generator per tensor, seeded by its name: the same weights whatever the stage split
    generator = torch.Generator(device=device).manual_seed(model.seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.empty(shape, device=device, dtype=torch.float32 if form == "fp32" else dtype)
    if name.endswith("router_bias"):
        t.normal_(0.0, 0.01, generator=generator)
    elif len(shape) == 1:
        t.fill_(1.0)  # norm weights
    else:
        t.normal_(0.0, std, generator=generator)
    return t


def mla_up_projections(cfg: ModelConfig, weights: dict, prefix: str) -> dict:
    """attn.w_uk (H, N, C) and attn.w_uv (H, V, C), dense, from whichever MLA layout was loaded:
    attn_kv_b (H*(N+V), C); mainline's 3-D attn_k_b (H, C, N) + attn_v_b (H, V, C); or ik_llama.cpp's
    2-D attn_k_b (H*C, N) + attn_v_b (H*V, C). The loaded forms are removed."""
    H, N, V, C = cfg.num_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if prefix + "attn.wkv_b" in weights:
        kv_b = weights.pop(prefix + "attn.wkv_b").view(H, N + V, C)
        w_uk, w_uv = kv_b[:, :N], kv_b[:, N:]
    else:
        w_uk = weights.pop(prefix + "attn.wk_b").reshape(H, C, N).transpose(1, 2)
        w_uv = weights.pop(prefix + "attn.wv_b").reshape(H, V, C)
    return {prefix + "attn.w_uk": w_uk.contiguous(), prefix + "attn.w_uv": w_uv.contiguous()}


def open_model(model_path: str) -> GGUFModel | RandomModel:
    return RandomModel(model_path) if is_random_spec(model_path) else GGUFModel(model_path)


class ModelRunner:
    def __init__(
        self,
        model: GGUFModel,
        first_layer: int,
        end_layer: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        amb_mib: float = 0.0,
        attention: str = "auto",
        decode_threshold: int = DEFAULT_DECODE_THRESHOLD,
        dequantize: bool = False,  # decode every weight at load (the oracle of the quantized path)
    ):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.cfg: ModelConfig = model.config
        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.attention_mode = attention
        self.decode_threshold = decode_threshold
        weights = load_shard_weights(model, first_layer, end_layer, self.device, self.dtype, dequantize)
        self.shard = ModelShard(self.cfg, first_layer, end_layer, weights, amb_mib, self.dtype)
        cfg = self.cfg
        self.kv_cache: torch.Tensor | None = None
        self.decode_graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.block_size = 0
        self.inv_freq = yarn_inv_freq(
            cfg.qk_rope_head_dim,
            cfg.rope_freq_base,
            cfg.rope_scaling_factor,
            cfg.rope_original_context,
            cfg.yarn_beta_fast,
            cfg.yarn_beta_slow,
        ).to(self.device)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, max_seq_len: int | None = None) -> int:
        """Allocates this shard's paged latent cache; returns its size in bytes. On a GPU one extra
        block, owned by no request, takes the padding rows of CUDA-graph decode steps."""
        layers = self.shard.end_layer - self.shard.first_layer
        self.block_size = block_size
        use_graphs = self.device.type == "cuda" and os.environ.get("MLAPIPE_CUDA_GRAPHS", "1") != "0"
        self.kv_cache = allocate_latent_cache(
            layers, num_blocks + use_graphs, block_size, self.cfg.latent_dim, self.dtype, self.device
        )
        if use_graphs:
            max_blocks = -(-(max_seq_len or num_blocks * block_size) // block_size)
            capturer = GraphCapturer()  # one pool and one capture stream for both kinds of graph
            self.decode_graphs = DecodeGraphs(self, MAX_GRAPH_BATCH, max_blocks, num_blocks, capturer)
            # MLAPIPE_PREFILL_GRAPHS=0 runs prefill eagerly (benches measure the two in one run)
            if os.environ.get("MLAPIPE_PREFILL_GRAPHS", "1") != "0" and not uses_reference(self.device):
                self.prefill_graphs = PrefillGraphs(self, scratch_block=num_blocks, capturer=capturer)
        return self.kv_cache.numel() * self.kv_cache.element_size()

    def release(self) -> None:
        """Drops every tensor this runner holds (weights, latent cache, graphs and their memory pool,
        rope tables), so that they are freed once the caller's own references are gone."""
        if self.decode_graphs is not None:
            self.decode_graphs.release()
            self.decode_graphs = None
        if self.prefill_graphs is not None:
            self.prefill_graphs.release()
            self.prefill_graphs = None
        self.kv_cache = None
        self.shard = None
        self.inv_freq = None

    # per micro-batch ----------------------------------------------------------------------------
    def takes_decompressed(self, num_new: int) -> bool:
        """Whether a sequence with `num_new` new tokens takes the decompressed (prefill) attention path."""
        if self.attention_mode == "auto":
            return not uses_decode(num_new, self.decode_threshold)
        return self.attention_mode == "naive"

    def build_metadata(self, batch: MicroBatch) -> AttentionMetadata:
        chunks = batch.chunks
        positions, slots, row_starts = [], [], []
        for c in chunks:
            row_starts.append(len(positions))
            positions.extend(range(c.num_cached, c.seq_len))
            slots.extend(slot_mapping(c.block_table, c.num_cached, c.num_new, self.block_size))
        absorbed, naive = [], []
        for i, c in enumerate(chunks):
            (naive if self.takes_decompressed(c.num_new) else absorbed).append(i)
        args = (
            [c.num_new for c in chunks],
            [c.num_cached for c in chunks],
            [c.block_table for c in chunks],
            row_starts,
            self.device,
        )
        position_tensor = upload(positions, torch.int64, self.device)
        cos, sin = rope_cos_sin(position_tensor, self.inv_freq)
        return AttentionMetadata(
            positions=position_tensor,
            slot_mapping=upload(slots, torch.int64, self.device),
            cos=cos,
            sin=sin,
            absorbed=build_group(absorbed, *args),
            naive=build_group(naive, *args),
        )

    @torch.inference_mode()
    def forward(
        self, batch: MicroBatch, hidden_in: torch.Tensor | None = None, token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Runs this shard on the batch. The first stage embeds the batch's token ids, or `token_ids`
        (a device tensor: the tokens sampled at the previous step of a decode round, never seen by the
        host); later stages take the previous stage's hidden states (T, hidden)."""
        if self.decode_graphs is not None and self.decode_graphs.accepts(batch):
            return self.decode_graphs.run(batch, hidden_in, token_ids)
        if token_ids is None and self.prefill_graphs is not None and self.prefill_graphs.accepts(batch):
            return self.prefill_graphs.run(batch, hidden_in)
        meta = self.build_metadata(batch)
        if not self.shard.is_first:
            inputs = hidden_in.to(self.device, self.dtype)
        elif token_ids is not None:
            inputs = token_ids.to(self.device)
        else:
            inputs = upload([t for c in batch.chunks for t in c.token_ids], torch.int64, self.device)
        return self.shard.forward(inputs, meta, self.kv_cache)

    @torch.inference_mode()
    def sample(self, batch: MicroBatch, hidden: torch.Tensor) -> torch.Tensor:
        """Last stage: the next token of every sampling chunk, in chunk order, as a device tensor.

        Logits are computed for those rows only, in one matmul. Greedy choices stay on the device, so a
        greedy decode step never waits for the host; seeded sampling runs on the host (one sync).
        """
        return self._sample(batch, hidden)[0]

    def _sample(self, batch: MicroBatch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sample(), and the logits of the sampling rows it chose from."""
        sampling = [i for i, c in enumerate(batch.chunks) if c.sample]
        if len(sampling) == hidden.shape[0]:  # every row samples (decode): no index tensor to upload
            rows = hidden
        else:
            ends = batch.chunk_ends
            rows = hidden[upload([ends[i] - 1 for i in sampling], torch.int64, hidden.device)]
        logits = self.shard.compute_logits(rows)
        tokens = logits.argmax(dim=-1)
        chosen = [
            (row, batch.chunks[i]) for row, i in enumerate(sampling) if not batch.chunks[i].sampling.greedy
        ]
        if chosen:
            tokens = tokens.cpu()
            for row, c in chosen:
                tokens[row] = sample_token(logits[row], c.sampling, c.num_generated)
            tokens = tokens.to(hidden.device)
        return tokens, logits

    @torch.inference_mode()
    def finish(self, batch: MicroBatch, hidden: torch.Tensor) -> StepOutput:
        """Last stage: the step's sampled tokens, scores and logits, as the driver's StepOutput."""
        out = StepOutput(batch_id=batch.batch_id, sampled={})
        sampling = [c for c in batch.chunks if c.sample]
        if sampling:
            tokens, logits = self._sample(batch, hidden)
            for row, (c, token) in enumerate(zip(sampling, tokens.tolist())):
                out.sampled[c.request_id] = [token]
                if c.sampling.logprobs is not None:
                    out.logprobs[c.request_id] = [token_logprobs(logits[row], token, c.sampling.logprobs)]
        start = 0
        for c, end in zip(batch.chunks, batch.chunk_ends):
            if c.score_targets is not None or c.return_logits:
                logits = self.shard.compute_logits(hidden[start:end])
                if c.return_logits:
                    out.logits[c.request_id] = logits.cpu().numpy()
                if c.score_targets is not None:
                    out.scores[c.request_id] = score_targets(logits, c.score_targets)
            start = end
        return out


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) under one row of logits (vocab,), and the `top` most likely (token, log p)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logprobs, top) if top else (logprobs[:0], logprobs[:0])
    return float(logprobs[token]), list(zip(ids.tolist(), values.tolist()))


def free_cached_memory(device) -> None:
    """Returns freed memory to the device and the host: the caching allocator's blocks, cuBLAS's
    per-stream workspaces (allocated through it and kept for the process's life otherwise), and torch's
    pinned host blocks. Other processes (the next engine's stage actors) see the memory free after."""
    import gc

    from mlapipe.kernels.quant.tables import release_device_tables

    release_device_tables()  # module-level: shared by every runner of the process, remade on use
    gc.collect()  # reference cycles (modules, graphs) holding tensors
    if torch.device(device).type != "cuda" or not torch.cuda.is_initialized():
        return
    torch.cuda.synchronize()
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear_workspaces is not None:
        clear_workspaces()
    torch.cuda.empty_cache()
    empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
    if empty_host_cache is not None:
        empty_host_cache()


def score_targets(logits: torch.Tensor, targets: list[int]) -> list[float]:
    """log p(target_i) under row i of logits; targets of -1 (no following token) are skipped."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [float(logprobs[i, t]) for i, t in enumerate(targets) if t >= 0]
