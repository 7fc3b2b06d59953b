"""GPU benchmarks: `python -m mlapipe.kernels.bench attention|moe`. Each checks correctness first, then prints a table."""
