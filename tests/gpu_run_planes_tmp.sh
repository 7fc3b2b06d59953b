bash tests/gpu_check_and_bench.sh planes-kernels >/dev/null 2>&1; cat /tmp/out/planes_tests.log
grep -v "^\['" /tmp/out/bench_planes_kernels.log | grep -i "planes\|all (sum)" | head -60
export PYTHONPATH=/tmp/site:/tmp/pyroot
timeout 150 python3 -m mlapipe.kernels.bench quant --types q8_0 --models v3 --layouts planes --sweep q8_0 --no-dense --no-moe 2>&1 | grep -v "^\['" | tail -20
