"""What the tests and the benchmarks both build their runs from: photos, tiny models, several hosts on
one machine, waiting, and the watcher run in a thread.

It exists so that neither imports the other: `bench/` used to reach into `tests/` for these, and a test
into a benchmark for its photos, which tied a benchmark to the test suite's layout and a test to a
benchmark's. Both import this package instead; `tests/` imports `bench/` only to test `bench/` itself.

It is not part of what depthq installs (pyproject's package list names depthq, producer and worker
only): the tests and `python -m bench` import it from the repository root, and nothing in depthq,
producer or worker may import it.
"""
