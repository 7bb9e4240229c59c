"""A stand-in for DepthPro, so a benchmark measures depthq's own costs and not the model's.

`StandInBackend` implements `worker.backends.base.Backend`: `predict` runs the real preprocessing
(`worker.preprocess.model_input`), then sleeps where the accelerator would compute, and returns a
fixed prediction. A sleep needs no CPU, so eight stand-in workers on a 2-core machine behave like
eight hosts whose accelerator does the work, and what is left is depthq's and rq's own time. Everything
around `predict` is the real job: decode, metric depth at full resolution, preview, atomic writes, the
Redis bookkeeping. With `accelerator_lock`, stand-ins on one host take turns at sleeping, as processes
sharing one GPU or Neural Engine take turns at it.

It lives only in bench/: `worker.backend` in config.yaml cannot name it, so no deployment can pick it.

`python -m bench.standin` is one stand-in worker: the real `DepthWorker` from `build_worker`, a fresh
process (nothing forks once a backend is loaded), SIGTERM for a warm shutdown as with `depthq work`.
The rest of this module is how a benchmark runs a fleet of them and reads back when each job ran.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np
from redis import Redis
from rq.job import Job
from rq.worker_registration import get_keys

from depthq.config import Config, load_config
from depthq.contract import SERIALIZER, make_queue
from depthq.logs import configure_logging
from worker.backends.base import Prediction
from worker.preprocess import model_input
from worker.worker import run

DEFAULT_SLEEP_S = 0.300
# Small, so the prediction and its resize cost next to nothing in the coordination benchmark;
# the overlap benchmark passes DepthPro's own 1536 so that preprocessing costs what it really does.
DEFAULT_INPUT_SIZE = 64
FOV_DEG = 60.0
# Canonical inverse depth at FOV 60 degrees for depths of about 0.5 m to 50 m.
_INVERSE_DEPTH_RANGE = (0.0175, 1.7)
_ROOT = Path(__file__).resolve().parents[1]


def smooth_inverse_depth(size: int, seed: int = 0) -> np.ndarray:
    """A fixed, smooth (size, size) canonical inverse depth: a constant one would make the preview PNG
    compress to almost nothing, and its encoding cost less than a real depth map's."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(*_INVERSE_DEPTH_RANGE, (8, 8)).astype(np.float32)
    smooth = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(smooth, *_INVERSE_DEPTH_RANGE).astype(np.float32)


class StandInBackend:
    """Real preprocessing, then `sleep_s` of no CPU where the model would run, then a fixed answer."""

    name = "standin"
    device = "sleep"
    warnings: tuple[str, ...] = ()

    def __init__(
        self,
        sleep_s: float = DEFAULT_SLEEP_S,
        input_size: int = DEFAULT_INPUT_SIZE,
        accelerator_lock: Path | None = None,
    ):
        self.sleep_s = sleep_s
        self.input_size = input_size
        self.accelerator_lock = accelerator_lock
        self.model_name = f"standin-{round(sleep_s * 1000)}ms"
        self._lock_file: IO[bytes] | None = None
        self._inverse = smooth_inverse_depth(input_size)

    def load(self) -> None:
        """Nothing to load; the lock file is opened once, as a model would be."""
        if self.accelerator_lock is not None:
            self._lock_file = self.accelerator_lock.open("ab")

    def predict(self, rgb: np.ndarray) -> Prediction:
        # The model's input is computed and dropped: its cost is the real one, its value is not needed.
        model_input(rgb, self.input_size)
        with self._accelerator():
            time.sleep(self.sleep_s)
        return Prediction(inverse_depth=self._inverse, fov_deg=FOV_DEG)

    @contextlib.contextmanager
    def _accelerator(self) -> Iterator[None]:
        """One process at a time when the host has one accelerator (flock: released if the process dies)."""
        if self._lock_file is None:
            yield
            return
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)


def worker_config(redis_url: str, watch: Path, output: Path) -> Config:
    """depthq's defaults with this Redis and these folders, whatever config.yaml or DEPTHQ_* say here."""
    with tempfile.TemporaryDirectory(prefix="depthq-bench-config-") as tmp:
        empty = Path(tmp) / "config.yaml"
        empty.write_text("{}\n")
        return load_config(
            empty,
            overrides={"redis": {"url": redis_url}, "producer": {"watch": str(watch)}, "output": {"dir": str(output)}},
            environ={},
        )


def main(argv: Sequence[str] | None = None) -> int:
    """One stand-in worker: `depthq work` itself, with the stand-in in place of the model."""
    parser = argparse.ArgumentParser(prog="python -m bench.standin", description=main.__doc__)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--watch", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--sleep-ms", type=float, default=DEFAULT_SLEEP_S * 1000)
    parser.add_argument("--input-size", type=int, default=DEFAULT_INPUT_SIZE, help="side of the model input")
    parser.add_argument("--accelerator-lock", type=Path, help="a file whose flock makes stand-ins take turns")
    parser.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)

    configure_logging(args.log_level)
    config = worker_config(args.redis_url, args.watch, args.output)
    run(
        config, burst=args.burst, backend=StandInBackend(args.sleep_ms / 1000.0, args.input_size, args.accelerator_lock)
    )
    return 0


@dataclass(frozen=True)
class JobRun:
    """When one job ran, by rq's own clock (UTC): `started_at` is set after rq's bookkeeping, so the
    time between a worker's jobs is rq's per-job cost, and the time inside is depthq's job."""

    job_id: str
    worker: str
    started_at: datetime
    ended_at: datetime
    result: dict[str, Any]

    @property
    def seconds(self) -> float:
        return (self.ended_at - self.started_at).total_seconds()


def start_workers(
    n: int,
    redis_url: str,
    watch: Path,
    output: Path,
    logs: Path,
    sleep_s: float = DEFAULT_SLEEP_S,
    input_size: int = DEFAULT_INPUT_SIZE,
    accelerator_lock: Path | None = None,
) -> list[subprocess.Popen[bytes]]:
    """N fresh interpreters (never forks of this one), each logging to its own file under `logs`."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
    cmd = [
        sys.executable,
        "-m",
        "bench.standin",
        "--redis-url",
        redis_url,
        "--watch",
        str(watch),
        "--output",
        str(output),
        "--sleep-ms",
        str(sleep_s * 1000),
        "--input-size",
        str(input_size),
    ]
    if accelerator_lock is not None:
        cmd += ["--accelerator-lock", str(accelerator_lock)]
    procs = []
    for i in range(n):
        with (logs / f"worker-{i}.log").open("wb") as log_file:
            procs.append(
                subprocess.Popen(cmd, cwd=_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
            )
    return procs


def wait_registered(
    connection: Redis, config: Config, procs: Sequence[subprocess.Popen[bytes]], logs: Path, timeout_s: float = 120.0
) -> float:
    """Block until every worker has loaded, warmed up and registered with rq; the seconds that took."""
    queue = make_queue(connection, config)
    t0 = time.monotonic()
    while len(get_keys(queue)) < len(procs):
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() - t0 > timeout_s:
            tails = "\n".join(f.read_text(errors="replace")[-2000:] for f in sorted(logs.glob("worker-*.log")))
            raise RuntimeError(f"{len(dead)} stand-in worker(s) exited or none registered in time:\n{tails}")
        time.sleep(0.05)
    return time.monotonic() - t0


def stop_workers(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 20.0) -> None:
    """SIGTERM, rq's warm shutdown; SIGKILL only for one that does not stop in time."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a live process has used so far; None where /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Fleet:
    procs: list[subprocess.Popen[bytes]]
    warm_s: float  # start to every worker registered: imports, backend load and warm-up

    def cpu_s(self) -> float | None:
        """The workers' CPU seconds so far, all together."""
        each = [cpu_s(p.pid) for p in self.procs]
        return None if any(c is None for c in each) else sum(c for c in each if c is not None)


@contextlib.contextmanager
def fleet(n: int, redis_url: str, config: Config, logs: Path, **kwargs: Any) -> Iterator[Fleet]:
    """N stand-in workers, registered and idle on entry, stopped (warm shutdown) on exit."""
    procs = start_workers(n, redis_url, config.producer.watch, config.output.dir, logs, **kwargs)
    try:
        with Redis.from_url(redis_url) as connection:
            yield Fleet(procs, wait_registered(connection, config, procs, logs))
    finally:
        stop_workers(procs)


def wait_done(
    connection: Redis, config: Config, job_ids: Sequence[str], timeout_s: float, poll_s: float = 0.2
) -> list[JobRun]:
    """Block until every job has finished; their runs, in order of start. Raises if one failed.

    It polls two counters, not the jobs, so that waiting costs the workers' CPU next to nothing.
    """
    queue = make_queue(connection, config)
    finished, failed = queue.finished_job_registry.key, queue.failed_job_registry.key
    deadline = time.monotonic() + timeout_s
    while True:
        with connection.pipeline(transaction=False) as pipe:
            pipe.zcard(finished)
            pipe.zcard(failed)
            n_finished, n_failed = pipe.execute()
        if n_failed:
            raise RuntimeError(f"{n_failed} job(s) failed; see the workers' logs")
        if n_finished >= len(job_ids):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(job_ids) - n_finished} of {len(job_ids)} jobs not finished in {timeout_s:.0f} s")
        time.sleep(poll_s)
    runs = []
    for job in Job.fetch_many(job_ids, connection=connection, serializer=SERIALIZER):
        assert job is not None and job.started_at is not None and job.ended_at is not None
        runs.append(JobRun(job.id, job.worker_name or "?", job.started_at, job.ended_at, job.return_value() or {}))
    return sorted(runs, key=lambda r: r.started_at)


def span_s(runs: Sequence[JobRun]) -> float:
    """First job's start to last job's end: the fleet's working time, without process start-up."""
    return (max(r.ended_at for r in runs) - min(r.started_at for r in runs)).total_seconds()


def gaps_s(runs: Sequence[JobRun]) -> list[float]:
    """Per worker, the time from one job's end to its next job's start: rq's bookkeeping and dequeue."""
    by_worker: dict[str, list[JobRun]] = {}
    for r in runs:
        by_worker.setdefault(r.worker, []).append(r)
    out = []
    for own in by_worker.values():
        own.sort(key=lambda r: r.started_at)
        out += [(b.started_at - a.ended_at).total_seconds() for a, b in itertools.pairwise(own)]
    return out


if __name__ == "__main__":
    sys.exit(main())
