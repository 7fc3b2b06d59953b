"""SASS of the quantized split-launch GEMM loop, without a GPU:
`python -m mlapipe.kernels.bench sass [--types q8_0,q8_0_planes,q4_k,q5_k,q2_k,q6_k,q3_k] [--stages 1]
[--no-prefetch]`.

Compiles kernels/quant/linear.py's `_linear_split_kernel` for sm_90 with Triton's bundled ptxas (the
decode launch's tiles: BLOCK 16 x 64 x 64, 4 warps), disassembles it with the bundled nvdisasm and
prints, per type, the instructions of the main loop (the back edge's body: one BLOCK_K step) by opcode.
The count a step over the weights a thread decodes in it is the issue budget that kernels/NOTES-quant.md
weighs against the copy rate; the versions there were read with this.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mlapipe.kernels.bench.common import markdown_table
from mlapipe.kernels.quant.dispatch import split_decoder
from mlapipe.kernels.quant.linear import _linear_split_kernel
from mlapipe.kernels.quant.types import QUANT_TYPES, REPACKED_TYPES

SIGNATURE = {
    "x_ptr": "*bf16", "w_ptr": "*u8", "table_ptr": "*i16", "partial_ptr": "*fp32", "out_ptr": "*bf16",
    "num_tokens": "i32", "N": "i32", "K": "i32", "row_bytes": "i32", "stride_x": "i32", "chunk_k": "i32",
}  # fmt: skip
DIVISIBLE_BY_16 = (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)  # what Triton's specialization sees for real shapes
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def compile_sass(kind, stages: int, prefetch: bool, block_k: int = 64) -> str:
    fetch, convert = split_decoder(kind, block_k) if prefetch else (None, None)
    constants = {
        "DECODE": kind.decoder, "COMPUTE": tl.bfloat16, "IEEE": False, "DIRECT": False, "BLOCK_M": 16,
        "BLOCK_N": 64, "BLOCK_K": block_k, "BLOCK_ELEMS": kind.block_elems, "BLOCK_BYTES": kind.step_bytes,
        "FETCH": fetch, "CONVERT": convert, "PDL": True,  # as a Hopper launch runs it
    }  # fmt: skip
    signature = SIGNATURE | {name: "constexpr" for name in constants}
    attrs = {(i,): [["tt.divisibility", 16]] for i in DIVISIBLE_BY_16}
    source = ASTSource(_linear_split_kernel, signature, constants, attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4, "num_stages": stages}
    )
    return disassemble(compiled.asm["cubin"])


def disassemble(cubin: bytes) -> str:
    """SASS text of a compiled kernel's cubin (the bundled nvdisasm)."""
    from triton.backends.nvidia.compiler import get_ptxas

    nvdisasm = os.path.join(os.path.dirname(get_ptxas(90).path), "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([nvdisasm, "-c", file.name], capture_output=True, text=True, check=True).stdout


def main_loop(sass: str) -> list[str]:
    """The opcodes of the innermost loop with the MMAs (the K loop): from a label to the branch back."""
    lines = sass.splitlines()
    loops = []
    for end, line in enumerate(lines):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if not target:
            continue
        starts = [i for i in range(end) if lines[i].strip().startswith(target.group(1) + ":")]
        if starts:
            body = [m.group(2) for m in map(INSTRUCTION.search, lines[starts[0] : end + 1]) if m]
            if "HGMMA" in body:
                loops.append(body)
    return min(loops, key=len) if loops else []


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlapipe.kernels.bench sass")
    parser.add_argument("--types", default="q8_0,q8_0_planes,q4_k,q5_k,q2_k,q6_k,q3_k")
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--no-prefetch", action="store_true", help="split decoders run whole")
    args = parser.parse_args(argv)
    by_name = {row.name.lower(): row for row in (*QUANT_TYPES.values(), *REPACKED_TYPES.values())}
    rows = []
    for name in args.types.split(","):
        kind = by_name[name]
        prefetched = not args.no_prefetch and split_decoder(kind, 64)[0] is not None
        body = main_loop(compile_sass(kind, args.stages, prefetched))
        ops = collections.Counter(body)
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(8))
        # a step covers BLOCK_K values, or a whole block where the decoder walks a block a step
        per_thread = 64 * (64 if prefetched else max(64, kind.block_elems)) // 128
        rows.append([kind.name, len(body), per_thread, f"{len(body) / per_thread:.1f}", ops["I2F"], top])
    print(f"\nsm_90, BLOCK 16x64x64, 4 warps, {args.stages} stage(s), prefetch {not args.no_prefetch}\n")
    header = ["type", "loop instructions a step", "weights a thread a step", "per weight", "I2F", "most"]
    print(markdown_table(header, rows))
