"""Fused MoE bench: `python -m mlapipe.kernels.bench moe [--tokens 1,16,...] [--models v3,v2-lite] [--no-variant]`.

Checks the Triton path against kernels.reference in bf16 first, then times, for each model and token
count, fused_moe (ordering + two grouped GEMMs + slot sum; routing excluded) against a torch baseline timed
in the same run (torch._grouped_mm where it runs, else a per-expert loop), and against the two ceilings
measured here (copy bandwidth, bf16 matmul rate). GB/s counts the bytes of the experts actually hit
(each read once: the decode floor); TFLOP/s counts 2 * T * K * 3 * H * I. The batch-variant decode tile
(MLAPIPE_MOE_BATCH_INVARIANT=0) is timed at small T to price batch invariance. Tables print last.
"""

from __future__ import annotations

import argparse
import functools
import os

import torch
import torch.nn.functional as F

from mlapipe.kernels import reference
from mlapipe.kernels.bench.common import copy_bandwidth_gbs, markdown_table, matmul_tflops, median_ms
from mlapipe.kernels.fused_moe import (
    BATCH_INVARIANT_ENV,
    MoeTiles,
    down_weighted,
    fused_moe,
    gate_up_silu,
    selected_configs,
)
from mlapipe.kernels.moe_align import moe_align
from mlapipe.kernels.moe_routing import moe_routing

MODELS = {
    # hidden, expert ffn, experts, used, gating, groups, kept groups, renormalize, scale
    "v3": dict(H=7168, I=2048, E=256, K=8, gating="sigmoid", groups=8, kept=4, renorm=True, scale=2.5),
    "v2-lite": dict(H=2048, I=1408, E=64, K=6, gating="softmax", groups=1, kept=1, renorm=False, scale=1.0),
}


def make_experts(m: dict) -> tuple[torch.Tensor, torch.Tensor]:
    gen = dict(device="cuda", dtype=torch.bfloat16)
    w_gate_up = torch.randn(m["E"], 2 * m["I"], m["H"], **gen) * m["H"] ** -0.5
    w_down = torch.randn(m["E"], m["H"], m["I"], **gen) * m["I"] ** -0.5
    return w_gate_up, w_down


def route(m: dict, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(T, m["E"], device="cuda")
    bias = torch.randn(m["E"], device="cuda") * 0.1 if m["gating"] == "sigmoid" else None
    return moe_routing(logits, bias, m["K"], m["gating"], m["groups"], m["kept"], m["renorm"], m["scale"])


def torch_baseline(w_gate_up: torch.Tensor, w_down: torch.Tensor):
    """Sort rows by expert, two torch._grouped_mm calls, scatter back and sum slots; falls back to a loop."""

    def grouped(hidden, weights, ids):
        T, K = ids.shape
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        offsets = torch.bincount(flat, minlength=w_gate_up.shape[0]).cumsum(0).to(torch.int32)
        x = hidden[order // K]
        gate_up = torch._grouped_mm(x, w_gate_up.transpose(1, 2), offs=offsets)
        inter = w_down.shape[-1]
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        down = torch._grouped_mm(act, w_down.transpose(1, 2), offs=offsets)
        down = down.float() * weights.flatten()[order, None]
        rows = torch.empty_like(down)
        rows[order] = down
        return rows.view(T, K, -1).sum(1).to(hidden.dtype)

    def loop(hidden, weights, ids):
        T, K = ids.shape
        inter = w_down.shape[-1]
        out = torch.zeros(T, hidden.shape[1], device=hidden.device, dtype=torch.float32)
        for e in ids.unique().tolist():
            token, slot = (ids == e).nonzero(as_tuple=True)
            gate_up = hidden[token] @ w_gate_up[e].t()
            act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            out.index_add_(0, token, (act @ w_down[e].t()).float() * weights[token, slot, None])
        return out.to(hidden.dtype)

    try:
        hidden = torch.randn(4, w_gate_up.shape[2], device="cuda", dtype=torch.bfloat16)
        ids = torch.zeros(4, 1, dtype=torch.int64, device="cuda")
        grouped(hidden, torch.ones(4, 1, device="cuda"), ids)
        return "torch._grouped_mm", grouped
    except Exception as error:  # older torch, or a GPU grouped_mm does not support
        print(f"torch._grouped_mm unavailable ({type(error).__name__}: {error}); baseline is a loop")
        return "per-expert loop", loop


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check_correctness(name: str, m: dict, w_gate_up, w_down, baseline) -> None:
    for T in (1, 37, 600):
        hidden = torch.randn(T, m["H"], device="cuda", dtype=torch.bfloat16)
        weights, ids = route(m, T)
        out = fused_moe(hidden, w_gate_up, w_down, weights, ids)
        ref = reference.fused_moe(hidden, w_gate_up, w_down, weights, ids)
        err, err_base = relative_error(out, ref), relative_error(baseline(hidden, weights, ids), ref)
        print(f"check {name} T={T}: rel err vs reference {err:.2e} (torch baseline {err_base:.2e})")
        assert err < 1e-2, f"{name} T={T}: relative error {err}"
        again = fused_moe(hidden, w_gate_up, w_down, weights, ids)
        assert torch.equal(out, again), f"{name} T={T}: two runs differ"


def bench_model(name: str, args, copy_gbs: float, mm_tflops: float) -> dict[str, list]:
    """Times one model at every T; returns its rows of the three tables and the baseline's name."""
    m = MODELS[name]
    w_gate_up, w_down = make_experts(m)
    baseline_name, baseline = torch_baseline(w_gate_up, w_down)
    check_correctness(name, m, w_gate_up, w_down, baseline)
    expert_bytes = 3 * m["H"] * m["I"] * 2
    shared = (w_gate_up[0, : m["I"]], w_gate_up[0, m["I"] :], w_down[0])  # one expert's shape
    tables = {"main": [], "variant": [], "shared": [], "baseline": baseline_name}
    for T in [int(t) for t in args.tokens.split(",")]:
        hidden = torch.randn(T, m["H"], device="cuda", dtype=torch.bfloat16)
        weights, ids = route(m, T)
        hit = ids.unique().numel()
        run = functools.partial(fused_moe, hidden, w_gate_up, w_down, weights, ids)
        ms = median_ms(run)
        graph_ms = median_ms(run, graph=True)
        base_ms = median_ms(functools.partial(baseline, hidden, weights, ids))
        gbs = hit * expert_bytes / ms / 1e6
        tflops = 2 * T * m["K"] * 3 * m["H"] * m["I"] / ms / 1e9
        tables["main"].append(
            [name, T, hit, f"{ms:.3f}", f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}%", f"{tflops:.0f}",
             f"{100 * tflops / mm_tflops:.0f}%", f"{base_ms:.3f}", f"{base_ms / ms:.2f}", f"{graph_ms:.3f}",
             f"{100 * hit * expert_bytes / graph_ms / 1e6 / copy_gbs:.0f}%",
             f"{100 * 2 * T * m['K'] * 3 * m['H'] * m['I'] / graph_ms / 1e9 / mm_tflops:.0f}%"]
        )  # fmt: skip
        print(tables["main"][-1], flush=True)
        shared_ms = median_ms(functools.partial(reference.dense_mlp, hidden, *shared))
        tables["shared"].append([name, T, f"{shared_ms:.3f}", f"{shared_ms / ms:.2f}"])
        if not args.no_variant and str(T) in args.variant_tokens.split(","):
            invariant_out = run()
            os.environ[BATCH_INVARIANT_ENV] = "0"
            try:
                same = torch.equal(run(), invariant_out)
                variant_ms = median_ms(run)
            finally:
                os.environ.pop(BATCH_INVARIANT_ENV)
            cost = f"{ms / variant_ms - 1:+.1%}"
            tables["variant"].append([name, T, f"{ms:.3f}", f"{variant_ms:.3f}", cost, same])
    return tables


# (block_m, block_n, block_k, warps, stages) tried by --sweep, each GEMM timed alone
SWEEP_TILES = [
    (64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 8, 4), (64, 256, 64, 8, 3),
    (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 128, 8, 3),
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 128, 8, 3),
]  # fmt: skip


def sweep(args, mm_tflops: float) -> list[list]:
    """Each GEMM alone under each pinned tile, at prefill sizes: which row tile and shape win."""
    rows = []
    for name in args.models.split(","):
        m = MODELS[name]
        w_gate_up, w_down = make_experts(m)
        for T in [int(t) for t in args.sweep_tokens.split(",")]:
            hidden = torch.randn(T, m["H"], device="cuda", dtype=torch.bfloat16)
            weights, ids = route(m, T)
            gemm_flop = 2 * T * m["K"] * m["H"] * m["I"]  # GEMM 1 does twice this, GEMM 2 once
            for block_m in (64, 128):
                layout = moe_align(ids, m["E"], block_m)
                padded = int((layout.tile_expert >= 0).sum()) * block_m
                for tile in (t for t in SWEEP_TILES if t[0] == block_m):
                    tiles = MoeTiles(*tile)
                    try:
                        act = gate_up_silu(hidden, w_gate_up, layout, m["K"], tiles)
                        ms1 = median_ms(
                            functools.partial(gate_up_silu, hidden, w_gate_up, layout, m["K"], tiles)
                        )
                    except Exception as error:  # too much shared memory for this shape
                        ms1 = float("nan")
                        print(f"{name} T={T} {tile} gate_up: {type(error).__name__}")
                        act = gate_up_silu(hidden, w_gate_up, layout, m["K"], MoeTiles(block_m, 64, 64, 4, 3))
                    try:
                        ms2 = median_ms(functools.partial(down_weighted, act, w_down, layout, weights, tiles))
                    except Exception as error:
                        ms2 = float("nan")
                        print(f"{name} T={T} {tile} down: {type(error).__name__}")
                    rows.append(
                        [name, T, ",".join(map(str, tile)), f"{padded / (T * m['K']):.2f}", f"{ms1:.3f}",
                         f"{200 * gemm_flop / ms1 / 1e9 / mm_tflops:.0f}%", f"{ms2:.3f}",
                         f"{100 * gemm_flop / ms2 / 1e9 / mm_tflops:.0f}%"]
                    )  # fmt: skip
                    print(rows[-1], flush=True)
        del w_gate_up, w_down
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlapipe.kernels.bench moe")
    parser.add_argument("--tokens", default="1,16,128,512,2048,8192")
    parser.add_argument("--models", default="v3,v2-lite")
    parser.add_argument("--variant-tokens", default="1,16,128", help="T at which to time the variant tile")
    parser.add_argument("--no-variant", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="first time each GEMM under pinned tiles")
    parser.add_argument("--sweep-tokens", default="2048,8192")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    copy_gbs, mm_tflops = copy_bandwidth_gbs(), matmul_tflops()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy {copy_gbs:.0f} GB/s (read + write), bf16 matmul {mm_tflops:.0f} TFLOP/s")
    sweep_rows = sweep(args, mm_tflops) if args.sweep else []
    tables = [bench_model(name, args, copy_gbs, mm_tflops) for name in args.models.split(",")]
    torch.cuda.empty_cache()

    if sweep_rows:
        print("\n## Sweep: each GEMM alone under a pinned tile (% of the matmul rate on real rows)\n")
        header = [
            "model",
            "T",
            "bm,bn,bk,warps,stages",
            "padded/real rows",
            "gate_up ms",
            "%",
            "down ms",
            "%",
        ]
        print(markdown_table(header, sweep_rows))
    print("\nautotune picks:", selected_configs())
    print(f"\n## Fused MoE on {device} (baseline: {tables[0]['baseline']})")
    print(f"copy {copy_gbs:.0f} GB/s, matmul {mm_tflops:.0f} TFLOP/s, measured in this run. GB/s: bytes of")
    print("the hit experts' weights over time. graph ms: the same call replayed in a CUDA graph.\n")
    header = ["model", "T", "hit", "ms", "GB/s", "% copy", "TFLOP/s", "% mm", "torch ms", "torch/ours"]
    header += ["graph ms", "graph % copy", "graph % mm"]
    print(markdown_table(header, [row for t in tables for row in t["main"]]))
    if any(t["variant"] for t in tables):
        print("\n## Batch invariance cost (decode tile 64 rows vs batch-variant 16 rows)\n")
        header = ["model", "T", "invariant ms", "variant ms", "cost", "same bits"]
        print(markdown_table(header, [row for t in tables for row in t["variant"]]))
    print("\n## Shared expert as a dense torch MLP (one routed expert's shape), for scale\n")
    print(
        markdown_table(
            ["model", "T", "dense ms", "dense / routed"], [row for t in tables for row in t["shared"]]
        )
    )
