"""Benchmark 5, worker memory: does a long-lived worker's RSS stay flat over 1,000 jobs?

A worker keeps its model loaded for days, so anything it keeps per job (rq's job objects, results,
logging, caches, allocator fragmentation from photos of different sizes) shows up only as slow growth.
This runs a real `depthq work` process (the tiny torch DepthPro, on CPU) against a private Redis,
feeds it distinct photos through the producer's Enqueuer, and reads the worker's RSS from /proc.

The baseline is the worker's own RSS after warm-up (the first jobs fill caches, thread pools and the
allocator's arenas once): the goal is that it grows by no more than 5 % from there to the last job.

RSS moves by a few MiB as allocator arenas are taken and given back, so it cannot see a leak of a
few KiB a job, which would still cost gigabytes over a million photos. A second pass runs the same
worker in this process under tracemalloc, which counts live Python and numpy allocations exactly,
and reports the bytes gained per job and where (torch's own CPU buffers are not seen there).
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import yaml
from redis import Redis
from rq import Worker

from bench.common import console, machine, print_table, private_redis, verdict
from depthq.config import ENV_PREFIX, Config, load_config
from depthq.contract import make_queue
from producer.enqueue import Enqueuer

JOBS = 1000
QUICK_JOBS = 200
# Jobs done before the baseline is taken: model warm-up is one forward, but the job path's first
# calls (JPEG and PNG codecs, rq's code paths, numpy and torch scratch buffers) come later.
WARMUP_JOBS = 50
SAMPLE_EVERY = 50
GOAL_GROWTH = 0.05
# The tracemalloc pass: tracing slows every allocation, so it looks at fewer jobs.
TRACED_JOBS = 200
QUICK_TRACED_JOBS = 50
TOP_SITES = 3
# Photo sizes cycled through: real folders mix landscape and portrait, and different shapes are what
# would fragment an allocator that a single size never exercises.
SIZES = ((320, 240), (240, 320), (360, 240))
POLL_S = 0.02
# No job finishing for this long means the worker is stuck or gone: stop instead of hanging.
STALL_S = 120.0
READY_TIMEOUT_S = 120.0


def _status_kib(pid: int, field: str) -> int:
    """A memory figure from /proc/<pid>/status (VmRSS: resident now; VmHWM: the peak), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def _prepare(root: Path, jobs: int, redis_url: str) -> Path:
    """A tiny model, `jobs` distinct photos and a config file naming them, under `root`."""
    from transformers.utils import logging as hf_logging

    from testkit.photos import write_jpeg
    from testkit.tiny_model import build_tiny_model

    hf_logging.disable_progress_bar()  # save_pretrained's bar would land in the middle of the tables
    model = build_tiny_model(root / "model")
    # A different seed each, so every photo is new content and a new job; 100 to a folder, as cameras do.
    for i in range(jobs):
        write_jpeg(root / "inbox" / f"{i // 100:02d}" / f"p{i:04d}.jpg", *SIZES[i % len(SIZES)], seed=i)
    config_path = root / "config.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "redis": {"url": redis_url},
                "producer": {"watch": str(root / "inbox")},
                "output": {"dir": str(root / "out")},
                "model": {"path": str(model), "device": "cpu", "cache_dir": str(root / "models")},
            }
        )
    )
    return config_path


def _photos(config: Config) -> list[Path]:
    return sorted(config.producer.watch.rglob("*.jpg"))


def _enqueue(config: Config, connection: Redis, photos: list[Path]) -> None:
    # A fresh Enqueuer each time: its hash cache is the producer's memory, not the worker's.
    enqueuer = Enqueuer(config, connection)
    for path in photos:
        outcome = enqueuer.submit(path).outcome
        if outcome != "enqueued":
            raise RuntimeError(f"{path}: expected a new job, got {outcome!r}")


def _worker_env() -> dict[str, str]:
    """This process's environment without DEPTHQ_ settings (the config file says everything)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


def _slope_kib_per_job(samples: list[tuple[int, int]]) -> float:
    """Least-squares slope of RSS over jobs done: a steady leak shows here even when the end is noisy."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mx = sum(x for x, _ in samples) / n
    my = sum(y for _, y in samples) / n
    sxx = sum((x - mx) ** 2 for x, _ in samples)
    return sum((x - mx) * (y - my) for x, y in samples) / sxx if sxx else 0.0


def measure_rss(jobs: int) -> dict[str, Any]:
    """Run one worker process over `jobs` photos; RSS samples every SAMPLE_EVERY jobs after warm-up."""
    with tempfile.TemporaryDirectory(prefix="depthq-bench-memory-") as tmp, private_redis() as redis_server:
        root = Path(tmp)
        config_path = _prepare(root, jobs, redis_server.url)
        config = load_config(config_path, environ={})
        connection = Redis.from_url(redis_server.url)
        log_path = root / "worker.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker", "--config", str(config_path)],
                env=_worker_env(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            try:
                return _drive(proc, config, connection, log_path)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)  # a warm shutdown: the worker leaves rq's records tidy
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                connection.close()


def _fail(proc: subprocess.Popen[bytes], log_path: Path, why: str) -> RuntimeError:
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
    return RuntimeError(f"{why} (worker pid {proc.pid}, exit {proc.poll()}); its log ends:\n{tail}")


def _drive(proc: subprocess.Popen[bytes], config: Config, connection: Redis, log_path: Path) -> dict[str, Any]:
    queue = make_queue(connection, config)
    photos = _photos(config)
    jobs = len(photos)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while Worker.count(connection=connection, queue=queue) == 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise _fail(proc, log_path, "the worker did not come up")
        time.sleep(0.1)
    # Registered means loaded and warmed up: what the worker costs before its first job.
    rss_loaded = _status_kib(proc.pid, "VmRSS")
    t0 = time.perf_counter()
    _enqueue(config, connection, photos)

    finished_key, failed_key = queue.finished_job_registry.key, queue.failed_job_registry.key
    samples: list[tuple[int, int]] = []
    next_sample = WARMUP_JOBS
    rss_max = 0
    last_done, last_progress = -1, time.monotonic()
    while True:
        with connection.pipeline(transaction=False) as pipe:
            pipe.zcard(finished_key)
            pipe.zcard(failed_key)
            finished, failed = pipe.execute()
        done = finished + failed
        if proc.poll() is not None:
            raise _fail(proc, log_path, f"the worker exited after {done} of {jobs} jobs")
        rss = _status_kib(proc.pid, "VmRSS")
        if done >= WARMUP_JOBS:
            rss_max = max(rss_max, rss)
        if done >= next_sample or done >= jobs:
            samples.append((done, rss))
            next_sample = (done // SAMPLE_EVERY + 1) * SAMPLE_EVERY
        if done >= jobs:
            break
        if done != last_done:
            last_done, last_progress = done, time.monotonic()
        elif time.monotonic() - last_progress > STALL_S:
            raise _fail(proc, log_path, f"no job finished for {STALL_S:.0f} s ({done} of {jobs} done)")
        time.sleep(POLL_S)
    wall_s = time.perf_counter() - t0
    rss_warm, rss_end = samples[0][1], samples[-1][1]
    growth = (rss_end - rss_warm) / rss_warm
    return {
        "jobs": jobs,
        "failed": failed,
        "wall_s": wall_s,
        "jobs_per_s": jobs / wall_s,
        "rss_loaded_kib": rss_loaded,
        "rss_warm_kib": rss_warm,
        "rss_end_kib": rss_end,
        "rss_max_kib": rss_max,
        "growth": growth,
        "slope_kib_per_job": _slope_kib_per_job(samples),
        "samples": samples,
        "goal_met": growth <= GOAL_GROWTH,
    }


def measure_python_heap(jobs: int) -> dict[str, Any]:
    """The same worker in this process under tracemalloc: live bytes gained per job after warm-up.

    The traced jobs are split in two windows. A leak costs the same in both; what the first jobs
    after warm-up fill once (interned strings, free lists, lazily built caches) shows in the first only.
    """
    from worker.worker import build_worker, load_backend

    with tempfile.TemporaryDirectory(prefix="depthq-bench-heap-") as tmp, private_redis() as redis_server:
        root = Path(tmp)
        config = load_config(_prepare(root, WARMUP_JOBS + jobs, redis_server.url), environ={})
        connection = Redis.from_url(redis_server.url)
        backend, _ = load_backend(config)
        # Names, not Path objects: a Path kept here caches its string on first use, inside a window.
        names = [str(p) for p in _photos(config)]
        half = WARMUP_JOBS + jobs // 2
        batches = [names[:WARMUP_JOBS], names[WARMUP_JOBS:half], names[half:]]

        def serve(batch: list[str]) -> None:
            _enqueue(config, connection, [Path(n) for n in batch])
            # One worker per batch, as `work(burst=True)` unregisters itself; the backend stays loaded.
            build_worker(config, connection, backend).work(burst=True, logging_level="WARNING")

        # Neither the snapshots kept here nor this module's own lists are the worker's memory.
        own = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
        snapshots = []
        tracemalloc.start()
        try:
            for batch in batches:
                serve(batch)
                gc.collect()
                snapshots.append(tracemalloc.take_snapshot().filter_traces(own))
        finally:
            tracemalloc.stop()
            connection.close()
    windows = []
    for batch, before, after in zip(batches[1:], snapshots[:-1], snapshots[1:], strict=True):
        diff = after.compare_to(before, "lineno")
        top = sorted(diff, key=lambda d: d.size_diff, reverse=True)[:TOP_SITES]
        windows.append(
            {
                "jobs": (names.index(batch[0]), names.index(batch[-1]) + 1),
                "bytes_per_job": sum(d.size_diff for d in diff) / len(batch),
                "top_sites": [
                    (f"{Path(d.traceback[0].filename).name}:{d.traceback[0].lineno}", d.size_diff / len(batch))
                    for d in top
                ],
            }
        )
    return {"windows": windows}


def run(quick: bool = False) -> dict[str, Any]:
    """RSS of one `depthq work` process over 1,000 jobs (200 with --quick), against its own warm-up."""
    console.print(machine())
    jobs = QUICK_JOBS if quick else JOBS
    r = measure_rss(jobs)
    heap = measure_python_heap(QUICK_TRACED_JOBS if quick else TRACED_JOBS)
    r["python_heap"] = heap
    warm = r["rss_warm_kib"]
    print_table(
        f"Worker memory: RSS of one `python -m worker` over {jobs} distinct photos",
        ["jobs done", "RSS", "vs after warm-up"],
        [(done, _mib(kib), f"{(kib - warm) / warm * 100:+.1f} %") for done, kib in r["samples"]],
    )
    rows: list[tuple[Any, ...]] = [
        ("RSS loaded, before the first job", _mib(r["rss_loaded_kib"]), "", ""),
        (f"RSS after warm-up ({r['samples'][0][0]} jobs)", _mib(warm), "baseline", ""),
        (f"RSS at the end ({r['samples'][-1][0]} jobs)", _mib(r["rss_end_kib"]), "", ""),
        (
            "growth after warm-up",
            f"{r['growth'] * 100:+.1f} %",
            f"<= {GOAL_GROWTH * 100:.0f} %",
            verdict(r["goal_met"]),
        ),
        (
            "max RSS after warm-up",
            f"{_mib(r['rss_max_kib'])} ({(r['rss_max_kib'] - warm) / warm * 100:+.1f} %)",
            "",
            "",
        ),
        ("RSS trend (least squares)", f"{r['slope_kib_per_job']:+.2f} KiB/job", "", ""),
        ("failed jobs", r["failed"], "0", verdict(r["failed"] == 0)),
        ("throughput (shared box)", f"{r['jobs_per_s']:.1f} jobs/s", "", ""),
    ]
    for window in heap["windows"]:
        first, last = window["jobs"]
        rows.append((f"Python heap per job, jobs {first}-{last} (traced)", f"{window['bytes_per_job']:+.0f} B", "", ""))
        rows += [(f"  of which {site}", f"{per_job:+.0f} B", "", "") for site, per_job in window["top_sites"]]
    print_table(
        "Worker memory: figures and goals (tiny torch DepthPro on CPU)", ["figure", "value", "goal", "verdict"], rows
    )
    return r
