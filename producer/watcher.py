"""The hot folder: watchdog events plus a periodic rescan feed the settle tracker; ready files are enqueued.

Events only say "look at this file"; nothing is enqueued from the watchdog thread itself. The main
loop decides when a file is finished, and a rescan (`producer.rescan_s`) catches whatever events were
dropped (inotify overflow, a producer that was down).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError
from watchdog.events import (
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
from watchdog.observers.polling import PollingObserver

from producer.config import Config
from producer.contract import is_finished
from producer.enqueue import Enqueuer, SourceError
from producer.metrics import ProducerMetrics, serve
from producer.readiness import Eligibility, SettleTracker

log = logging.getLogger(__name__)

# How often the loop wakes when nothing is pending: bounds shutdown latency, costs nothing.
_IDLE_TICK_S = 0.25


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
    def __init__(self, config: Config, enqueuer: Enqueuer, metrics: ProducerMetrics | None = None):
        self.config = config
        self.enqueuer = enqueuer
        self.metrics = metrics
        self.root = config.producer.watch.resolve()
        # An output folder inside the watched one must not feed its previews back in as photos.
        self.output_root = config.output.dir.resolve()
        self.eligible = Eligibility(config.producer.extensions, config.producer.ignore)
        self.tracker = SettleTracker(config.producer.settle_ms / 1000.0)
        self._ready: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self._armed = False

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

    def make_observer(self) -> BaseObserver:
        if self.config.producer.polling:
            return PollingObserver(timeout=self.config.producer.poll_interval_s)
        return Observer()

    def rescan(self) -> int:
        """Queue every eligible photo with no finished output; they still pass the settle check."""
        found = 0
        for path in self.eligible.scan(self.root, exclude=self.output_root):
            try:
                st = path.stat()
            except OSError:
                continue
            if not is_finished(self.output_root, path.relative_to(self.root).as_posix(), st):
                self.tracker.saw_change(path)
                found += 1
        if found:
            log.info("rescan of %s: %d photo(s) without output", self.root, found)
        return found

    def submit(self, path: Path) -> None:
        try:
            result = self.enqueuer.submit(path)
        except FileNotFoundError:
            return  # gone before we got to it; nothing to do
        except SourceError as exc:
            log.warning("not enqueued: %s", exc)
            self._count("refused")
            return
        except (RedisError, OSError) as exc:
            log.warning("could not enqueue %s yet (%s); will retry", path, exc)
            self._count("retry_later")
            self.tracker.saw_change(path)
            return
        self._count(result.outcome)
        if result.outcome == "changed":
            self.tracker.saw_change(path)

    def _arm(self) -> BaseObserver:
        observer = self.make_observer()
        observer.schedule(_Handler(self), str(self.root), recursive=True)
        observer.start()
        kind = "polling" if self.config.producer.polling else type(observer).__name__
        log.info("watching %s (%s), output in %s", self.root, kind, self.output_root)
        return observer

    def _healthy(self, observer: BaseObserver) -> bool:
        """watchdog's emitters stop silently when their folder vanishes (an SMB/NFS share going away)."""
        return self.root.is_dir() and all(emitter.is_alive() for emitter in observer.emitters)

    def run(self, stop: threading.Event) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"producer.watch: {self.root} is not a folder; create it or point producer.watch elsewhere"
            )
        observer: BaseObserver | None = self._arm()
        self.armed = True
        try:
            self.rescan()
            next_rescan = time.monotonic() + self.config.producer.rescan_s
            next_health = time.monotonic() + self.config.producer.poll_interval_s
            while not stop.is_set():
                if time.monotonic() >= next_health:
                    observer = self._check_health(observer)
                    next_health = time.monotonic() + self.config.producer.poll_interval_s
                    if observer is None:
                        stop.wait(_IDLE_TICK_S)
                        continue
                self._drain_ready()
                for path in self.tracker.pop_ready():
                    self.submit(path)
                if time.monotonic() >= next_rescan:
                    self.rescan()
                    next_rescan = time.monotonic() + self.config.producer.rescan_s
                due = self.tracker.next_due_in()
                wait = _IDLE_TICK_S if due is None else min(_IDLE_TICK_S, max(due, 0.01))
                with contextlib.suppress(queue.Empty):
                    self.submit(self._ready.get(timeout=wait))
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)

    def _check_health(self, observer: BaseObserver | None) -> BaseObserver | None:
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
            self.rescan()
        return observer

    def _drain_ready(self) -> None:
        while True:
            try:
                path = self._ready.get_nowait()
            except queue.Empty:
                return
            self.submit(path)


def build_watcher(config: Config, connection: Redis) -> Watcher:
    """The watcher as `depthq watch` and `depthq up` run it, serving /metrics when a port is configured."""
    enqueuer = Enqueuer(config, connection)
    metrics = None
    if config.producer.metrics_port is not None:
        metrics = ProducerMetrics(enqueuer.queue)
        serve(metrics.registry, config.producer.metrics_port, "producer.metrics_port")
    return Watcher(config, enqueuer, metrics)
