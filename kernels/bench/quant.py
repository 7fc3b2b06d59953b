"""Quantized kernels bench: `python -m mlapipe.kernels.bench quant [--types q8_0,q4_k] [--models v3,v2-lite]`.

On random valid blocks made on the GPU (kernels/quant/random_blocks.py), for each type and model:
- dense linear (kernels/quant/linear.py) on the model's projection shapes at decode sizes (T = 1, 16):
  GB/s over the quantized bytes against the copy rate measured here; at T = 2048 against cuBLAS on the
  bf16-dequantized weight;
- Q8_0 in both device layouts (--layouts): the file's blocks and the loader's planes
  (kernels/quant/planes.py), so the table shows what the repacking buys, measured in the same run;
- fused MoE (kernels/quant/fused_moe.py) at T = 1, 16 (GB/s over the hit experts' quantized bytes) and
  at prefill sizes against today's bf16 kernel on the dequantized experts, both quantized paths timed
  (decode in the GEMMs, bf16 scratch) to place the crossover.
Correctness first: bf16 results against kernels.reference (V2-Lite shapes) and equality of the paths.
Times are CUDA-graph replays (median). Tables print last.
"""

from __future__ import annotations

import argparse
import functools
import os

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from mlapipe.kernels import reference
from mlapipe.kernels.bench.common import copy_bandwidth_gbs, markdown_table, matmul_tflops, median_ms
from mlapipe.kernels.bench.moe import MODELS, route
from mlapipe.kernels.fused_moe import fused_moe
from mlapipe.kernels.quant import planes
from mlapipe.kernels.quant.dispatch import BLOCK_K_ENV, PREFETCH_ENV, dequantize_on_device, kernel_type
from mlapipe.kernels.quant.fused_moe import PATH_ENV, quant_fused_moe
from mlapipe.kernels.quant.linear import SPLIT_CONFIG_ENV, quant_linear
from mlapipe.kernels.quant.random_blocks import random_quant_tensor
from mlapipe.runtime.recipes import FALLBACK

TYPE_CODES = {"q8_0": 8, "q4_k": 12, "q6_k": 14, "q5_k": 13, "q2_k": 10, "q3_k": 11, "q4_0": 2, "q5_0": 6}
TYPE_CODES |= {"iq4_nl": 20, "q5_1": 7, "q4_1": 3}
Q8_0 = 8

# (name, N, K) of each model's dense projections (torch order: out features, in features)
DENSE = {
    "v3": [("q_a", 1536, 7168), ("q_b", 24576, 1536), ("kv_a", 576, 7168), ("o", 7168, 16384),
           ("mlp_gate_up", 36864, 7168), ("mlp_down", 7168, 18432), ("head", 129280, 7168)],
    "v2-lite": [("q", 3072, 2048), ("kv_a", 576, 2048), ("o", 2048, 2048), ("mlp_gate_up", 21888, 2048),
                ("mlp_down", 2048, 10944), ("head", 102400, 2048)],
}  # fmt: skip


def random_quant(shape, qtype: int, std: float, name: str, layout: str = "file"):
    """Random valid blocks on the GPU, kept in the file's layout or repacked as the loader does."""
    w = random_quant_tensor(tuple(shape), qtype, std, name, device="cuda")
    return planes.pack_in_place(w) if layout == "planes" and planes.packable(w) else w


def fitting_type(qtype: int, cols: int) -> int:
    """qtype when rows of `cols` values are whole blocks of it, else llama.cpp's fallback (the recipes'
    table: V2-Lite's 1408-wide expert down rows take Q5_0 under Q4_K, Q8_0 under Q6_K), so the bench times
    what the files and `--wtype` models hold."""
    if cols % kernel_type(qtype).block_elems == 0:
        return qtype
    return int(FALLBACK.get(Q(qtype), Q.Q8_0))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def pct(value: float, ceiling: float) -> str:
    return f"{100 * value / ceiling:.0f}%"


def bench_dense(
    model: str, qtype: int, tokens: list[int], prefill: list[int], copy_gbs: float, layout: str = "file"
) -> list[list]:
    rows = []
    totals = {T: [0, 0.0, 0.0] for T in tokens}  # bytes, ms, bf16 ms over all projections
    for name, N, K in DENSE[model]:
        wtype = fitting_type(qtype, K)
        w = random_quant((N, K), wtype, K**-0.5, f"{model}.{name}", layout)
        w_bf16 = dequantize_on_device(w, torch.bfloat16)
        x = torch.randn(max(tokens + prefill), K, device="cuda", dtype=torch.bfloat16)
        check = relative_error(quant_linear(x[:3], w), reference.quant_linear(x[:3], w))
        assert check < 1e-2, f"{model} {name}: relative error {check}"
        for T in tokens:
            ms = median_ms(functools.partial(quant_linear, x[:T], w), graph=True)
            bf16_ms = median_ms(functools.partial(F.linear, x[:T], w_bf16), graph=True)
            gbs = w.nbytes / ms / 1e6
            totals[T][0] += w.nbytes
            totals[T][1] += ms
            totals[T][2] += bf16_ms
            rows.append([model, kernel_type(w.qtype).name, name, N, K, T, f"{ms:.4f}", f"{gbs:.0f}", pct(gbs, copy_gbs),
                         f"{bf16_ms:.4f}", f"{bf16_ms / ms:.2f}", f"{check:.1e}"])  # fmt: skip
            print(rows[-1], flush=True)
        for T in prefill:
            ms = median_ms(functools.partial(quant_linear, x[:T], w))
            bf16_ms = median_ms(functools.partial(F.linear, x[:T], w_bf16))
            rows.append([model, kernel_type(w.qtype).name, name, N, K, T, f"{ms:.4f}", "", "", f"{bf16_ms:.4f}",
                         f"{bf16_ms / ms:.2f}", f"{check:.1e}"])  # fmt: skip
            print(rows[-1], flush=True)
        del w, w_bf16
    for T, (nbytes, ms, bf16_ms) in totals.items():
        gbs = nbytes / ms / 1e6
        rows.append([model, kernel_type(qtype).name + (f" {layout}" if qtype == Q8_0 else ""), "all (sum)", "", "", T, f"{ms:.4f}", f"{gbs:.0f}",
                     pct(gbs, copy_gbs), f"{bf16_ms:.4f}", f"{bf16_ms / ms:.2f}", ""])  # fmt: skip
    return rows


def _with_env(name: str, value: str | None, fn):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def bench_moe(
    model: str, qtype: int, tokens: list[int], copy_gbs: float, mm_tflops: float, layout: str = "file"
) -> list[list]:
    m = MODELS[model]
    E, H, inter = m["E"], m["H"], m["I"]
    down_type = fitting_type(qtype, inter)
    gate_up = random_quant((E, 2 * inter, H), qtype, H**-0.5, f"{model}.gate_up", layout)
    down = random_quant((E, H, inter), down_type, inter**-0.5, f"{model}.down", layout)
    gate_up_bf16 = dequantize_on_device(gate_up, torch.bfloat16)
    down_bf16 = dequantize_on_device(down, torch.bfloat16)
    expert_bytes = (gate_up.nbytes + down.nbytes) / E
    type_name = kernel_type(gate_up.qtype).name + (
        "" if down_type == qtype else f"+{kernel_type(down.qtype).name} down"
    )
    if model == "v2-lite":  # the fp32 reference of V3's 256 experts needs 45 GB: checked on V2-Lite
        for T in (1, 37):
            hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            weights, ids = route(m, T)
            err = relative_error(
                quant_fused_moe(hidden, gate_up, down, weights, ids),
                reference.quant_fused_moe(hidden, gate_up, down, weights, ids),
            )
            print(f"check moe {model} {type_name} T={T}: relative error {err:.2e}")
            assert err < 1e-2
    dequant_ms = median_ms(functools.partial(dequantize_on_device, gate_up), reps=5)
    dequant_ms += median_ms(functools.partial(dequantize_on_device, down), reps=5)
    rows = []
    for T in tokens:
        hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        weights, ids = route(m, T)
        hit = ids.unique().numel()
        run = functools.partial(quant_fused_moe, hidden, gate_up, down, weights, ids)
        bf16_ms = median_ms(
            functools.partial(fused_moe, hidden, gate_up_bf16, down_bf16, weights, ids), graph=True
        )
        times, outs = {}, {}
        for path in ("fused", "scratch"):
            if path == "scratch" and T * m["K"] / E < 8:
                continue  # every expert dequantized for a handful of rows: never the faster one
            outs[path] = _with_env(PATH_ENV, path, run)
            times[path] = _with_env(PATH_ENV, path, functools.partial(median_ms, run, graph=True))
        chosen = run()
        same = all(torch.equal(o, chosen) for o in outs.values())
        best = min(times.values())
        gbs = hit * expert_bytes / times["fused"] / 1e6
        tflops = 2 * T * m["K"] * 3 * H * inter / best / 1e9
        rows.append([model, type_name, T, hit, f"{times['fused']:.3f}", f"{times.get('scratch', float('nan')):.3f}",
                     f"{gbs:.0f}", pct(gbs, copy_gbs), pct(tflops, mm_tflops), f"{bf16_ms:.3f}",
                     f"{bf16_ms / best:.2f}", f"{dequant_ms:.3f}", same])  # fmt: skip
        print(rows[-1], flush=True)
    del gate_up, down, gate_up_bf16, down_bf16
    torch.cuda.empty_cache()
    return rows


# split-launch tiles (block_m,block_n,warps,stages) tried by --sweep on one dense shape and T
SWEEP_SPLIT = ["16,64,4,1", "16,64,4,2", "16,64,4,3", "16,128,4,1", "16,128,8,2"]
PREFETCH = ("1", "0")  # split decoders loading a step ahead, or run whole
SWEEP_MOE = ["16,64,4,1", "16,64,4,2", "16,64,4,3", "16,128,4,1"]


def sweep(qtype: int, layout: str = "file") -> list[list]:
    """Decode-size tiles of the split linear (V3 o_proj, T=1) and the fused MoE (V3, T=1): time and bits."""
    from mlapipe.kernels.quant.fused_moe import CONFIG_ENV
    from mlapipe.kernels.quant.linear import PROGRAMS_ENV

    rows = []
    for name, N, K in (("o", 7168, 16384), ("q", 3072, 2048)):  # V3 o_proj, V2-Lite q_proj
        w = random_quant((N, K), qtype, K**-0.5, f"sweep.{name}", layout)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        for per_sm in ("4", "8", "16", "32"):
            run = functools.partial(quant_linear, x, w)
            ms = _with_env(PROGRAMS_ENV, per_sm, functools.partial(median_ms, run, graph=True))
            rows.append([f"linear {name} {N}x{K}, programs/SM", kernel_type(w.qtype).name, per_sm, f"{ms:.4f}",
                         f"{w.nbytes / ms / 1e6:.0f}", ""])  # fmt: skip
            print(rows[-1], flush=True)
    w = random_quant((7168, 16384), qtype, 16384**-0.5, "sweep.o", layout)
    x = torch.randn(1, 16384, device="cuda", dtype=torch.bfloat16)
    for block_k in ("64", "128"):  # the reduction step: bytes a program loads per step
        run = functools.partial(_with_env, BLOCK_K_ENV, block_k, functools.partial(quant_linear, x, w))
        ms = median_ms(run, graph=True)
        rows.append([f"linear o 7168x16384, BLOCK_K {block_k}", kernel_type(w.qtype).name, "", f"{ms:.4f}",
                     f"{w.nbytes / ms / 1e6:.0f}", torch.equal(run(), quant_linear(x, w))])  # fmt: skip
        print(rows[-1], flush=True)
    first = None
    for prefetch, tiles in [(p, t) for p in PREFETCH for t in SWEEP_SPLIT]:
        run = functools.partial(_with_env, PREFETCH_ENV, prefetch, functools.partial(quant_linear, x, w))
        out = _with_env(SPLIT_CONFIG_ENV, tiles, run)
        first = out if first is None else first
        ms = _with_env(SPLIT_CONFIG_ENV, tiles, functools.partial(median_ms, run, graph=True))
        rows.append([f"linear o 7168x16384, prefetch {prefetch}", kernel_type(w.qtype).name, tiles, f"{ms:.4f}",
                     f"{w.nbytes / ms / 1e6:.0f}", torch.equal(out, first)])  # fmt: skip
        print(rows[-1], flush=True)
    del w
    m = MODELS["v3"]
    gate_up = random_quant((m["E"], 2 * m["I"], m["H"]), qtype, m["H"] ** -0.5, "sweep.gate_up", layout)
    down = random_quant((m["E"], m["H"], m["I"]), qtype, m["I"] ** -0.5, "sweep.down", layout)
    hidden = torch.randn(1, m["H"], device="cuda", dtype=torch.bfloat16)
    weights, ids = route(m, 1)
    hit_bytes = ids.unique().numel() * (gate_up.nbytes + down.nbytes) / m["E"]
    for block_k in ("64", "128"):
        moe = functools.partial(quant_fused_moe, hidden, gate_up, down, weights, ids)
        run = functools.partial(_with_env, BLOCK_K_ENV, block_k, moe)
        ms = median_ms(run, graph=True)
        rows.append([f"moe v3 T=1, BLOCK_K {block_k}", kernel_type(gate_up.qtype).name, "", f"{ms:.4f}",
                     f"{hit_bytes / ms / 1e6:.0f}", torch.equal(run(), moe())])  # fmt: skip
        print(rows[-1], flush=True)
    first = None
    for prefetch, tiles in [(p, t) for p in PREFETCH for t in SWEEP_MOE]:
        moe = functools.partial(quant_fused_moe, hidden, gate_up, down, weights, ids)
        run = functools.partial(_with_env, PREFETCH_ENV, prefetch, moe)
        out = _with_env(CONFIG_ENV, tiles, run)
        first = out if first is None else first
        ms = _with_env(CONFIG_ENV, tiles, functools.partial(median_ms, run, graph=True))
        rows.append([f"moe v3 T=1, prefetch {prefetch}", kernel_type(gate_up.qtype).name, tiles, f"{ms:.4f}", f"{hit_bytes / ms / 1e6:.0f}",
                     torch.equal(out, first)])  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlapipe.kernels.bench quant")
    parser.add_argument("--types", default="q8_0,q4_k")
    parser.add_argument("--models", default="v3,v2-lite")
    parser.add_argument("--tokens", default="1,16", help="decode-sized T (dense and MoE)")
    parser.add_argument("--dense-prefill", default="2048")
    parser.add_argument("--moe-prefill", default="128,512,2048,8192")
    parser.add_argument("--no-dense", action="store_true")
    parser.add_argument("--no-moe", action="store_true")
    parser.add_argument("--layouts", default="file,planes", help="Q8_0's device layouts to time")
    parser.add_argument("--sweep", default="", help="types whose decode tiles to time first on V3 shapes")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    copy_gbs, mm_tflops = copy_bandwidth_gbs(), matmul_tflops()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy {copy_gbs:.0f} GB/s (read + write), bf16 matmul {mm_tflops:.0f} TFLOP/s")
    types = [TYPE_CODES[t] for t in args.types.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    layouts = args.layouts.split(",")
    sweep_rows = [
        row for t in args.sweep.split(",") if t for lay in layouts for row in sweep(TYPE_CODES[t], lay)
    ]
    dense_rows, moe_rows = [], []
    for model in args.models.split(","):
        for qtype in types:
            for layout in args.layouts.split(",") if qtype == Q8_0 else ["file"]:
                if not args.no_dense:
                    prefill = [int(t) for t in args.dense_prefill.split(",") if t]
                    dense_rows += bench_dense(model, qtype, tokens, prefill, copy_gbs, layout)
                if not args.no_moe:
                    moe_tokens = tokens + [int(t) for t in args.moe_prefill.split(",") if t]
                    moe_rows += bench_moe(model, qtype, moe_tokens, copy_gbs, mm_tflops, layout)

    print(
        f"\ncopy {copy_gbs:.0f} GB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s on {device}, measured in this run;"
    )
    print("ms: CUDA-graph replays, median (prefill dense rows: eager). GB/s over the quantized bytes.")
    if sweep_rows:
        print("\n## Decode tiles (bits equal to the first config's?)\n")
        print(markdown_table(["what", "type", "bm,bn,warps,stages", "ms", "GB/s", "same bits"], sweep_rows))
    if dense_rows:
        print("\n## Quantized dense linear vs cuBLAS on the bf16-dequantized weight\n")
        header = [
            "model",
            "type",
            "proj",
            "N",
            "K",
            "T",
            "ms",
            "GB/s",
            "% copy",
            "bf16 ms",
            "bf16/ours",
            "rel err",
        ]
        print(markdown_table(header, dense_rows))
    if moe_rows:
        print("\n## Quantized fused MoE vs the bf16 kernel on the dequantized experts\n")
        print("fused: decode in the GEMMs; scratch: dequantize to bf16, then the bf16 kernels; GB/s, % copy:")
        print("fused path over the hit experts' quantized bytes; % mm and bf16/ours: the faster path;")
        print(
            "dequant ms: all experts to bf16 (today's bf16 kernel on a scratch would cost that + bf16 ms).\n"
        )
        header = ["model", "type", "T", "hit", "fused ms", "scratch ms", "GB/s", "% copy", "% mm", "bf16 ms",
                  "bf16/ours", "dequant ms", "paths same bits"]  # fmt: skip
        print(markdown_table(header, moe_rows))
