"""The chaos soak (bench/soak.py), short: `depthq up` under each of the seven faults once, then every end state.

The same code as `python -m bench soak`, with its durations cut to fit CI: about a minute and a half
of files written the ways users write them, while a worker is SIGKILLed, a worker SIGSTOPped past
`worker.dead_after_s`, the embedded Redis SIGKILLed, the output tmpfs filled for 10 s, and `depthq up`
SIGKILLed and SIGTERMed and started again, and a worker is SIGKILLed in the middle of a clip's chunk.
Then it drains and asserts what the soak asserts: the
audit finds nothing lost, stale, partial, duplicated or temporary; every file the soak wrote has the
output its content calls for; the failed registries hold only bad files; nothing was computed twice
unless a fault hit its worker; `depthq up` never exited by itself; after the final SIGTERM nothing of
it is left and the tmpfs unmounts.

Needs root, for the tmpfs: skipped without it, unless TEST_REQUIRE_TOOLS=1 (CI), which fails instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.soak import SoakOptions, soak
from bench.soak_faults import FAULTS
from bench.soak_service import tmpfs_unavailable_reason

REQUIRE_TOOLS = os.environ.get("TEST_REQUIRE_TOOLS") == "1"
# The whole test: the soak bounds itself to BUDGET_S (its waits are cut to fit, and it keeps time
# for its own cleanup); the timeout only catches a soak that hangs despite that.
BUDGET_S = 240.0

CI_SOAK = SoakOptions(
    minutes=1.5,
    transport="shared",
    workers=2,
    seed=21,
    faults=tuple(FAULTS),
    files_per_min=60.0,
    stop_s=12.0,  # past dead_after_s (10): depthq up kills and replaces the stopped worker
    disk_full_s=10.0,
    # Bounds on waits, not goals: the test shares the machine with another test process.
    recover_timeout_s=60.0,
    drain_timeout_s=90.0,
    start_timeout_s=60.0,
    tmpfs_mb=256,
    rescan_s=10,
    warmup_s=6.0,
    tail_s=0.0,
    budget_s=BUDGET_S,
    echo=False,
)


@pytest.mark.timeout(BUDGET_S + 15)
def test_soak_survives_every_fault_and_loses_nothing() -> None:
    reason = tmpfs_unavailable_reason()
    if reason is not None:
        if REQUIRE_TOOLS:
            pytest.fail(f"{reason}, and TEST_REQUIRE_TOOLS=1 asks for every check")
        pytest.skip(reason)
    report = soak(CI_SOAK)
    assert [run.name for run in report.faults] == list(FAULTS)
    assert report.counts["files written"] > 50, report.counts
    assert report.counts["bad"] + report.counts["good"] == report.counts["present at the end"]
    assert report.ok, "\n" + report.failures()


def test_long_names_reach_the_file_systems_limit_exactly() -> None:
    """The long-name pattern hits 255 bytes exactly, extension and multi-byte characters included."""
    import random

    from bench.soak_load import LONG_MIN, NAME_MAX, long_name

    rng = random.Random(0)
    for length in (LONG_MIN, 230, NAME_MAX - 1, NAME_MAX):
        name = long_name(rng, 7, length)
        assert len(name.encode()) == length and name.endswith(".jpg")
        assert len(name) < length  # some characters take more than one byte


def test_a_computation_is_read_from_the_workers_log_line(tmp_path: Path) -> None:
    """The line `worker.job` logs per computed photo, with and without the job id, and a source with ': ' in it."""
    from bench.soak_checks import computations
    from bench.soak_record import Timeline

    log = tmp_path / "up-1.log"
    log.write_text(
        "2026-05-01 12:00:00,250 INFO    MainProcess[4242] worker.job: a: b/東京 1.jpg: depth 1.73-1.73 m, "
        "{'queue_wait': 1.0, 'total': 9.5} ms (job abc-123)\n"
        "2026-05-01 12:00:01,000 INFO    MainProcess[4243] worker.job: plain.jpg: depth 0.50-12.00 m, "
        "{'total': 3.0} ms\n"
        "2026-05-01 12:00:02,000 INFO    MainProcess[4243] worker.job: copy.jpg: depth copied from x.jpg, "
        "{} ms (job d)\n"
        "2026-05-01 12:00:03,000 INFO    MainProcess[4243] producer.enqueue: enqueued x.jpg as job e\n"
    )
    found = computations([log], Timeline())
    assert [(c.source, c.job, c.pid) for c in found] == [
        ("a: b/東京 1.jpg", "abc-123", 4242),
        ("plain.jpg", None, 4243),
    ]
    assert found[1].at - found[0].at == pytest.approx(0.75)
