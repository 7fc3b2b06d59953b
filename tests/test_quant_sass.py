"""The compiled sm_90 K loop of the quantized split launch (kernels/bench/sass.py: Triton's bundled ptxas
and nvdisasm, no GPU needed): the file layout's Q8_0 loop converts with I2F, the Q8_0 planes and Q4_K
split decoders with none, and the planes loop is the shorter. Run in a subprocess without
TRITON_INTERPRET, which the CPU kernel tests set for the whole session."""

import json
import os
import subprocess
import sys

PROBE = """
import json
from mlapipe.kernels.bench.sass import compile_sass, main_loop
from mlapipe.kernels.quant.types import Q8_0_PLANES, quant_type
loops = {name: main_loop(compile_sass(quant_type(code), stages=1, prefetch=True))
         for name, code in (("q8_0", 8), ("planes", Q8_0_PLANES), ("q4_k", 12))}
print(json.dumps({name: {"len": len(body), "i2f": body.count("I2F")} for name, body in loops.items()}))
"""


def test_the_split_decoders_loops_convert_without_i2f():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    loops = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(loop["len"] > 0 for loop in loops.values()), loops
    assert loops["q8_0"]["i2f"] == 32, loops
    assert loops["planes"]["i2f"] == 0 and loops["q4_k"]["i2f"] == 0, loops
    assert loops["planes"]["len"] < loops["q8_0"]["len"], loops
