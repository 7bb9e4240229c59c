"""`python -m bench [NAME ...]`: run benchmarks by name, or `all`, printing each one's table."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module in this package, in the order `all` runs them (cheap ones first).
BENCHMARKS = {
    "overhead": "bench.overhead",
    "coordination": "bench.coordination",
    "latency": "bench.latency",
    "burst": "bench.burst",
    "memory": "bench.memory",
    "overlap": "bench.overlap",
    "scaleout": "bench.scaleout",
    "gpu": "bench.gpu",
    "convert": "bench.convert",
    "archive": "bench.archive",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", default=["all"], help=f"all, or any of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: a smoke run, not figures to quote")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        print(f"\n== {name} ==", flush=True)
        module.run(quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
