#!/bin/bash
# GPU checks and bench of the quantized GEMMs, one H200: tests first, then the bench (tables last).
# Logs under $OUT when set. Usage: bash tests/gpu_quant.sh [bench args...]
OUT=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -m gpu -s \
    tests/test_quant_linear.py tests/test_quant_moe.py 2>&1 | tee "$OUT/tests.log" | tail -20
timeout ${BENCH_TIMEOUT:-240} python3 -m mlapipe.kernels.bench quant "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^\['"
