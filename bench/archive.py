"""Benchmark 10, archive: a hot folder that has grown to 10k and 100k done photos in 1,000 and 10,000
folders (10 per folder: a folder per shoot).

The tree is what the pipeline leaves behind, made directly: small distinct `.jpg` files (the producer
hashes photos, it never decodes them), and beside each in the output folder its sidecar (with the
`source_stat` a worker records), depth map and preview (empty: only their names are listed). A
private Redis, the real `Watcher`, default settings except where a row says otherwise.

Rows, each against its goal (issue 15) and, where one applies, a floor measured in the same run:
- rescan CPU per done photo, with the index warm, against an `os.scandir` walk with one stat per file
  (the floor: no rescan can look at a photo for less); and the first rescan, which reads every sidecar
  once into the index;
- drop-to-enqueue p95 for photos renamed into the folder while a rescan of the whole tree runs;
- start-up until a photo dropped at once is enqueued;
- idle CPU and rescans caused by inotify overflows, over a quiet window, with every folder watched;
- a backlog of pending photos (no workers): what a second rescan re-submits and re-hashes;
- polling (`producer.polling: true`): RSS and idle CPU against watchdog's PollingObserver on the same tree;
- `depthq audit` of the done tree beside the running watcher (index warm) and without the index (every
  sidecar read), and of the pending backlog, each against that run's rescan;
- and the per-photo costs fitted over both sizes, extrapolated to 1M photos in 10,000 folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from redis import Redis
from rq.job import Job

from bench.common import console, machine, median, ms, p95, print_table, private_redis, verdict
from depthq.config import Config, load_config
from depthq.contract import LANES, SERIALIZER, job_id, make_queue
from producer import sending as sending_module
from producer.audit import audit
from producer.enqueue import Enqueuer
from producer.metrics import ProducerMetrics
from producer.watcher import Watcher
from testkit.watching import watching

PER_FOLDER = 10
SIZES = (10_000, 100_000)
QUICK_SIZES = (1_000, 10_000)
DROPS = 20
IDLE_WINDOW_S = 10.0
QUICK_IDLE_WINDOW_S = 3.0
TIMEOUT_S = 600.0
GOAL_RESCAN_RATIO = 2.0
GOAL_DROP_P95_S = 0.300
GOAL_STARTUP_S = 2.0
GOAL_IDLE_CPU = 0.01


def _photo_bytes(tag: str, i: int) -> bytes:
    return hashlib.sha256(f"{tag}:{i}".encode()).digest() * 64  # 2 KiB, distinct


def build_tree(root: Path, photos: int, done: bool, tag: str) -> tuple[Path, Path]:
    """`photos` photos, PER_FOLDER per folder; with `done`, each with the outputs a worker leaves."""
    inbox, out = root / "inbox", root / "out"
    for i in range(photos):
        folder = f"day{i // PER_FOLDER:05d}"
        name = f"IMG_{i:07d}.jpg"
        if i % PER_FOLDER == 0:
            (inbox / folder).mkdir(parents=True, exist_ok=True)
            if done:
                (out / folder).mkdir(parents=True, exist_ok=True)
        photo = inbox / folder / name
        photo.write_bytes(_photo_bytes(tag, i))
        if done:
            st = photo.stat()
            sidecar = {"source": f"{folder}/{name}", "source_stat": {"size": st.st_size, "mtime": int(st.st_mtime)}}
            (out / folder / f"{name}.json").write_text(json.dumps(sidecar))
            (out / folder / f"{name}.depth.npy").touch()
            (out / folder / f"{name}.preview.png").touch()
    (inbox / "live").mkdir(parents=True, exist_ok=True)
    return inbox, out


def _config(inbox: Path, out: Path, redis_url: str, **producer: Any) -> Config:
    return load_config(
        environ={},
        overrides={
            "redis": {"url": redis_url},
            "producer": {"watch": str(inbox), "rescan_s": 3600, **producer},
            "output": {"dir": str(out)},
            "model": {"path": "apple/DepthPro-hf"},
        },
    )


def floor_walk(root: Path) -> int:
    """The least a rescan could do: list every folder, stat every file."""
    files = 0
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    entry.stat()
                    files += 1
    return files


def _cpu(fn: Any) -> float:
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def _wait(predicate: Any, what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.005)


def _drop(inbox: Path, tag: str, i: int, config: Config) -> tuple[str, float]:
    """A photo renamed into place (how rsync and browsers finish a file); its job id and drop time."""
    data = _photo_bytes(f"live-{tag}", i)
    part = inbox / "live" / f"drop-{tag}-{i}.jpg.part"
    part.write_bytes(data)
    t = time.time()
    os.rename(part, inbox / "live" / f"drop-{tag}-{i}.jpg")
    return job_id(hashlib.sha256(data).hexdigest(), config.model.path), t


def _enqueued_at(connection: Redis, jid: str) -> float | None:
    try:
        job = Job.fetch(jid, connection=connection, serializer=SERIALIZER)
    except Exception:
        return None
    return job.enqueued_at.timestamp() if job.enqueued_at else None


def measure_audit(config: Config, connection: Redis, photos: int, **expect: int) -> dict[str, Any]:
    """`depthq audit` timed in this thread (wall and CPU, median of 3) with the index (beside its writer,
    when a watcher holds it) and without it; each must find exactly `expect` among `photos`."""
    row: dict[str, Any] = {}
    for mode, use_index in (("index", True), ("no_index", False)):
        walls, cpus = [], []
        for _ in range(3):
            wall0, cpu0 = time.monotonic(), time.thread_time()
            report = audit(config, connection, use_index=use_index)
            walls.append(time.monotonic() - wall0)
            cpus.append(time.thread_time() - cpu0)
            found = {k: n for k, n in report.counts.items() if n}
            assert found == {"photos": photos, **expect}, found
            assert report.index == use_index
            assert report.sidecars_read == (0 if use_index else expect.get("done", 0)), report.sidecars_read
        row[f"{mode}_wall_s"], row[f"{mode}_cpu_s"] = median(walls), median(cpus)
        row[f"{mode}_hashed"] = report.hashed
    return row


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_done(redis_url: str, photos: int, idle_s: float) -> dict[str, Any]:
    row: dict[str, Any] = {"photos": photos, "folders": photos // PER_FOLDER}
    with tempfile.TemporaryDirectory(prefix="depthq-bench-archive-") as tmp:
        t0 = time.monotonic()
        inbox, out = build_tree(Path(tmp), photos, done=True, tag=f"done{photos}")
        row["build_s"] = time.monotonic() - t0
        connection = Redis.from_url(redis_url)
        connection.flushall()
        config = _config(inbox, out, redis_url)
        floor_walk(inbox)  # warm the dentry and inode caches, as a periodic rescan finds them
        row["floor_cpu_s"] = median([_cpu(lambda: floor_walk(inbox)) for _ in range(3)])
        watcher = Watcher(config, Enqueuer(config, connection))
        row["first_cpu_s"] = _cpu(lambda: watcher.rescan("start"))  # reads every sidecar into the index
        row["rescan_cpu_s"] = median([_cpu(lambda: watcher.rescan("periodic")) for _ in range(3)])
        stats = watcher.last_scan
        assert stats is not None and stats.done == photos and stats.sidecars_read == 0, stats
        row["audit"] = measure_audit(config, connection, photos, done=photos)  # the watcher holds the index
        watcher.index.close()

        # Start-up: the index is warm; a photo is dropped the moment the watch is armed.
        enqueuer = Enqueuer(config, connection)
        metrics = ProducerMetrics(enqueuer.queue)
        watcher = Watcher(config, enqueuer, metrics)
        scanning = threading.Event()
        walk = watcher.scanner.walk

        def flagged_walk(stats: Any, stop: Any = None) -> Iterator[Any]:
            scanning.set()
            try:
                yield from walk(stats, stop)
            finally:
                scanning.clear()

        watcher.scanner.walk = flagged_walk  # type: ignore[method-assign]
        started = time.monotonic()
        with watching(watcher, join_s=60):
            _wait(lambda: watcher.armed, "the watch")
            row["armed_s"] = time.monotonic() - started
            jid, _ = _drop(inbox, "start", 0, config)
            _wait(lambda: _enqueued_at(connection, jid) is not None, "the first drop")
            row["startup_s"] = time.monotonic() - started
            _wait(lambda: watcher.last_scan is not None, "the start-up scan")

            # Drops while a rescan of the whole tree runs.
            latencies: list[float] = []
            for round_ in range(50):
                if len(latencies) >= DROPS:
                    break
                watcher.request_scan("periodic")
                _wait(scanning.is_set, "a rescan to start")
                dropped = []
                while scanning.is_set() and len(dropped) + len(latencies) < DROPS:
                    dropped.append(_drop(inbox, f"r{round_}", len(dropped), config))
                    time.sleep(0.02)
                for jid, t in dropped:
                    _wait(lambda jid=jid: _enqueued_at(connection, jid) is not None, "a drop's job", 60)
                    latencies.append(max(0.0, (_enqueued_at(connection, jid) or t) - t))
                _wait(lambda: not scanning.is_set(), "the rescan to end")
            row["drop_p95_s"] = p95(latencies)
            row["drop_median_s"] = median(latencies)
            row["drops"] = len(latencies)

            # Quiet: every folder watched, nothing arriving.
            cpu0, wall0 = _process_cpu(), time.monotonic()
            time.sleep(idle_s)
            row["idle_cpu"] = (_process_cpu() - cpu0) / (time.monotonic() - wall0)
            row["overflow_rescans"] = metrics.rescans.labels("overflow")._value.get()
            row["watches"] = watcher.watch_counts
    return row


def measure_pending(redis_url: str, photos: int) -> dict[str, Any]:
    """No worker runs: every photo is pending. The second rescan must leave them all alone."""
    row: dict[str, Any] = {"photos": photos}
    with tempfile.TemporaryDirectory(prefix="depthq-bench-archive-") as tmp:
        inbox, out = build_tree(Path(tmp), photos, done=False, tag=f"pending{photos}")
        connection = Redis.from_url(redis_url)
        connection.flushall()
        config = _config(inbox, out, redis_url, settle_ms=0)
        watcher = Watcher(config, Enqueuer(config, connection))
        t0 = time.monotonic()
        watcher.rescan("start")
        watcher._submit_found(wait=True)
        row["first_s"] = time.monotonic() - t0
        row["queued"] = sum(make_queue(connection, config, lane).count for lane in LANES)
        hashed = 0
        real_hash = sending_module.file_sha256

        def counting_hash(path: Path) -> str:
            nonlocal hashed
            hashed += 1
            return real_hash(path)

        submitted = 0
        real_submit_many = watcher.submit_many

        def counting_submit_many(paths: list[Path], enqueuer: Enqueuer | None = None) -> None:
            nonlocal submitted
            submitted += len(paths)
            real_submit_many(paths, enqueuer)

        sending_module.file_sha256 = counting_hash  # type: ignore[assignment]
        watcher.submit_many = counting_submit_many  # type: ignore[method-assign]
        try:
            row["second_cpu_s"] = _cpu(lambda: watcher.rescan("periodic"))
            watcher._submit_found(wait=True)
        finally:
            sending_module.file_sha256 = real_hash
        row["resubmitted"], row["rehashed"] = submitted, hashed
        row["pending_seen"] = watcher.last_scan.pending if watcher.last_scan else None
        row["audit"] = measure_audit(config, connection, photos, queued=photos)
        watcher.index.close()
    return row


def measure_polling(redis_url: str, photos: int, idle_s: float) -> dict[str, Any]:
    """RSS and idle CPU: depthq's folder poller against watchdog's PollingObserver, same tree, same run."""
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers.polling import PollingObserver

    row: dict[str, Any] = {"photos": photos}
    with tempfile.TemporaryDirectory(prefix="depthq-bench-archive-") as tmp:
        inbox, out = build_tree(Path(tmp), photos, done=True, tag=f"poll{photos}")
        connection = Redis.from_url(redis_url)
        connection.flushall()
        config = _config(inbox, out, redis_url, polling=True, poll_interval_s=2.0)
        rss0 = _rss_mb()
        watcher = Watcher(config, Enqueuer(config, connection))
        with watching(watcher, join_s=60):
            _wait(lambda: watcher.last_scan is not None, "the start-up scan")
            cpu0, wall0 = _process_cpu(), time.monotonic()
            time.sleep(idle_s)
            row["depthq_cpu"] = (_process_cpu() - cpu0) / (time.monotonic() - wall0)
            row["depthq_rss_mb"] = _rss_mb() - rss0
        rss0 = _rss_mb()
        observer = PollingObserver(timeout=2.0)
        observer.schedule(FileSystemEventHandler(), str(inbox), recursive=True)
        observer.start()
        try:
            time.sleep(2.5)  # its first snapshot is taken on start; wait for one poll
            cpu0, wall0 = _process_cpu(), time.monotonic()
            time.sleep(idle_s)
            row["watchdog_cpu"] = (_process_cpu() - cpu0) / (time.monotonic() - wall0)
            row["watchdog_rss_mb"] = _rss_mb() - rss0
        finally:
            observer.stop()
            observer.join(30)
    return row


def _fit(xs: tuple[int, int], ys: tuple[float, float], at: int) -> float:
    slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
    return ys[1] + slope * (at - xs[1])


def _audit_rows(
    audit_row: dict[str, Any], rescan_cpu_s: float, photos: int, without: str = "reads every sidecar"
) -> list[tuple[str, str, str, str]]:
    """The audit beside the rescan of the same run: wall time, then CPU against the rescan's CPU."""
    rows = []
    for mode, what in (("index", "index warm, beside the watcher"), ("no_index", f"no index: {without}")):
        wall, cpu = audit_row[f"{mode}_wall_s"], audit_row[f"{mode}_cpu_s"]
        hashed = audit_row[f"{mode}_hashed"]
        rows.append(
            (
                f"  depthq audit, {what}",
                f"{wall:.2f} s ({wall / photos * 1e6:.1f} µs/photo)",
                f"CPU {cpu:.2f} s = {cpu / rescan_cpu_s:.2f}x this rescan's {rescan_cpu_s:.2f} s",
                f"{hashed} hashed",
            )
        )
    return rows


def run(quick: bool = False) -> None:
    sizes = QUICK_SIZES if quick else SIZES
    idle_s = QUICK_IDLE_WINDOW_S if quick else IDLE_WINDOW_S
    logging.getLogger("producer").setLevel(logging.WARNING)
    console.print(f"machine: {machine()}")
    with private_redis() as server:
        url = server.url
        done = [measure_done(url, n, idle_s) for n in sizes]
        pending = measure_pending(url, sizes[-1])
        polling = measure_polling(url, sizes[-1], idle_s)

    rows = []
    for r in done:
        n = r["photos"]
        ratio = r["rescan_cpu_s"] / r["floor_cpu_s"]
        drop_goal = f"<= {ms(GOAL_DROP_P95_S)} {verdict(r['drop_p95_s'] <= GOAL_DROP_P95_S)}"
        rows += [
            (f"{n:,} done, {r['folders']:,} folders", "", "", ""),
            (
                "  rescan CPU per photo (index warm)",
                f"{r['rescan_cpu_s'] / n * 1e6:.2f} µs",
                f"{ratio:.2f}x floor",
                f"<= {GOAL_RESCAN_RATIO:.0f}x floor {verdict(ratio <= GOAL_RESCAN_RATIO)}",
            ),
            ("  floor: scandir + stat per file", f"{r['floor_cpu_s'] / n * 1e6:.2f} µs", "1.00x", ""),
            (
                "  first rescan (reads every sidecar)",
                f"{r['first_cpu_s'] / n * 1e6:.2f} µs",
                f"{r['first_cpu_s'] / r['floor_cpu_s']:.2f}x floor",
                "once, then the index",
            ),
            (
                f"  drop-to-enqueue during a rescan ({r['drops']} drops)",
                f"p95 {ms(r['drop_p95_s'])}",
                f"median {ms(r['drop_median_s'])}",
                drop_goal,
            ),
            (
                "  start-up until a drop is enqueued",
                f"{r['startup_s']:.2f} s",
                f"armed {r['armed_s']:.2f} s",
                f"<= {GOAL_STARTUP_S:.0f} s {verdict(r['startup_s'] <= GOAL_STARTUP_S)}",
            ),
            *_audit_rows(r["audit"], r["rescan_cpu_s"], n),
            (
                f"  idle, {r['watches'][0] if r['watches'] else '?'} watches",
                f"{r['idle_cpu'] * 100:.2f} % of a core",
                f"{r['overflow_rescans']:.0f} overflow rescans",
                f"< 1 %, none {verdict(r['idle_cpu'] < GOAL_IDLE_CPU and r['overflow_rescans'] == 0)}",
            ),
        ]
    ok = pending["resubmitted"] == 0 and pending["rehashed"] == 0
    rows += [
        (
            f"{pending['photos']:,} pending (no workers)",
            f"first scan {pending['first_s']:.1f} s",
            f"{pending['queued']:,} jobs",
            "",
        ),
        (
            "  second rescan: re-submitted / re-hashed",
            f"{pending['resubmitted']} / {pending['rehashed']}",
            f"{pending['pending_seen']:,} seen pending, {pending['second_cpu_s']:.2f} s CPU",
            f"0 / 0 {verdict(ok)}",
        ),
        *_audit_rows(pending["audit"], pending["second_cpu_s"], pending["photos"], "hashes every photo"),
        (
            f"polling {polling['photos']:,} photos, idle",
            f"{polling['depthq_cpu'] * 100:.2f} % CPU",
            f"{polling['depthq_rss_mb']:.0f} MB RSS added",
            "depthq's folder poller",
        ),
        (
            "  watchdog PollingObserver, same tree",
            f"{polling['watchdog_cpu'] * 100:.2f} % CPU",
            f"{polling['watchdog_rss_mb']:.0f} MB RSS added",
            "the old way",
        ),
    ]
    if len(done) == 2:
        xs = (done[0]["photos"], done[1]["photos"])
        million = 1_000_000
        rescan = _fit(xs, (done[0]["rescan_cpu_s"], done[1]["rescan_cpu_s"]), million)
        first = _fit(xs, (done[0]["first_cpu_s"], done[1]["first_cpu_s"]), million)
        rows += [
            ("1M done (fitted, extrapolated)", "", "", ""),
            ("  rescan CPU, index warm", f"{rescan:.1f} s", "every producer.rescan_s (300 s by default)", ""),
            ("  first rescan, reading sidecars", f"{first:.1f} s", "once", ""),
        ]
    print_table("archive: a hot folder that only grows", ("row", "measured", "beside", "goal"), rows)
