"""Block decoder bench: `python -m mlapipe.kernels.bench dequant [--types Q8_0,Q4_K,...] [--rows R] [--cols K]`.

Per type, on random valid blocks (kernels/quant/random_blocks.py) of a (rows, cols) weight, the
decoders' own ceilings, apart from any GEMM around them:
- decode+sum: every program decodes (BLOCK_R, BLOCK_K) tiles along its rows and sums them (a GEMV with
  x = 1: the decode-sized linear's work minus the activations), GB/s over the quantized bytes and as a
  fraction of the copy bandwidth measured in the same run (bytes read + written, as the MoE bench).
  The best of a few tile shapes is reported with its shape.
- dequantize: the whole tensor to bf16 (bytes counted: quantized read + bf16 written).
- embedding: quant_embedding of T = 1 / 16 / 2048 random rows of a (vocab, cols) table, in microseconds.
Each type is first checked on the device against the torch reference (bit-exact). The table prints last.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from mlapipe.kernels.bench.common import copy_bandwidth_gbs, markdown_table, median_ms
from mlapipe.kernels.quant import tables
from mlapipe.kernels.quant.dequantize import dequantize, quant_embedding, tile_k
from mlapipe.kernels.quant.random_blocks import random_quant_tensor
from mlapipe.kernels.quant.reference import dequantize_rows
from mlapipe.kernels.quant.tensor import QuantTensor
from mlapipe.kernels.quant.types import QUANT_TYPES

TILES = [(16, 256, 4), (32, 256, 4), (8, 512, 4), (64, 64, 4), (32, 128, 8)]  # (BLOCK_R, BLOCK_K, warps)


@triton.jit
def _decode_sum_kernel(
    w_ptr, table_ptr, out_ptr, n_rows, cols, row_bytes,
    DECODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, cols, BLOCK_K):
        acc += DECODE(w_ptr, tl.minimum(rows, n_rows - 1), row_bytes, k0, BLOCK_K, table_ptr)
    tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=rows < n_rows)


def decode_sum(w, table, block_r: int, block_k: int, warps: int) -> torch.Tensor:
    n_rows, cols = w.shape
    out = torch.empty(n_rows, device=w.device)
    _decode_sum_kernel[(triton.cdiv(n_rows, block_r),)](
        w.data, table, out, n_rows, cols, w.data.shape[-1],
        DECODE=QUANT_TYPES[w.qtype].decoder, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=warps,
    )  # fmt: skip
    return out


def bench_type(name: str, rows: int, cols: int, vocab: int, copy_gbs: float) -> list[object]:
    row = next(r for r in QUANT_TYPES.values() if r.name == name)
    w = random_quant_tensor((rows, cols), row.code, cols**-0.5, f"bench.{name}", device="cuda")
    table = tables.device_table(row.code, "cuda")
    head = w.data[:64].contiguous()
    got = dequantize(QuantTensor(head, row.code, (64, cols)))
    want = dequantize_rows(head, row.code)
    exact = torch.equal(got.view(torch.int32), want.view(torch.int32))
    best = None
    for block_r, block_k, warps in TILES:
        if row.block_elems > 1 and cols % block_k:
            continue
        ms = median_ms(lambda: decode_sum(w, table, block_r, block_k, warps))  # noqa: B023
        if best is None or ms < best[0]:
            best = (ms, f"{block_r}x{block_k}/{warps}w")
    gbs = w.nbytes / best[0] / 1e6
    deq_ms = median_ms(lambda: dequantize(w, torch.bfloat16))
    deq_gbs = (w.nbytes + 2 * rows * cols) / deq_ms / 1e6
    emb = random_quant_tensor((vocab, cols), row.code, 1.0, f"bench.embed.{name}", device="cuda")
    emb_us = []
    for T in (1, 16, 2048):
        ids = torch.randint(0, vocab, (T,), device="cuda")
        emb_us.append(f"{1e3 * median_ms(lambda: quant_embedding(ids, emb, torch.bfloat16)):.1f}")  # noqa: B023
    bits = w.nbytes * 8 / (rows * cols)
    return [name, f"{bits:.2f}", "yes" if exact else "NO", f"{gbs:.0f}", f"{gbs / copy_gbs:.2f}", best[1],
            f"{deq_gbs:.0f}", tile_k(row.code, cols), *emb_us]  # fmt: skip


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlapipe.kernels.bench dequant")
    parser.add_argument("--types", default=",".join(r.name for r in QUANT_TYPES.values()))
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--cols", type=int, default=7168)
    parser.add_argument("--vocab", type=int, default=129280)
    args = parser.parse_args(argv)
    copy_gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth {copy_gbs:.0f} GB/s (read + write); weight ({args.rows}, {args.cols})", flush=True)
    header = ["type", "bits/w", "exact", "decode+sum GB/s", "x copy", "tile", "dequant->bf16 GB/s",
              "dequant BLOCK_K", "embed T=1 us", "T=16 us", "T=2048 us"]  # fmt: skip
    table = []
    for name in args.types.split(","):
        table.append(bench_type(name, args.rows, args.cols, args.vocab, copy_gbs))
        print(table[-1], flush=True)
    print(markdown_table(header, table))
