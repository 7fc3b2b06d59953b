"""The compiled sm_90 K loop of the quantized split launch (kernels/bench/sass.py: Triton's bundled ptxas
and nvdisasm, no GPU needed): the file layout's Q8_0 loop converts with I2F, the Q8_0 planes and K-quant
split decoders with none; the planes loop is the shorter, and each K-quant's split loop (64 values a step)
is shorter per value than its whole-block decoder's (256 a step), each 32-value type's (Q5_0, IQ4_NL, Q4_0,
Q5_1, Q4_1: 64 values a step either way) over 1.5x shorter. Run in a subprocess without
TRITON_INTERPRET, which the CPU kernel tests set for the whole session."""

import json
import os
import subprocess
import sys

PROBE = """
import json
from mlapipe.kernels.bench.sass import compile_sass, main_loop
from mlapipe.kernels.quant.types import Q8_0_PLANES, quant_type
codes = {"q8_0": 8, "planes": Q8_0_PLANES, "q4_k": 12, "q5_k": 13, "q2_k": 10, "q6_k": 14, "q3_k": 11,
         "q5_0": 6, "iq4_nl": 20, "q4_0": 2, "q5_1": 7, "q4_1": 3}
loops = {name: main_loop(compile_sass(quant_type(code), stages=1, prefetch=True)) for name, code in codes.items()}
whole = {name: main_loop(compile_sass(quant_type(codes[name]), stages=1, prefetch=False))
         for name in ("q5_k", "q2_k", "q6_k", "q3_k", "q5_0", "iq4_nl", "q4_0", "q5_1", "q4_1")}
print(json.dumps({name: {"len": len(body), "i2f": body.count("I2F")} for name, body in loops.items()}))
print(json.dumps({name: {"len": len(body), "i2f": body.count("I2F")} for name, body in whole.items()}))
"""
SPLIT_K_QUANTS = ("q4_k", "q5_k", "q2_k", "q6_k", "q3_k")
SPLIT_32 = ("q5_0", "iq4_nl", "q4_0", "q5_1", "q4_1")  # two blocks a tile


def test_the_split_decoders_loops_convert_without_i2f():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the GPU default today
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    loops, whole = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert all(loop["len"] > 0 for loop in (*loops.values(), *whole.values())), (loops, whole)
    assert loops["q8_0"]["i2f"] == 32, loops
    assert all(loops[name]["i2f"] == 0 for name in ("planes", *SPLIT_K_QUANTS, *SPLIT_32)), loops
    assert loops["planes"]["len"] < loops["q8_0"]["len"], loops
    for name, loop in whole.items():  # a K-quant's whole-block step is 4 of the split loop's, a 32-value's 1
        factor = 1.5 if name in SPLIT_32 else 4  # 2026-12-04: 32-value types 1.9-3.0x shorter
        assert factor * loops[name]["len"] < loop["len"], (name, loops[name], loop)


MOE_PROBE = """
import json
from mlapipe.kernels.bench.sass import loop_row
from mlapipe.kernels.quant.types import Q8_0_PLANES, quant_type
rows = {}
for kernel, name, code in (("moe-gate-up", "planes", Q8_0_PLANES), ("moe-gate-up", "q4_k", 12),
                           ("moe-down", "planes", Q8_0_PLANES), ("linear", "planes", Q8_0_PLANES),
                           ("linear", "q4_k", 12)):
    row = loop_row(quant_type(code), kernel, stages=1, prefetch=True)
    rows[f"{kernel} {name}"] = {"len": len(row["body"]), "bar": row["ops"]["BAR"], "spills": row["spills"],
                                "hgmma": row["ops"]["HGMMA"]}
print(json.dumps(rows))
"""
# sm_90 loop a step at the decode launch (V2-Lite's arguments, as the launcher specializes them), measured
# 2026-12-04: gate|up Q8_0 planes 315 (was 337), Q4_K 396 (was 405), down Q8_0 planes 173 (was 183); the
# bounds leave ~5% for compiler noise. kernels/NOTES-quant.md has the table.
MOE_LOOP_BOUNDS = {"moe-gate-up planes": 330, "moe-gate-up q4_k": 415, "moe-down planes": 182}


def test_the_moe_decode_loops_stay_short_without_spills():
    """The fused MoE's split launch at decode tiles: the gate|up loop (two weight tiles a step, gate's dot
    then up's) within its bound and under twice the dense loop of the same type, one shared-memory round
    trip a step (2 barriers: both tiles converted before the dots), the down loop within its bound, and no
    local-memory spills in any of them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", MOE_PROBE], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(not row["spills"] and row["len"] > 0 for row in rows.values()), rows
    assert rows["moe-gate-up planes"]["hgmma"] == 2 * rows["linear planes"]["hgmma"], rows  # both tiles' dots
    for name, bound in MOE_LOOP_BOUNDS.items():
        assert rows[name]["len"] <= bound, (name, rows[name], bound)
        assert rows[name]["bar"] <= 2, (name, rows[name])
    for kind in ("planes", "q4_k"):
        assert rows[f"moe-gate-up {kind}"]["len"] < 2 * rows[f"linear {kind}"]["len"], rows
