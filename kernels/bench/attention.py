"""MLA attention benchmark: `python -m mlapipe.kernels.bench attention [--quick] [--prefill]`.

Order of work: the two ceilings (copy bandwidth, bf16 matmul rate) of this GPU; correctness of both
kernels against kernels/reference.py in bf16 (NaN-poisoned pages, permuted block tables); the
decode/prefill threshold measurement; then the decode and prefill tables, printed last.
Decode baseline: torch einsum over a contiguous cache (scores, fp32 softmax, weighted sum). Prefill
baseline: torch SDPA (fastest backend that runs) on the already decompressed K (192) and V (128), so the
baseline does not pay for decompression while our time does.
"""

from __future__ import annotations

import math
import sys
from functools import partial

import torch
import torch.nn.functional as F

from mlapipe.kernels import amb, reference
from mlapipe.kernels.bench.common import copy_bandwidth_gbs, markdown_table, matmul_tflops, median_ms
from mlapipe.kernels.mla_attention import mla_attention
from mlapipe.kernels.mla_decode import _mla_decode_kernel, mla_decode
from mlapipe.kernels.mla_prefill import (
    _decompress_kernel,
    _prefill_attention_kernel,
    mla_prefill,
    prefill_plan,
)

MODELS = {"V3": 128, "V2-Lite": 16}  # heads; both have latent 512 + 64, K 128 + 64, V 128
KV_LORA_RANK, ROPE_DIM, NOPE_DIM, V_DIM, PAGE = 512, 64, 128, 128, 64
LATENT = KV_LORA_RANK + ROPE_DIM
SCALE = 192**-0.5
DTYPE = torch.bfloat16
DECODE_HEADER = [
    "model",
    "batch",
    "context",
    "ms",
    "GB/s",
    "TFLOP/s",
    "of copy",
    "of matmul",
    "einsum ms",
    "speedup",
]
PREFILL_HEADER = [
    "model",
    "new tokens",
    "amb MiB",
    "steps",
    "ms (plan made in the call)",
    "ms (plan given)",
    "ms in a CUDA graph (as the engine)",
    "TFLOP/s",
    "of matmul",
    "SDPA ms",
    "SDPA ms in a graph",
    "SDPA/ours (graphs)",
]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def paged_batch(pool: torch.Tensor, seq_lens: list[int], generator: torch.Generator):
    """Block table over random pages of `pool` (num_blocks, PAGE, LATENT): every sequence gets its own."""
    blocks = [math.ceil(n / PAGE) for n in seq_lens]
    order = torch.randperm(pool.shape[0], generator=generator, device="cpu")[: sum(blocks)]
    table = torch.full((len(seq_lens), max(blocks)), 1 << 30, dtype=torch.int32)
    taken = 0
    for s, count in enumerate(blocks):
        table[s, :count] = order[taken : taken + count].to(torch.int32)
        taken += count
    return table.cuda(), torch.tensor(seq_lens, dtype=torch.int32, device="cuda")


def query_starts(q_lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32).cuda()


def poisoned_batch(seq_lens: list[int], generator: torch.Generator):
    """Random latent rows in random pages; every slot no sequence uses is NaN, so a stray read shows."""
    pool = torch.full(
        (sum(math.ceil(n / PAGE) for n in seq_lens) + 7, PAGE, LATENT), float("nan"), dtype=DTYPE
    )
    pool = pool.cuda()
    table, lens = paged_batch(pool, seq_lens, generator)
    for s, n in enumerate(seq_lens):
        for k in range(math.ceil(n / PAGE)):
            used = min(PAGE, n - k * PAGE)
            pool[table[s, k], :used] = torch.randn(used, LATENT, device="cuda", dtype=DTYPE)
    return pool, table, lens


def check_correctness(generator: torch.Generator) -> list[list[object]]:
    """bf16 kernels vs the fp32 reference on small batches with odd lengths and poisoned unused slots."""
    rows = []
    for model, heads in MODELS.items():
        q_lens = [1, 1, 0, 9]
        pool, table, lens = poisoned_batch([1500, 63, 10, 3000], generator)
        q = torch.randn(sum(q_lens), heads, LATENT, device="cuda", dtype=DTYPE)
        args = (q, pool, table, lens, query_starts(q_lens), SCALE, KV_LORA_RANK)
        ref, ref_lse = reference.mla_decode(*args)
        for splits in (None, 1, 5):
            out, lse = mla_decode(*args, num_kv_splits=splits)
            err, lse_err = relative_error(out, ref), (lse - ref_lse).abs().max().item()
            ok = err < 1e-2 and lse_err < 2e-2 and not out.isnan().any()
            rows.append(
                [f"decode {model} splits={splits}", f"{err:.2e}", f"{lse_err:.2e}", "ok" if ok else "FAIL"]
            )

        q_lens = [700, 0, 1]
        pool, table, lens = poisoned_batch([1500, 63, 3000], generator)
        q = torch.randn(sum(q_lens), heads, NOPE_DIM + ROPE_DIM, device="cuda", dtype=DTYPE)
        w_uk = (torch.randn(heads, NOPE_DIM, KV_LORA_RANK, device="cuda") / 512**0.5).to(DTYPE)
        w_uv = (torch.randn(heads, V_DIM, KV_LORA_RANK, device="cuda") / 512**0.5).to(DTYPE)
        args = (q, pool, table, lens, query_starts(q_lens), w_uk, w_uv, SCALE)
        ref, ref_lse = reference.mla_prefill(*args)
        whole, whole_lse = mla_prefill(*args)
        stepped, stepped_lse = mla_prefill(*args, head_steps=amb.split_heads(heads, 3))
        err, lse_err = relative_error(whole, ref), (whole_lse - ref_lse).abs().max().item()
        same = torch.equal(stepped, whole) and torch.equal(stepped_lse, whole_lse)
        ok = err < 1e-2 and lse_err < 2e-2 and same and not whole.isnan().any()
        name = f"prefill {model} (3 head steps bit-identical: {same})"
        rows.append([name, f"{err:.2e}", f"{lse_err:.2e}", "ok" if ok else "FAIL"])
    return rows


def einsum_decode(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Baseline: q (B, H, 576), contiguous kv (B, T, 576) -> (B, H, 512)."""
    scores = torch.einsum("bhd,btd->bht", q, kv).float() * SCALE
    return torch.einsum("bht,btc->bhc", scores.softmax(-1).to(q.dtype), kv[..., :KV_LORA_RANK])


def decode_table(copy_gbs, mm_tflops, generator, quick) -> list[list[object]]:
    batches, contexts = ((1, 64), (1024, 16384)) if quick else ((1, 8, 64), (1024, 4096, 16384, 65536))
    pool_tokens = max(batches) * max(contexts)
    pool = torch.randn(pool_tokens // PAGE, PAGE, LATENT, device="cuda", dtype=DTYPE)
    rows = []
    # The largest shapes first, so the autotuner (keyed on the head count) picks for them.
    for model, heads in MODELS.items():
        for batch in sorted(batches, reverse=True):
            for context in sorted(contexts, reverse=True):
                table, lens = paged_batch(pool, [context] * batch, generator)
                starts = query_starts([1] * batch)
                q = torch.randn(batch, heads, LATENT, device="cuda", dtype=DTYPE)
                decode = partial(
                    mla_decode,
                    q,
                    pool,
                    table,
                    lens,
                    starts,
                    SCALE,
                    KV_LORA_RANK,
                    max_query_len=1,
                    max_seq_len=context,
                )
                ms = median_ms(decode, reps=20, graph=True)
                contiguous = pool.view(-1, LATENT)[: batch * context].view(batch, context, LATENT)
                base_ms = median_ms(partial(einsum_decode, q, contiguous), reps=10, graph=True)
                num_bytes = batch * context * LATENT * 2 + q.numel() * 2 + batch * heads * KV_LORA_RANK * 2
                flops = 2 * batch * heads * context * (LATENT + KV_LORA_RANK)
                gbs, tflops = num_bytes / ms / 1e6, flops / ms / 1e9
                rows.append([
                    model, batch, context, f"{ms:.3f}", f"{gbs:.0f}", f"{tflops:.0f}",
                    f"{gbs / copy_gbs:.0%}", f"{tflops / mm_tflops:.0%}",
                    f"{base_ms:.3f}", f"{base_ms / ms:.2f}x",
                ])  # fmt: skip
                print("decode", rows[-1], flush=True)
    return rows


def best_sdpa_ms(q, k, v, graph: bool = False) -> tuple[float, str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    best = (float("inf"), "none")
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                ms = median_ms(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE),
                    reps=10,
                    graph=graph,
                )
        except RuntimeError:
            continue
        best = min(best, (ms, backend.name.lower().replace("_attention", "")))
    return best


def prefill_table(mm_tflops, generator, quick) -> list[list[object]]:
    rows = []
    for model, heads in MODELS.items():
        w_uk = (torch.randn(heads, NOPE_DIM, KV_LORA_RANK, device="cuda") / 512**0.5).to(DTYPE)
        w_uv = (torch.randn(heads, V_DIM, KV_LORA_RANK, device="cuda") / 512**0.5).to(DTYPE)
        for tokens in (16384, 4096) if quick else (16384, 4096, 1024):
            pool = torch.randn(math.ceil(tokens / PAGE), PAGE, LATENT, device="cuda", dtype=DTYPE)
            table, lens = paged_batch(pool, [tokens], generator)
            starts = query_starts([tokens])
            q = torch.randn(tokens, heads, NOPE_DIM + ROPE_DIM, device="cuda", dtype=DTYPE)
            # Baseline inputs: the decompressed tensors, (1, H, T, 192) and (1, H, T, 128).
            latent = pool.view(-1, LATENT)[:tokens].float()
            k_nope = torch.einsum("lc,hnc->hln", latent[:, :KV_LORA_RANK], w_uk.float())
            k = torch.cat((k_nope, latent[None, :, KV_LORA_RANK:].expand(heads, -1, -1)), -1).to(DTYPE)[None]
            v = torch.einsum("lc,hvc->hlv", latent[:, :KV_LORA_RANK], w_uv.float()).to(DTYPE)[None]
            del latent, k_nope
            sdpa_ms, backend = best_sdpa_ms(q.transpose(0, 1)[None], k, v)
            # Engine prefill replays each micro-batch's layers from a CUDA graph (workers/prefill_graphs.py):
            # both sides timed as replays too, so neither pays host launch costs
            sdpa_graph_ms, graph_backend = best_sdpa_ms(q.transpose(0, 1)[None], k, v, graph=True)
            flops = 2 * heads * tokens * (tokens + 1) / 2 * (NOPE_DIM + ROPE_DIM + V_DIM)
            # The engine builds the plan once per micro-batch and passes it to every layer's call.
            plan = prefill_plan(table, lens.tolist(), starts.tolist(), pool.shape[1])
            for budget in (0, 256):
                steps = amb.plan_prefill_head_steps(heads, tokens, NOPE_DIM, V_DIM, 2, budget)
                prefill = partial(
                    mla_prefill, q, pool, table, lens, starts, w_uk, w_uv, SCALE, head_steps=steps
                )
                ms = median_ms(prefill, reps=10)
                planned_ms = median_ms(partial(prefill, plan=plan), reps=10)
                graph_ms = median_ms(partial(prefill, plan=plan), reps=10, graph=True)
                tflops = flops / graph_ms / 1e9
                rows.append([
                    model, tokens, budget or "unlimited", len(steps), f"{ms:.3f}", f"{planned_ms:.3f}",
                    f"{graph_ms:.3f}", f"{tflops:.0f}", f"{tflops / mm_tflops:.0%}", f"{sdpa_ms:.3f} ({backend})",
                    f"{sdpa_graph_ms:.3f} ({graph_backend})", f"{sdpa_graph_ms / graph_ms:.2f}x",
                ])  # fmt: skip
                print("prefill", rows[-1], flush=True)
            del k, v
    return rows


def threshold_table(generator) -> list[list[object]]:
    """Decode path vs prefill path for 8 sequences with 4k cached tokens each and n new tokens."""
    rows = []
    for model, heads in MODELS.items():
        rows += [[model, *row] for row in threshold_rows(heads, generator)]
    return rows


def threshold_rows(heads: int, generator: torch.Generator) -> list[list[object]]:
    batch, prefix = 8, 4096
    w_uk = (torch.randn(heads, NOPE_DIM, KV_LORA_RANK, device="cuda") / 512**0.5).to(DTYPE)
    w_uv = (torch.randn(heads, V_DIM, KV_LORA_RANK, device="cuda") / 512**0.5).to(DTYPE)
    rows = []
    for new in (16, 32, 64, 128, 256, 512):
        pool = torch.randn(batch * math.ceil((prefix + new) / PAGE), PAGE, LATENT, device="cuda", dtype=DTYPE)
        table, lens = paged_batch(pool, [prefix + new] * batch, generator)
        starts = query_starts([new] * batch)
        q = torch.randn(batch * new, heads, NOPE_DIM + ROPE_DIM, device="cuda", dtype=DTYPE)
        args = (q, pool, table, lens, starts, w_uk, w_uv, SCALE)
        decode_ms = median_ms(partial(mla_attention, *args, threshold=1 << 30), reps=10)
        prefill_ms = median_ms(partial(mla_attention, *args, threshold=1), reps=10)
        rows.append(
            [new, f"{decode_ms:.3f}", f"{prefill_ms:.3f}", "decode" if decode_ms < prefill_ms else "prefill"]
        )
        print("threshold", rows[-1], flush=True)
    return rows


def chosen_configs() -> list[str]:
    lines = []
    for name, kernel in (
        ("decode", _mla_decode_kernel),
        ("decompress", _decompress_kernel),
        ("prefill attention", _prefill_attention_kernel),
    ):
        for key, config in kernel.cache.items():
            lines.append(f"{name} {key}: {config}")
    return lines


def main(argv: list[str]) -> None:
    if not torch.cuda.is_available():
        sys.exit("the attention benchmark needs a CUDA GPU")
    quick = "--quick" in argv
    prefill_only = "--prefill" in argv  # correctness, then the prefill table only
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}", flush=True)
    copy_gbs, mm_tflops = copy_bandwidth_gbs(), matmul_tflops()
    print(f"ceilings: copy {copy_gbs:.0f} GB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s", flush=True)

    checks = check_correctness(generator)
    print(markdown_table(["check (bf16 vs fp32 reference)", "rel. error", "max lse error", ""], checks))
    if any(row[-1] != "ok" for row in checks):
        sys.exit("correctness check failed; no timings")
    threshold = [] if prefill_only else threshold_table(generator)
    decode = [] if prefill_only else decode_table(copy_gbs, mm_tflops, generator, quick)
    prefill = prefill_table(mm_tflops, generator, quick)
    print("\n".join(chosen_configs()))

    print(f"\n## {props.name}: copy {copy_gbs:.0f} GB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s\n")
    if not prefill_only:
        print(
            "decode vs prefill path, 8 sequences x 4096 cached + n new tokens (ms, with W_UK/W_UV absorption)"
        )
        print(markdown_table(["model", "new tokens", "decode ms", "prefill ms", "faster"], threshold))
        print("\nabsorbed decode (one new token per sequence)")
        print(markdown_table(DECODE_HEADER, decode))
    print("\ndecompressed prefill (one sequence, causal, no prefix)")
    print(markdown_table(PREFILL_HEADER, prefill))
