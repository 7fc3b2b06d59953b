import importlib
import sys

SUITES = {
    "attention": "mlapipe.kernels.bench.attention",
    "moe": "mlapipe.kernels.bench.moe",
    "quant": "mlapipe.kernels.bench.quant",
    "dequant": "mlapipe.kernels.bench.dequant",
    "sass": "mlapipe.kernels.bench.sass",  # no GPU needed: compiles for sm_90
}


def main() -> None:
    names = sys.argv[1:2] or list(SUITES)
    for name in names:
        if name not in SUITES:
            sys.exit(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    rest = sys.argv[2:]
    for name in names:
        importlib.import_module(SUITES[name]).main(rest)


if __name__ == "__main__":
    main()
