"""Benchmark 2, coordination efficiency: do N workers finish N times as many photos as one model could?

Each worker's model is the 300 ms stand-in (bench.standin), which needs no CPU, so the ideal is
exactly N / 0.3 s jobs per second; what falls short of it is depthq's and rq's own time per job: the
job's Redis round trips and small-photo CPU, rq's bookkeeping and dequeue between jobs. The photos
are 64x48 JPEGs, so the real decode and writes are small, as they would be next to a real model.

Two Redis settings, side by side: `appendfsync everysec`, what `depthq up`'s embedded Redis and
deploy/redis/redis.conf use, and `appendfsync always` (every write waits for a disk flush), which the
embedded Redis used until this benchmark showed its cost. rq and the job make about 25 Redis round
trips per job, most of them writes, so the difference between the two is what those flushes cost.

How it is timed: the N stand-in workers are separate, fresh processes on a private redis-server,
registered and idle before the first job is enqueued (through the real `Enqueuer.submit`). The
throughput is the jobs over the time from the first job's start to the last job's end, by rq's own
`started_at`/`ended_at`, so process start-up is not counted. The baseline measured in the same run
is N = 1: `vs N x 1` says how much of the shortfall is coordination between workers rather
than a cost every job pays anyway.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from redis import Redis

from bench.common import console, machine, median, ms, p95, print_table, private_redis, verdict
from bench.standin import DEFAULT_SLEEP_S, JobRun, fleet, gaps_s, span_s, wait_done, worker_config
from producer.enqueue import Enqueuer
from testkit.photos import write_jpeg

GOAL = 0.95
# Redis's appendfsync: what depthq uses everywhere, then fsync on every write for comparison.
FSYNC_MODES = {"everysec": "everysec (depthq up, deploy/redis)", "always": "always (for comparison)"}
WORKERS = (1, 2, 4, 8)
# Per N, about this much model time per worker: long enough that start and end effects are small.
SECONDS_OF_WORK = 6.0
QUICK_SECONDS_OF_WORK = 1.5


def _one(n: int, jobs: int, fsync: str, redis_url: str, connection: Redis, root: Path) -> dict[str, Any]:
    """N workers, `jobs` photos: the figures of one row."""
    connection.flushall()
    connection.config_set("appendfsync", fsync)
    config = worker_config(redis_url, root / "inbox", root / "out")
    photos = [write_jpeg(root / "inbox" / f"p{i:04d}.jpg", seed=i) for i in range(jobs)]
    with fleet(n, redis_url, config, root / "logs") as workers:
        enqueuer = Enqueuer(config, connection)
        cpu0 = workers.cpu_s()
        t0 = time.perf_counter()
        submitted = [enqueuer.submit(p) for p in photos]
        enqueue_s = time.perf_counter() - t0
        if any(s.outcome != "enqueued" for s in submitted):
            raise RuntimeError(f"not all photos were enqueued: {[s.outcome for s in submitted]}")
        runs = wait_done(connection, config, [s.job_id for s in submitted], timeout_s=60 + 5 * jobs * DEFAULT_SLEEP_S)
        cpu1 = workers.cpu_s()
    cpu_per_job = (cpu1 - cpu0) / jobs if cpu0 is not None and cpu1 is not None else None
    return {"fsync": fsync, "cpu_per_job_s": cpu_per_job, **_figures(n, runs, workers.warm_s, enqueue_s)}


def _figures(n: int, runs: list[JobRun], warm_s: float, enqueue_s: float) -> dict[str, Any]:
    seconds = span_s(runs)
    jobs_per_s = len(runs) / seconds
    ideal = n / DEFAULT_SLEEP_S
    gaps = gaps_s(runs)
    inside = [r.seconds for r in runs]
    timed = [r.result.get("timings_ms", {}) for r in runs]
    # What the job's own timings leave out: the sidecar write, the stage saves and the completion record.
    untimed = [r.seconds - (t["total"] - t["queue_wait"]) / 1000 for r, t in zip(runs, timed, strict=True)]
    return {
        "workers": n,
        "jobs": len(runs),
        "seconds": seconds,
        "jobs_per_s": jobs_per_s,
        "ideal_jobs_per_s": ideal,
        "efficiency": jobs_per_s / ideal,
        "met": jobs_per_s / ideal >= GOAL,
        "per_job_s": seconds * n / len(runs),
        "job_median_s": median(inside),
        "job_mean_s": statistics.fmean(inside),
        "job_p95_s": p95(inside),
        "between_jobs_median_s": median(gaps) if gaps else 0.0,
        "between_jobs_mean_s": statistics.fmean(gaps) if gaps else 0.0,
        "between_jobs_p95_s": p95(gaps) if gaps else 0.0,
        "decode_median_ms": median([t["decode"] for t in timed]),
        "inference_over_sleep_median_ms": median([t["inference"] for t in timed]) - DEFAULT_SLEEP_S * 1000,
        "postprocess_median_ms": median([t["postprocess"] for t in timed]),
        "write_median_ms": median([t["write"] for t in timed]),
        "untimed_in_job_median_s": median(untimed),
        # One worker's cycle, job plus the gap to its next: what a never-ending queue would see.
        "steady_efficiency": DEFAULT_SLEEP_S / (statistics.fmean(inside) + (statistics.fmean(gaps) if gaps else 0.0)),
        # The batch's start and end: workers that finish their last job wait for the others.
        "batch_edges_per_job_s": seconds * n / len(runs) - statistics.fmean(inside) - sum(gaps) / len(runs),
        "warm_s": warm_s,
        "enqueue_s": enqueue_s,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Throughput of 1, 2, 4 and 8 stand-in workers against N / 0.3 s, and where the rest goes."""
    where = machine()
    console.print(where)
    per_worker = math.ceil((QUICK_SECONDS_OF_WORK if quick else SECONDS_OF_WORK) / DEFAULT_SLEEP_S)
    rows: list[dict[str, Any]] = []
    with private_redis() as server, tempfile.TemporaryDirectory(prefix="depthq-bench-coord-") as tmp:
        connection = Redis.from_url(server.url)
        try:
            for fsync in FSYNC_MODES:
                for n in WORKERS:
                    root = Path(tmp) / f"{fsync}-{n}"
                    rows.append(_one(n, n * per_worker, fsync, server.url, connection, root))
        finally:
            connection.close()
    for row in rows:
        one = next(r for r in rows if r["fsync"] == row["fsync"] and r["workers"] == 1)
        row["vs_n_times_one"] = row["jobs_per_s"] / (row["workers"] * one["jobs_per_s"])
    print_table(
        f"Coordination efficiency: {DEFAULT_SLEEP_S * 1000:.0f} ms stand-in model, 64x48 JPEGs, "
        "first job start to last job end",
        [
            "redis appendfsync",
            "workers",
            "jobs",
            "seconds",
            "jobs/s",
            "ideal",
            "efficiency",
            "goal",
            "",
            "vs N x 1",
            "enqueued/s",
        ],
        [
            [
                FSYNC_MODES[r["fsync"]],
                r["workers"],
                r["jobs"],
                f"{r['seconds']:.2f}",
                f"{r['jobs_per_s']:.2f}",
                f"{r['ideal_jobs_per_s']:.2f}",
                f"{r['efficiency']:.3f}",
                f">= {GOAL}",
                verdict(r["met"]),
                f"{r['vs_n_times_one']:.3f}",
                f"{r['jobs'] / r['enqueue_s']:.0f}",
            ]
            for r in rows
        ],
    )
    print_table(
        "Where each job's time goes beyond the model's 300 ms (means; file writes: median)",
        [
            "redis appendfsync",
            "workers",
            "per job",
            "beyond model",
            "in the job",
            "file writes",
            "between jobs",
            "p95",
            "batch edges",
            "steady state",
            "CPU",
        ],
        [
            [
                FSYNC_MODES[r["fsync"]],
                r["workers"],
                ms(r["per_job_s"]),
                ms(r["per_job_s"] - DEFAULT_SLEEP_S),
                ms(r["job_mean_s"] - DEFAULT_SLEEP_S),
                f"{r['write_median_ms']:.1f} ms",
                ms(r["between_jobs_mean_s"]),
                ms(r["between_jobs_p95_s"]),
                ms(r["batch_edges_per_job_s"]),
                f"{r['steady_efficiency']:.3f}",
                "-" if r["cpu_per_job_s"] is None else ms(r["cpu_per_job_s"]),
            ]
            for r in rows
        ],
    )
    console.print(
        "vs N x 1: against N times the one-worker row, measured in the same run. enqueued/s: how fast the "
        "producer put the jobs in (it must stay ahead of jobs/s, or the workers wait for it). "
        "per job: the fleet's seconds x workers / jobs. in the job: rq's started_at to ended_at, beyond the "
        "model (decode, preprocessing, stage saves, postprocess, writes, completion record). between jobs: "
        "one worker's ended_at to its next started_at (rq's success bookkeeping, heartbeats, dequeue, "
        "execution set-up). batch edges: the rest of per job, from the batch's first and last jobs (workers "
        "that finish early wait for the last). steady state: the efficiency of one worker's cycle (job + gap), "
        "as a queue that never empties would see it. CPU: the workers' CPU time per job (user + system)."
    )
    return {"machine": where, "goal": GOAL, "sleep_s": DEFAULT_SLEEP_S, "quick": quick, "rows": rows}
