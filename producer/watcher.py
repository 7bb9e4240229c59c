"""The hot folder: watchdog events feed the live lane, scans feed the backfill lane.

Events only say "look at this file"; nothing is enqueued from the watchdog thread itself. The main
loop decides when a file is finished and enqueues it on the live queue. Scans (at start, every
`producer.rescan_s`, after an inotify overflow, when a vanished folder returns) catch whatever events
never came; they walk, hash and enqueue on the backfill queue from a thread of their own
(`producer.scan`, against `producer.index`), so a rescan of a million photos never holds up a photo
dropped meanwhile, and workers take that photo first. Whatever is ready at once is enqueued together
(`Enqueuer.submit_many`), so a burst of thousands of photos costs a few round trips per few hundred.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path

from redis import Redis
from redis.exceptions import OutOfMemoryError, RedisError
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from depthq.config import Config
from depthq.contract import short_hostname, watches_key
from depthq.files import stale_temp_age_s
from depthq.metrics import serve
from depthq.outage import Outage
from producer.enqueue import Enqueuer, SourceError, Submitted
from producer.index import PhotoIndex, Queued
from producer.metrics import ProducerMetrics
from producer.poller import FolderPoller
from producer.readiness import Eligibility, SettleQueue, SettleTracker
from producer.scan import FolderScanner, ScanStats

log = logging.getLogger(__name__)

# How often the loop wakes when nothing is pending: bounds shutdown latency, costs nothing.
_IDLE_TICK_S = 0.25
# Photos per Redis transaction in a burst: large enough that round trips stop mattering, small
# enough that one transaction never holds Redis for long.
_BATCH = 500
# A burst (more ready at once than one) is gathered in ticks while it keeps coming, for at most this
# long: a lone photo is never held back.
_GATHER_TICK_S = 0.02
_GATHER_MAX_S = 0.5
# watchdog tells no handler when the kernel's inotify queue overflows and events are lost; it only
# logs a warning on this logger. 10,000 renames at once overflow it here (bench/burst.py), and
# without a rescan at once the lost photos would wait for `producer.rescan_s`. With the log level
# above WARNING the warning is never made, and the periodic rescan is all that is left.
_INOTIFY_LOGGER = "watchdog.observers.inotify_c"


# The events the handler uses, and so the only ones inotify is asked for. Without a filter watchdog asks
# for every event, IN_OPEN and IN_CLOSE_NOWRITE included: then the rescan's own walk raises four events
# per folder, past ~4,000 folders that overflows the kernel's queue (16,384), the overflow triggers
# a rescan, and so on for ever (36 rescans in 15 s, 94 % of a core, at 5,051 folders).
_EVENTS = (
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
)


def inotify_watch_count() -> int:
    """The inotify watches this process holds, as the kernel lists them in /proc/self/fdinfo."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                with open(f"/proc/self/fdinfo/{fd}") as info:
                    count += sum(1 for line in info if line.startswith("inotify wd:"))
    return count


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


class _OverflowAlarm(logging.Handler):
    """Raised by watchdog's warning that inotify dropped events, so the main loop rescans now."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.raised = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.raised.set()


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher):
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        w = self.watcher
        if isinstance(event, FileMovedEvent):
            w.tracker.forget(Path(str(event.src_path)))
            # A rename into place (x.part -> x.jpg, rsync's temp file) means the writer is done.
            w.consider(Path(str(event.dest_path)), finished=True)
        elif isinstance(event, FileClosedEvent):
            w.consider(Path(str(event.src_path)), finished=True)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            w.consider(Path(str(event.src_path)), finished=False)
        elif isinstance(event, FileDeletedEvent):
            w.tracker.forget(Path(str(event.src_path)))


class Watcher:
    """Events go to the live lane from the loop in `run`; scans go to the backfill lane from a thread of
    their own, so a rescan of a million photos never holds up a photo dropped meanwhile."""

    def __init__(
        self,
        config: Config,
        enqueuer: Enqueuer,
        metrics: ProducerMetrics | None = None,
        index: PhotoIndex | None = None,
    ):
        self.config = config
        self.enqueuer = enqueuer
        self.backfill = Enqueuer(config, enqueuer.connection, lane="backfill")
        self.metrics = metrics
        self.redis_full = Outage()
        # (watches held, folders walked) at the last rescan; Linux inotify only.
        self.watch_counts: tuple[int, int] | None = None
        self._watch_shortfall_said = False
        self.root = config.producer.watch.resolve()
        # An output folder inside the watched one must not feed its previews back in as photos.
        self.output_root = config.output.dir.resolve()
        self.eligible = Eligibility.of(config)
        self.tracker = SettleTracker(config.producer.settle_ms / 1000.0)
        self.found = SettleQueue(config.producer.settle_ms / 1000.0)
        self._ready: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self._armed = False
        self._overflow = _OverflowAlarm()
        # Without the index beside the output (read-only output, another watcher on it), one in memory:
        # the same answers, only not kept across restarts.
        self._index_given = index is not None
        self.index = index or PhotoIndex.open_beside(self.output_root) or PhotoIndex(Path(":memory:"))
        self.scanner = FolderScanner(
            self.root,
            self.output_root,
            self.eligible,
            self.index,
            self.backfill.pending_jobs,
            stale_temp_age_s(config.queue.job_timeout_s),
        )
        self.last_scan: ScanStats | None = None
        self._scan_wanted = threading.Event()
        self._scan_causes: set[str] = set()
        self._stopping = threading.Event()

    @property
    def armed(self) -> bool:
        """Whether an observer is watching the folder right now."""
        return self._armed

    @armed.setter
    def armed(self, value: bool) -> None:
        self._armed = value
        if self.metrics is not None:
            self.metrics.watching.set(1 if value else 0)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.files.labels(outcome).inc()

    def consider(self, path: Path, finished: bool) -> None:
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return
        if path.is_relative_to(self.output_root):
            return
        if not self.eligible(rel):
            return
        if finished:
            self.tracker.forget(path)
            self._ready.put(path)
        else:
            self.tracker.saw_change(path)

    def make_observer(self) -> BaseObserver | FolderPoller:
        if self.config.producer.polling:
            return FolderPoller(self, self.config.producer.poll_interval_s)
        return Observer()

    def request_scan(self, cause: str) -> None:
        """Ask the scan thread for a walk of the whole tree (one more, if one is running)."""
        self._scan_causes.add(cause)
        self._scan_wanted.set()

    def rescan(self, cause: str = "periodic") -> int:
        """Walk the whole tree once, here and now; every photo that needs a job is handed to the
        backfill lane (after the settle check), a batch at a time while the walk goes on."""
        if self.metrics is not None:
            self.metrics.rescans.labels(cause).inc()
        self._reopen_index()
        stats = ScanStats()
        started = time.monotonic()
        for batch in self.scanner.walk(stats, self._stopping):
            for found in batch:
                self.found.add(found.path, found.size, found.mtime_ns)
            self._submit_found(wait=False)
        self.last_scan = stats
        log.log(
            logging.INFO if stats.found or cause != "periodic" else logging.DEBUG,
            "%s scan of %s: %d photo(s) in %d folder(s) in %.1f s; %d done, %d with a pending job, %d to do "
            "(%d sidecar(s) read)",
            cause,
            self.root,
            stats.photos,
            stats.folders,
            time.monotonic() - started,
            stats.done,
            stats.pending,
            stats.found,
            stats.sidecars_read,
        )
        if self.armed:  # watches are only held while an observer runs
            self._check_watches(stats.folders)
        return stats.found

    def _reopen_index(self) -> None:
        """The index beside the output, once it can be had: at start the disk may have been full, or
        the folder missing. Until then the one in memory serves (same answers, not kept)."""
        if not self.index.in_memory or self._index_given:
            return
        index = PhotoIndex.open_beside(self.output_root, again=True)
        if index is None:
            return
        log.info("the photo index %s is open again", index.path)
        old, self.index, self.scanner.index = self.index, index, index
        old.close()

    def _submit_found(self, wait: bool) -> None:
        """Submit what the scans found once it has settled; with `wait`, until none is left."""
        while not self._stopping.is_set():
            ready = self.found.pop_due(_BATCH)
            if ready:
                self.submit_many(ready, self.backfill)
                continue
            due = self.found.next_due_in()
            if not wait or due is None:
                return
            self._stopping.wait(min(max(due, 0.01), _IDLE_TICK_S))

    def _scans(self) -> None:
        """The scan thread: a walk when asked (start-up, re-arm, periodic, inotify overflow), then the
        backlog it found, hashed and enqueued here and never in the event loop."""
        while not self._stopping.is_set():
            if not self._scan_wanted.wait(_IDLE_TICK_S):
                continue
            self._scan_wanted.clear()
            causes, self._scan_causes = self._scan_causes, set()
            cause = "start" if "start" in causes else next(iter(sorted(causes)), "periodic")
            try:
                self.rescan(cause)
                self._submit_found(wait=True)
            except Exception:
                # A scan's surprise (an unreadable folder tree, a Redis error mid-batch) must never
                # end the scans for good: the next one, at the latest after rescan_s, tries again.
                log.exception("the %s scan of %s failed; the next one tries again", cause, self.root)

    def _check_watches(self, folders: int) -> None:
        """watchdog ignores a failed inotify_add_watch (ENOSPC: fs.inotify.max_user_watches reached) for
        every folder but the root: photos in the unwatched ones then wait for the next rescan. Compare
        the watches the kernel holds for us with the folders the walk found, and say so once, with the fix."""
        if self.config.producer.polling or not sys.platform.startswith("linux"):
            return
        watches = inotify_watch_count()
        if self.metrics is not None:
            self.metrics.watches.set(watches)
        self.watch_counts = (watches, folders)
        with contextlib.suppress(RedisError):
            self.enqueuer.connection.hset(watches_key(self.config.queue.name), short_hostname(), f"{watches} {folders}")
        if watches >= folders:
            self._watch_shortfall_said = False
            return
        if not self._watch_shortfall_said:
            limit = _read_int("/proc/sys/fs/inotify/max_user_watches")
            wanted = max(2 * folders, 524288)
            log.error(
                "only %d of the %d folders under %s are watched: the kernel refused the rest "
                "(fs.inotify.max_user_watches is %s, shared by every program of this user). Photos in "
                "unwatched folders wait for the rescan every producer.rescan_s. Raise it: "
                "sudo sysctl fs.inotify.max_user_watches=%d, and put fs.inotify.max_user_watches=%d in "
                "/etc/sysctl.d/90-depthq.conf to keep it; then restart the watcher",
                watches,
                folders,
                self.root,
                limit if limit is not None else "unknown",
                wanted,
                wanted,
            )
            self._watch_shortfall_said = True

    def submit(self, path: Path, enqueuer: Enqueuer | None = None) -> None:
        enqueuer = enqueuer or self.enqueuer
        try:
            result = enqueuer.submit(path)
        except FileNotFoundError:
            return  # gone before we got to it; nothing to do
        except SourceError as exc:
            log.warning("not enqueued: %s", exc)
            self._count("refused")
            return
        except (RedisError, OSError) as exc:
            self._cannot_enqueue_yet([path], exc)
            return
        except Exception:
            # One photo's trouble (an rq or Redis surprise) must never stop the watcher for all the others.
            log.exception("could not enqueue %s (an unexpected error); the next rescan tries it again", path)
            self._count("error")
            return
        self._record([(path, result)])

    def submit_many(self, paths: list[Path], enqueuer: Enqueuer | None = None) -> None:
        """Enqueue what is ready, a batch at a time; anything unusual goes through `submit` one by one."""
        enqueuer = enqueuer or self.enqueuer
        paths = list(dict.fromkeys(paths))  # an event and a rescan can both name a photo
        for start in range(0, len(paths), _BATCH):
            chunk = paths[start : start + _BATCH]
            if len(chunk) == 1:
                self.submit(chunk[0], enqueuer)
                continue
            try:
                results = enqueuer.submit_many(chunk)
            except RedisError as exc:
                self._cannot_enqueue_yet(chunk, exc)
                continue
            except Exception:
                log.exception("could not enqueue %d photo(s) together; trying them one by one", len(chunk))
                results = [(path, None) for path in chunk]
            self._record([(path, result) for path, result in results if result is not None])
            for path, result in results:
                if result is None:
                    self.submit(path, enqueuer)

    def _cannot_enqueue_yet(self, paths: list[Path], exc: Exception) -> None:
        """Look again after the settle time. A Redis at maxmemory refuses every photo for as long as it
        lasts: that is said once (and once more when it clears), not once per photo per look."""
        if isinstance(exc, OutOfMemoryError):
            if self.redis_full.begins():
                log.error(
                    "Redis is full (%s): new photos wait on disk until it takes writes again; raise its "
                    "maxmemory or free memory there",
                    exc,
                )
            log.debug("could not enqueue %d photo(s) yet: Redis is full", len(paths))
        else:
            log.warning("could not enqueue %d photo(s) yet (%s), %s; will retry", len(paths), exc, paths[0])
        for path in paths:
            self._count("retry_later")
            self.tracker.saw_change(path)

    def _record(self, results: list[tuple[Path, Submitted]]) -> None:
        given: list[tuple[Path, Queued]] = []
        for path, result in results:
            if self.redis_full.ends():
                log.warning("Redis takes writes again; the photos that waited follow")
            self._count(result.outcome)
            if result.outcome in ("changed", "deferred"):
                # Still being written, or Redis is full (redis transport): look again after the settle time.
                self.tracker.saw_change(path)
            elif result.version is not None:
                # This version has a job: a live copy of it waiting to settle is dropped, and rescans
                # leave it alone while its job is pending.
                self.tracker.forget_version(path, *result.version)
                if result.job_id:
                    given.append((path, Queued(*result.version, result.job_id)))
        self.scanner.record_queued(given)

    def _arm(self) -> BaseObserver | FolderPoller:
        observer = self.make_observer()
        if isinstance(observer, FolderPoller):
            observer.start()
            every = observer.interval_s
            log.info("watching %s (polling its folders every %.1f s), output in %s", self.root, every, self.output_root)
            return observer
        observer.schedule(_Handler(self), str(self.root), recursive=True, event_filter=list(_EVENTS))
        try:
            observer.start()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            # The kernel's inotify watch limit: watch what it allows (the root folder), and let the
            # rescan find the rest; _check_watches says what to raise, with the numbers.
            with contextlib.suppress(Exception):
                observer.stop()
            observer = Observer()
            observer.schedule(_Handler(self), str(self.root), recursive=False, event_filter=list(_EVENTS))
            observer.start()
        log.info("watching %s (%s), output in %s", self.root, type(observer).__name__, self.output_root)
        return observer

    def _healthy(self, observer: BaseObserver | FolderPoller) -> bool:
        """watchdog's emitters stop silently when their folder vanishes (an SMB/NFS share going away)."""
        if not self.root.is_dir():
            return False
        if isinstance(observer, FolderPoller):
            return observer.is_alive()
        return all(emitter.is_alive() for emitter in observer.emitters)

    def run(self, stop: threading.Event) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"producer.watch: {self.root} is not a folder; create it or point producer.watch elsewhere"
            )
        inotify_log = logging.getLogger(_INOTIFY_LOGGER)
        inotify_log.addHandler(self._overflow)
        observer: BaseObserver | FolderPoller | None = None
        self._stopping.clear()
        scans = threading.Thread(target=self._scans, name="depthq-scans", daemon=True)
        try:
            observer = self._arm()
            self.armed = True
            # Watching first, then the start-up scan in its thread: photos dropped from now on are
            # enqueued at once, while the scan works through what is already there.
            self.request_scan("start")
            scans.start()
            next_rescan = time.monotonic() + self.config.producer.rescan_s
            next_health = time.monotonic() + self.config.producer.poll_interval_s
            while not stop.is_set():
                try:
                    if time.monotonic() >= next_health:
                        observer = self._check_health(observer)
                        next_health = time.monotonic() + self.config.producer.poll_interval_s
                        if observer is None:
                            stop.wait(_IDLE_TICK_S)
                            continue
                    self.submit_many(self._take_ready() + self.tracker.pop_ready())
                    if self._overflow.raised.is_set():
                        self._overflow.raised.clear()
                        log.warning("inotify dropped events (queue overflow); rescanning %s now", self.root)
                        self.request_scan("overflow")
                    if time.monotonic() >= next_rescan:
                        self.request_scan("periodic")
                        next_rescan = time.monotonic() + self.config.producer.rescan_s
                    due = self.tracker.next_due_in()
                    wait = _IDLE_TICK_S if due is None else min(_IDLE_TICK_S, max(due, 0.01))
                    with contextlib.suppress(queue.Empty):
                        first = self._ready.get(timeout=wait)
                        self.submit_many([first, *self._gather_burst()])
                except Exception:
                    # Nothing that goes wrong here may stop the watcher (under systemd or launchd that
                    # would be a crash loop): say it, rescan for whatever was in hand, and go on.
                    log.exception("the watcher met an unexpected error; rescanning %s, and going on", self.root)
                    self.request_scan("error")
                    stop.wait(_IDLE_TICK_S)
        finally:
            self._stopping.set()
            inotify_log.removeHandler(self._overflow)
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            if scans.is_alive():
                scans.join(timeout=10)
            self.index.close()

    def _check_health(self, observer: BaseObserver | FolderPoller | None) -> BaseObserver | FolderPoller | None:
        """Stand down while the watched folder is gone; re-arm and rescan once it is back."""
        if observer is not None and not self._healthy(observer):
            log.warning("%s is gone or no longer watched (unmounted share?); waiting for it to come back", self.root)
            observer.stop()
            observer.join(timeout=5)
            observer = None
            self.armed = False
        if observer is None and self.root.is_dir():
            observer = self._arm()
            self.armed = True
            log.info("%s is back; rescanning for what arrived meanwhile", self.root)
            self.request_scan("rearm")
        return observer

    def _gather_burst(self) -> list[Path]:
        """More ready paths, for as long as they keep coming (up to `_GATHER_MAX_S`); none for a lone photo.

        While a burst arrives, watchdog's threads need the interpreter to read the kernel's inotify
        queue before it overflows; enqueueing at the same time would compete with them for it.
        """
        gathered = self._take_ready()
        deadline = time.monotonic() + _GATHER_MAX_S
        while gathered and time.monotonic() < deadline:
            time.sleep(_GATHER_TICK_S)
            more = self._take_ready()
            if not more:
                break
            gathered += more
        return gathered

    def _take_ready(self) -> list[Path]:
        """Every path the event handler has marked finished so far, without waiting."""
        ready: list[Path] = []
        while True:
            try:
                ready.append(self._ready.get_nowait())
            except queue.Empty:
                return ready


def build_watcher(config: Config, connection: Redis) -> Watcher:
    """The watcher as `depthq watch` and `depthq up` run it, serving /metrics when a port is configured."""
    enqueuer = Enqueuer(config, connection)
    metrics = None
    if config.producer.metrics_port is not None:
        metrics = ProducerMetrics(enqueuer.queue)
        serve(metrics.registry, config.producer.metrics_port, "producer.metrics_port", config.producer.metrics_bind)
    return Watcher(config, enqueuer, metrics)
