"""The compiled sm_90 K loop of the quantized split launch (kernels/bench/sass.py: Triton's bundled ptxas
and nvdisasm, no GPU needed): the file layout's Q8_0 loop converts with I2F, the Q8_0 planes and K-quant
split decoders with none; the planes loop is the shorter, and each K-quant's split loop (64 values a step)
is shorter per value than its whole-block decoder's (256 a step). Run in a subprocess without
TRITON_INTERPRET, which the CPU kernel tests set for the whole session."""

import json
import os
import subprocess
import sys

PROBE = """
import json
from mlapipe.kernels.bench.sass import compile_sass, main_loop
from mlapipe.kernels.quant.types import Q8_0_PLANES, quant_type
codes = {"q8_0": 8, "planes": Q8_0_PLANES, "q4_k": 12, "q5_k": 13, "q2_k": 10, "q6_k": 14, "q3_k": 11}
loops = {name: main_loop(compile_sass(quant_type(code), stages=1, prefetch=True)) for name, code in codes.items()}
whole = {name: main_loop(compile_sass(quant_type(codes[name]), stages=1, prefetch=False))
         for name in ("q5_k", "q2_k", "q6_k", "q3_k")}
print(json.dumps({name: {"len": len(body), "i2f": body.count("I2F")} for name, body in loops.items()}))
print(json.dumps({name: {"len": len(body), "i2f": body.count("I2F")} for name, body in whole.items()}))
"""
SPLIT_K_QUANTS = ("q4_k", "q5_k", "q2_k", "q6_k", "q3_k")


def test_the_split_decoders_loops_convert_without_i2f():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the GPU default today
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    loops, whole = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert all(loop["len"] > 0 for loop in (*loops.values(), *whole.values())), (loops, whole)
    assert loops["q8_0"]["i2f"] == 32, loops
    assert all(loops[name]["i2f"] == 0 for name in ("planes", *SPLIT_K_QUANTS)), loops
    assert loops["planes"]["len"] < loops["q8_0"]["len"], loops
    for name, loop in whole.items():  # a whole-block step is 4 of the split loop's
        assert 4 * loops[name]["len"] < loop["len"], (name, loops[name], loop)
