"""SASS of the quantized decode GEMM loops, without a GPU:
`python -m mlapipe.kernels.bench sass [--kernel linear|moe-gate-up|moe-down]
[--types q8_0,q8_0_planes,q4_k,q5_k,q2_k,q6_k,q3_k] [--stages 1] [--no-prefetch] [--block-k 64] [--no-hints]`.

Compiles one kernel for sm_90 with Triton's bundled ptxas at the decode launch's tiles (BLOCK 16 x 64 x 64,
4 warps), disassembles it with the bundled nvdisasm and prints, per type, the instructions of the main
loop (the back edge's body: one BLOCK_K step) by opcode, its barriers, and the kernel's registers a thread
(cuobjdump; they set how many programs an SM holds) and local-memory spills. Kernels:
- linear: kernels/quant/linear.py's `_linear_split_kernel` (the dense split launch);
- moe-gate-up / moe-down: kernels/quant/fused_moe.py's `_gate_up_kernel` / `_down_kernel` in their split
  launch (SPLIT, one chunk a program), as a V2-Lite decode step runs them: the integer arguments are
  specialized the way Triton's launcher specializes them, by value (a multiple of 16 or not) at
  V2-Lite's shapes (MOE_SHAPE). A compile without those hints (--no-hints) is another kernel: not knowing
  that the weight rows are 16-byte aligned, Triton loads Q4_K's words 4 bytes at a time, spreads rows over
  threads and converts through shared memory (Q4_K's gate|up loop 693 instructions and 10 barriers a step,
  against 396 and 2 with them; kernels/NOTES-quant.md, 2026-12-04).
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
from mlapipe.kernels.quant.fused_moe import DECODE_TILES, _down_kernel, _gate_up_kernel
from mlapipe.kernels.quant.linear import _linear_split_kernel, plan_linear
from mlapipe.kernels.quant.types import QUANT_TYPES, REPACKED_TYPES, row_bytes

SIGNATURE = {
    "x_ptr": "*bf16", "w_ptr": "*u8", "table_ptr": "*i16", "partial_ptr": "*fp32", "out_ptr": "*bf16",
    "num_tokens": "i32", "N": "i32", "K": "i32", "row_bytes": "i32", "stride_x": "i32", "chunk_k": "i32",
}  # fmt: skip
DIVISIBLE_BY_16 = (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)  # what Triton's specialization sees for real shapes
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def compile_linear_sass(kind, stages: int, prefetch: bool, block_k: int = 64) -> tuple[str, bytes]:
    """SASS and cubin of the dense split launch at the decode tiles (16 x 64, 4 warps)."""
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
    return disassemble(compiled.asm["cubin"]), compiled.asm["cubin"]


def compile_sass(kind, stages: int, prefetch: bool, block_k: int = 64) -> str:
    """SASS of the dense split launch (`_linear_split_kernel`) for weights of `kind`."""
    return compile_linear_sass(kind, stages, prefetch, block_k)[0]


# A V2-Lite decode step's MoE launch (one token): hidden 2048, intermediate 1408, 64 routed experts and the
# 2 shared ones stacked after them (top-6 + 2 = 8 rows), moe_align's 9 tiles; the chunk plans as on an H200.
MOE_SHAPE = {"hidden": 2048, "inter": 1408, "experts": 66, "rows": 8, "tiles": 9, "sms": 132}
MOE_KERNELS = {"moe-gate-up": _gate_up_kernel, "moe-down": _down_kernel}


def moe_arguments(kernel: str, kind, shape: dict = MOE_SHAPE) -> dict[str, int]:
    """The integer arguments of a MoE kernel's decode launch at `shape` (fused_moe._run_gemms's). A type
    whose block does not divide the reduction (K-quants over V2-Lite's 1408) gets its row bytes for the
    next whole block: only their divisibility by 16 enters the compile."""
    H, inter, rows = shape["hidden"], shape["inter"], shape["rows"]
    out, reduce = (inter, H) if kernel == "moe-gate-up" else (H, inter)
    plan = plan_linear(DECODE_TILES * out, reduce, kind.block_elems, shape["sms"],
                       prefetched=split_decoder(kind)[0] is not None)  # fmt: skip
    bytes_per_row = row_bytes(kind.code, -(-reduce // kind.block_elems) * kind.block_elems)
    strides = {"stride_hidden_t": H} if kernel == "moe-gate-up" else {"stride_slot_r": H}
    return {
        "num_rows": rows, "top_k": rows, "hidden_size": H, "inter_size": inter, "num_tiles": shape["tiles"],
        "stride_w_e": (2 * inter if kernel == "moe-gate-up" else H) * bytes_per_row, "row_bytes": bytes_per_row,
        "stride_act_p": inter, "chunk_k": plan.chunk_k, "num_chunks": plan.num_chunks, **strides,
    }  # fmt: skip


def compile_moe_sass(kernel: str, kind, stages: int = 1, prefetch: bool = True, block_k: int = 64,
                     hints: bool = True) -> tuple[str, bytes]:  # fmt: skip
    """SASS and cubin of fused_moe's gate|up or down kernel, split launch at the decode tiles (16 x 64,
    4 warps), for weights of `kind`. hints: the divisibility the launcher would see at MOE_SHAPE (every
    pointer 16-byte aligned, each integer argument that is a multiple of 16); off: none (an unhinted
    compile, as tests/test_quant_decoders.py's spill check does)."""
    fn = MOE_KERNELS[kernel]
    fetch, convert = split_decoder(kind, block_k) if prefetch else (None, None)
    constants = {
        "DECODE": kind.decoder, "COMPUTE": tl.bfloat16, "IEEE": False, "SPLIT": True, "BLOCK_M": 16,
        "BLOCK_N": 64, "BLOCK_K": block_k, "BLOCK_ELEMS": kind.block_elems, "BLOCK_BYTES": kind.step_bytes,
        "GROUP_M": 8, "FETCH": fetch, "CONVERT": convert, "PDL": True,
    }  # fmt: skip
    values = moe_arguments(kernel, kind)
    pointers = {"hidden_ptr": "*bf16", "act_ptr": "*bf16", "w_ptr": "*u8", "table_ptr": "*i16",
                "partial_ptr": "*fp32", "slot_out_ptr": "*bf16", "topk_weights_ptr": "*fp32"}  # fmt: skip
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        signature[name] = pointers.get(name, "*i32") if name.endswith("_ptr") else "i32"
        if hints and (name.endswith("_ptr") or values[name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constants, attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4, "num_stages": stages}
    )
    return disassemble(compiled.asm["cubin"]), compiled.asm["cubin"]


def _tool(name: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return os.path.join(os.path.dirname(get_ptxas(90).path), name)


def registers(cubin: bytes) -> int:
    """Registers a thread of the cubin's kernel (cuobjdump -res-usage): with 4 warps a program, an SM holds
    65536 // (128 * registers rounded up to 8) programs."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", file.name], capture_output=True, text=True)
    found = re.search(r"REG:(\d+)", usage.stdout)
    return int(found.group(1)) if found else -1


def spills(sass: str) -> bool:
    """Whether the kernel touches local memory (register spills)."""
    return bool(re.search(r"\b(STL|LDL)\b", sass))


def disassemble(cubin: bytes) -> str:
    """SASS text of a compiled kernel's cubin (the bundled nvdisasm)."""
    nvdisasm = _tool("nvdisasm")
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


def loop_row(kind, kernel: str, stages: int, prefetch: bool, block_k: int = 64, hints: bool = True) -> dict:
    """One kernel's loop for weights of `kind`: instructions a step, by opcode, its weights a thread a step,
    barriers, registers a thread, spills."""
    prefetched = prefetch and split_decoder(kind, block_k)[0] is not None
    if kernel == "linear":
        sass, cubin = compile_linear_sass(kind, stages, prefetched, block_k)
    else:
        sass, cubin = compile_moe_sass(kernel, kind, stages, prefetched, block_k, hints)
    body = main_loop(sass)
    # a step covers BLOCK_K values, or a whole block where the decoder walks a block a step; gate|up
    # converts two tiles (gate and up) a step
    tiles = 2 if kernel == "moe-gate-up" else 1
    per_thread = tiles * 64 * (block_k if prefetched else max(block_k, kind.block_elems)) // 128
    return {"body": body, "ops": collections.Counter(body), "per_thread": per_thread, "prefetched": prefetched,
            "registers": registers(cubin), "spills": spills(sass)}  # fmt: skip


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlapipe.kernels.bench sass")
    parser.add_argument("--kernel", choices=("linear", *MOE_KERNELS), default="linear")
    parser.add_argument("--types", default="q8_0,q8_0_planes,q4_k,q5_k,q2_k,q6_k,q3_k")
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--block-k", type=int, default=64)
    parser.add_argument("--no-prefetch", action="store_true", help="split decoders run whole")
    parser.add_argument("--no-hints", action="store_true", help="MoE kernels: no divisibility hints")
    args = parser.parse_args(argv)
    by_name = {row.name.lower(): row for row in (*QUANT_TYPES.values(), *REPACKED_TYPES.values())}
    rows = []
    for name in args.types.split(","):
        kind = by_name[name]
        row = loop_row(kind, args.kernel, args.stages, not args.no_prefetch, args.block_k, not args.no_hints)
        ops, per_thread = row["ops"], row["per_thread"]
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(8))
        rows.append([
            kind.name, len(row["body"]), per_thread, f"{len(row['body']) / per_thread:.1f}", ops["I2F"],
            ops["BAR"], row["registers"], "yes" if row["spills"] else "no", top,
        ])  # fmt: skip
    shape = "" if args.kernel == "linear" else f", V2-Lite decode arguments {MOE_SHAPE}"
    shape += ", no divisibility hints" if args.no_hints and args.kernel != "linear" else ""
    print(
        f"\n{args.kernel}: sm_90, BLOCK 16x64x{args.block_k}, 4 warps, {args.stages} stage(s), "
        f"prefetch {not args.no_prefetch}{shape}\n"
    )
    header = ["type", "loop instructions a step", "weights a thread a step", "per weight", "I2F", "BAR",
              "registers", "spills", "most"]  # fmt: skip
    print(markdown_table(header, rows))
