"""depthq's benchmarks: each prints its figures next to a baseline measured in the same run.

Run them with `python -m bench NAME` (or `all`). They are not tests: nothing here asserts a timing.
"""
