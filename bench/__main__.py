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
    "video": "bench.video",
    "soak": "bench.soak",
}
# Run only when named: minutes by design, with options of their own (`python -m bench soak --minutes 5`).
ON_REQUEST = {"soak"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ON_REQUEST:  # its own options, and its own --help
        quick = "--quick" in argv
        result = importlib.import_module(BENCHMARKS[argv[0]]).run(quick, [a for a in argv[1:] if a != "--quick"])
        return 1 if isinstance(result, dict) and result.get("ok") is False else 0
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", default=["all"], help=f"all, or any of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: a smoke run, not figures to quote")
    args, rest = parser.parse_known_args(argv)
    names = [n for n in BENCHMARKS if n not in ON_REQUEST] if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    if rest and names != ["soak"]:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (only `soak`, run alone, takes options of its own)")
    status = 0
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        print(f"\n== {name} ==", flush=True)
        result = module.run(quick=args.quick, argv=rest) if name in ON_REQUEST else module.run(quick=args.quick)
        if isinstance(result, dict) and result.get("ok") is False:
            status = 1  # a benchmark with a verdict (the soak) failed it
    return status


if __name__ == "__main__":
    sys.exit(main())
