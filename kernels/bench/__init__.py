"""GPU benchmarks: `python -m kernels.bench attention|moe`. Each checks correctness first, then prints a table."""
