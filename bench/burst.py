"""Benchmark 4, burst: 10,000 photos dropped at once; how fast does the producer enqueue them, exactly once?

The real `Watcher` runs in a thread with a real `Enqueuer` on a private Redis, default settings
(`producer.settle_ms` 1000 ms included), logging at INFO to a file as `depthq watch` would. Photos
are small distinct byte strings named `.jpg`: the producer hashes a photo, it never decodes one.
Three ways a burst reaches it:
- start-up rescan: the photos are already there when the producer starts (it was down, or restarted);
  the start-up scan finds them and they wait `settle_ms`, as every photo found by a scan does;
- live drop: the watcher is running; every photo was written as `x.jpg.part` and is renamed into
  place at once by another process (what rsync, browsers and sync tools do), so each arrives as a
  rename event. 10,000 renames are 20,000 inotify events, more than the kernel queues by default
  (fs.inotify.max_queued_events, 16,384) unless watchdog reads them as fast as they come; when it
  overflows, the watcher rescans at once;
- drop during start-up: the same renames, started together with the producer, so most photos are
  seen twice, by an event and by the start-up scan: the case where a photo could be enqueued twice.

Each is timed from its start (the producer's start, or the first rename) to the moment Redis holds
10,000 jobs; then the check: exactly 10,000 jobs in the queue, 10,000 distinct ids, 10,000 job
hashes in Redis, the ids those of the photos' contents, each job naming its own photo.

Baselines, measured in the same run on the same photos, without a watcher or settle_ms:
- one by one: `Enqueuer.submit` per photo, the path every photo took before `submit_many`, and still
  the one for anything unusual (an existing job, a copy, a refusal);
- rq floor: rq's `Queue.enqueue(unique=True)` per job, payloads computed beforehand, nothing read from
  disk: the best any one-job-per-call design could do here, whatever the producer does around it;
- batched: `Enqueuer.submit_many` on the same photos, like for like with "one by one";
- and a ceiling for the live drop: the same renames reported by watchdog to a handler that only
  counts them, how fast watchdog alone delivers them.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import Redis
from rq import Queue
from rq.job import Job
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from bench.common import console, machine, print_table, private_redis, verdict
from depthq.config import Config, load_config
from depthq.contract import LANES, SERIALIZER, JobPayload, job_id, make_queue
from producer.enqueue import Enqueuer
from producer.metrics import ProducerMetrics
from producer.watcher import Watcher

PHOTOS = 10_000
QUICK_PHOTOS = 1_000
GOAL_FILES_PER_S = 1_000.0
PHOTO_BYTES = 2048
# Bounds a failure (photos never enqueued), not a timing: the goal is ten seconds for 10,000.
TIMEOUT_S = 180.0
POLL_S = 0.01
# After the last job: long enough for a photo the start-up scan also found to come due (settle_ms)
# and be turned away as a duplicate, so the check sees whatever a second enqueue would have done.
QUIET_S = 0.5
# How long the watchdog-alone baseline waits for events that may have been lost to an overflow.
WATCHDOG_PATIENCE_S = 30.0


@dataclass(frozen=True)
class Burst:
    """What one scenario produced: its time, and what Redis holds afterwards."""

    seconds: float
    queue_length: int
    distinct_ids: int
    job_hashes: int
    ids_expected: bool
    sources_expected: bool
    outcomes: dict[str, int]

    @property
    def exactly_once(self) -> bool:
        return self.ids_expected and self.sources_expected


def _photo(i: int) -> bytes:
    head = b"\xff\xd8\xff\xe0" + f"burst-{i}".encode()
    return head + bytes(PHOTO_BYTES - len(head))


def _write(folder: Path, count: int, suffix: str) -> dict[str, str]:
    """Write the photos (names + suffix); return each final name's expected job id."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for i in range(count):
        data = _photo(i)
        name = f"p{i:05d}.jpg"
        (folder / (name + suffix)).write_bytes(data)
        expected[name] = hashlib.sha256(data).hexdigest()
    return expected


def _config(root: Path, redis_url: str) -> Config:
    empty = root / "empty.yaml"
    empty.write_text("{}\n")
    return load_config(
        empty,
        environ={},
        overrides={
            "redis": {"url": redis_url},
            "producer": {"watch": str(root / "inbox")},
            "output": {"dir": str(root / "out")},
        },
    )


@contextmanager
def _producer_log(path: Path) -> Iterator[None]:
    """The producer's INFO lines (one per photo) go to a file, as `depthq watch` writes them somewhere."""
    logger = logging.getLogger("producer")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    saved = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {TIMEOUT_S:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def _lanes(enqueuer: Enqueuer) -> list[Queue]:
    """Both queues: photos events reported go live, what a scan finds goes to the backfill."""
    return [make_queue(enqueuer.connection, enqueuer.config, lane) for lane in LANES]


def _queued(enqueuer: Enqueuer) -> int:
    return sum(q.count for q in _lanes(enqueuer))


def _check(connection: Redis, queues: list[Queue], config: Config, expected: dict[str, str]) -> dict[str, Any]:
    """What Redis holds, against one job per photo content, each naming its own photo."""
    ids = [jid for queue in queues for jid in queue.get_job_ids()]
    want = {job_id(sha, config.model.path): name for name, sha in expected.items()}
    prefix = Job.redis_job_namespace_prefix
    hashes = {key.decode()[len(prefix) :] for key in connection.scan_iter(match=prefix + "*", count=1000)}
    jobs = Job.fetch_many(ids, connection=connection, serializer=SERIALIZER)
    named = {job.id: JobPayload.from_dict(job.args[0]).source for job in jobs if job is not None}
    return {
        "queue_length": len(ids),
        "distinct_ids": len(set(ids)),
        "job_hashes": len(hashes),
        "ids_expected": len(ids) == len(set(ids)) == len(want) and set(ids) == set(want) == hashes,
        "sources_expected": named == want,
    }


def _outcomes(metrics: ProducerMetrics) -> dict[str, int]:
    out = {}
    for metric in metrics.registry.collect():
        if metric.name == "depthq_producer_files":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["outcome"]] = int(sample.value)
    return out


# The writer is another program (rsync, a sync client), not a thread competing with the producer for
# this process's interpreter lock: it prints the time of its first rename, then renames them all.
_RENAMER = """
import os, sys, time
folder = sys.argv[1]
parts = sorted(n for n in os.listdir(folder) if n.endswith(".part"))
print(time.time(), flush=True)
for name in parts:
    os.replace(os.path.join(folder, name), os.path.join(folder, name[: -len(".part")]))
"""


def _rename_in(folder: Path) -> subprocess.Popen[str]:
    """Rename every `x.jpg.part` in folder to `x.jpg`, in another process, as fast as it can."""
    return subprocess.Popen([sys.executable, "-c", _RENAMER, str(folder)], stdout=subprocess.PIPE, text=True)


def watcher_burst(redis_url: str, photos: int, scenario: str) -> Burst:
    """One scenario: 'rescan', 'live' or 'during', as in the module docstring."""
    with tempfile.TemporaryDirectory(prefix="depthq-bench-burst-") as tmp:
        root = Path(tmp)
        config = _config(root, redis_url)
        inbox = config.producer.watch
        expected = _write(inbox, photos, "" if scenario == "rescan" else ".part")
        connection = Redis.from_url(redis_url)
        connection.flushall()
        enqueuer = Enqueuer(config, connection)
        metrics = ProducerMetrics(enqueuer.queue)
        watcher = Watcher(config, enqueuer, metrics)
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)

        renamer: subprocess.Popen[str] | None = None
        with _producer_log(root / "producer.log"):
            try:
                if scenario == "live":
                    thread.start()
                    _wait_for(lambda: watcher.armed, "the watcher to start")
                    time.sleep(0.2)  # its start-up scan of the empty folder is over
                    renamer = _rename_in(inbox)
                    assert renamer.stdout is not None
                    t0 = float(renamer.stdout.readline())
                else:
                    t0 = time.time()
                    thread.start()
                    if scenario == "during":
                        renamer = _rename_in(inbox)
                _wait_for(lambda: _queued(enqueuer) >= photos, f"{photos} jobs")
                seconds = time.time() - t0
                _wait_for(
                    lambda: watcher.tracker.next_due_in() is None and not watcher.found, "the settle tracker to empty"
                )
                time.sleep(QUIET_S)
            finally:
                stop.set()
                thread.join(30)
                if renamer is not None:
                    renamer.wait(TIMEOUT_S)
        if renamer is not None and renamer.returncode != 0:
            raise RuntimeError(f"the renaming process failed (exit {renamer.returncode})")
        try:
            return Burst(
                seconds=seconds, outcomes=_outcomes(metrics), **_check(connection, _lanes(enqueuer), config, expected)
            )
        finally:
            connection.close()


class _Count(FileSystemEventHandler):
    """Counts renames into place, and does nothing else: watchdog's own cost, no producer's."""

    def __init__(self) -> None:
        self.moved = 0

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.moved += 1


def watchdog_alone(photos: int) -> float | None:
    """The live drop's ceiling: seconds until watchdog has reported every rename to a handler that does
    nothing. None if some never came (the kernel's inotify queue overflowed even so)."""
    with tempfile.TemporaryDirectory(prefix="depthq-bench-burst-") as tmp:
        inbox = Path(tmp) / "inbox"
        _write(inbox, photos, ".part")
        handler = _Count()
        observer = Observer()
        observer.schedule(handler, str(inbox), recursive=True)
        observer.start()
        try:
            renamer = _rename_in(inbox)
            assert renamer.stdout is not None
            t0 = float(renamer.stdout.readline())
            renamer.wait(TIMEOUT_S)
            deadline = time.monotonic() + WATCHDOG_PATIENCE_S
            while handler.moved < photos and time.monotonic() < deadline:
                time.sleep(POLL_S)
            return time.time() - t0 if handler.moved == photos else None
        finally:
            observer.stop()
            observer.join(10)


def direct_burst(redis_url: str, photos: int, how: str) -> float:
    """A baseline without a watcher: 'one by one' (submit), 'batched' (submit_many) or 'rq floor'."""
    with tempfile.TemporaryDirectory(prefix="depthq-bench-burst-") as tmp:
        root = Path(tmp)
        config = _config(root, redis_url)
        expected = _write(config.producer.watch, photos, "")
        paths = [config.producer.watch / name for name in sorted(expected)]
        connection = Redis.from_url(redis_url)
        connection.flushall()
        enqueuer = Enqueuer(config, connection)
        try:
            with _producer_log(root / "producer.log"):
                if how == "rq floor":
                    return _rq_floor(enqueuer, config, paths, expected)
                t0 = time.perf_counter()
                if how == "one by one":
                    outcomes = [enqueuer.submit(path).outcome for path in paths]
                else:
                    outcomes = [r.outcome if r else "left" for _, r in enqueuer.submit_many(paths)]
                seconds = time.perf_counter() - t0
            if outcomes != ["enqueued"] * photos or enqueuer.queue.count != photos:
                raise RuntimeError(f"{how}: expected {photos} new jobs, got {enqueuer.queue.count}")
            return seconds
        finally:
            connection.close()


def _rq_floor(enqueuer: Enqueuer, config: Config, paths: list[Path], expected: dict[str, str]) -> float:
    """rq's unique enqueue per job, with the options `Enqueuer` uses, payloads made beforehand."""
    jobs = []
    for path in paths:
        sha = expected[path.name]
        st = path.stat()
        payload = JobPayload(path.name, st.st_size, st.st_mtime, sha, config.model.path, list(enqueuer.outputs))
        jobs.append((job_id(sha, payload.model), payload))
    t0 = time.perf_counter()
    for jid, payload in jobs:
        enqueuer._enqueue(jid, payload)  # exactly submit()'s Queue.enqueue(unique=True), nothing read
    seconds = time.perf_counter() - t0
    if enqueuer.queue.count != len(jobs):
        raise RuntimeError(f"rq floor: expected {len(jobs)} jobs, got {enqueuer.queue.count}")
    return seconds


def run(quick: bool = False) -> dict[str, Any]:
    """Files per second for a burst of 10,000 photos (1,000 with --quick), three ways, with baselines."""
    console.print(machine())
    photos = QUICK_PHOTOS if quick else PHOTOS
    scenarios = {
        "rescan": "watcher, start-up scan",
        "live": "watcher, live drop",
        "during": "watcher, drop at start",
    }
    baselines = {
        "one by one": "baseline: submit() each",
        "rq floor": "baseline: rq floor",
        "batched": "submit_many(), no watcher",
    }
    with private_redis() as server:
        bursts = {key: watcher_burst(server.url, photos, key) for key in scenarios}
        direct = {key: direct_burst(server.url, photos, key) for key in baselines}
    alone = watchdog_alone(photos)
    one_by_one = photos / direct["one by one"]
    rows = []
    for key, label in scenarios.items():
        rate = photos / bursts[key].seconds
        ok = rate >= GOAL_FILES_PER_S and bursts[key].exactly_once
        rows.append(
            (
                label,
                f"{bursts[key].seconds:.2f} s",
                f"{rate:,.0f}",
                f"{rate / one_by_one:.1f}x",
                f">= {GOAL_FILES_PER_S:,.0f}",
                verdict(ok),
            )
        )
    for key, label in baselines.items():
        rate = photos / direct[key]
        rows.append((label, f"{direct[key]:.2f} s", f"{rate:,.0f}", f"{rate / one_by_one:.1f}x", "", ""))
    if alone is None:
        rows.append(("ceiling: watchdog alone", "events lost", "", "", "", ""))
    else:
        rate = photos / alone
        rows.append(("ceiling: watchdog alone", f"{alone:.2f} s", f"{rate:,.0f}", f"{rate / one_by_one:.1f}x", "", ""))
    print_table(
        f"Burst: {photos:,} photos dropped at once, until all are jobs in Redis (settle_ms "
        f"{Config().producer.settle_ms} included for the rescan)",
        ["path", "time", "photos/s", "vs submit()", "goal", "verdict"],
        rows,
    )
    print_table(
        "Burst: exactly once (Redis afterwards)",
        ["scenario", "queued", "distinct", "hashes", "= photos", "dup.", "verdict"],
        [
            (
                label,
                f"{b.queue_length:,}",
                f"{b.distinct_ids:,}",
                f"{b.job_hashes:,}",
                "yes" if b.exactly_once else "NO",
                f"{b.outcomes.get('duplicate', 0):,}",
                verdict(b.exactly_once and b.queue_length == photos),
            )
            for label, b in ((scenarios[k], bursts[k]) for k in scenarios)
        ],
    )
    console.print(
        "queued: queue length; distinct: distinct job ids in it; "
        "hashes: rq job hashes in Redis; = photos: the ids are those of the photos' contents and each job "
        "names its own photo; dup.: photos turned away because their job existed (seen by an event and by "
        "the scan). rq floor: Queue.enqueue(unique=True) per job, payloads made beforehand, nothing read. "
        "ceiling: the same renames as the live drop, reported by watchdog to a handler that only counts."
    )
    return {
        "photos": photos,
        "goal_files_per_s": GOAL_FILES_PER_S,
        "watcher": {key: {**vars(b), "files_per_s": photos / b.seconds} for key, b in bursts.items()},
        "baselines": {key: {"seconds": s, "files_per_s": photos / s} for key, s in direct.items()},
        "watchdog_alone_s": alone,
    }
