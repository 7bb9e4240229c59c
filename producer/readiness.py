"""Which files count as photos, and when a photo is completely written.

macOS (FSEvents) and polling give no close event, so a file is ready once its size and mtime have
not changed for `producer.settle_ms`. A close-after-write (inotify) or a rename into place says
the writer is done, so those are ready at once.
"""

from __future__ import annotations

import fnmatch
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath

from depthq.config import Config


def clip_extensions(config: Config) -> list[str]:
    """The clip extensions the watcher takes: none unless `video.enabled`."""
    if not config.video.enabled:
        return []
    return [e.lower().lstrip(".") for e in config.video.extensions]


class Eligibility:
    """Photo extensions in, hidden and temporary files out, judged on every path component."""

    def __init__(self, extensions: list[str], ignore: list[str]):
        self.extensions = {e.lower().lstrip(".") for e in extensions}
        self.ignore = list(ignore)
        # One regular expression for every pattern: a rescan asks this of every name of a million.
        self.ignored_pattern = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in self.ignore) or "(?!)")

    @classmethod
    def of(cls, config: Config) -> Eligibility:
        """What the watcher takes under `config`: photos, and video clips where `video.enabled`."""
        return cls([*config.producer.extensions, *clip_extensions(config)], config.producer.ignore)

    def ignored(self, name: str) -> bool:
        return self.ignored_pattern.match(name) is not None

    def __call__(self, rel: PurePath) -> bool:
        return self.why_not(rel) is None

    def why_not(self, rel: PurePath) -> str | None:
        """Why the watcher would pass this path by (naming the setting), or None for a photo it takes."""
        for part in rel.parts:
            pattern = next((pat for pat in self.ignore if fnmatch.fnmatchcase(part, pat)), None)
            if pattern is not None:
                return f"{part!r} matches producer.ignore pattern {pattern!r}"
        suffix = rel.suffix.lower().lstrip(".")
        if suffix not in self.extensions:
            shown = f"extension .{suffix}" if suffix else "no extension"
            return f"{shown}, not in producer.extensions or video.extensions ({', '.join(sorted(self.extensions))})"
        return None

    def scan(
        self, root: Path, exclude: Path | None = None, folders: Callable[[], None] | None = None
    ) -> Iterator[Path]:
        """Every eligible regular file under root, skipping ignored folders (and `exclude`) without
        descending. `folders` is called once per folder walked."""
        for dirpath, dirnames, filenames in os.walk(root):
            if folders is not None:
                folders()
            dirnames[:] = sorted(
                d for d in dirnames if not self.ignored(d) and (exclude is None or Path(dirpath, d) != exclude)
            )
            for name in sorted(filenames):
                path = Path(dirpath, name)
                if self(path.relative_to(root)) and path.is_file():
                    yield path


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    stable_since: float


class SettleTracker:
    """Files seen changing, released once they have stopped changing for `settle_s`."""

    def __init__(self, settle_s: float, clock=time.monotonic):
        self.settle_s = settle_s
        self.clock = clock
        self._pending: dict[Path, _Pending] = {}
        self._lock = threading.Lock()

    def saw_change(self, path: Path) -> None:
        try:
            st = path.stat()
        except OSError:
            self.forget(path)
            return
        with self._lock:
            prev = self._pending.get(path)
            if prev is None or (prev.size, prev.mtime_ns) != (st.st_size, st.st_mtime_ns):
                self._pending[path] = _Pending(st.st_size, st.st_mtime_ns, self.clock())

    def forget(self, path: Path) -> None:
        with self._lock:
            self._pending.pop(path, None)

    def forget_version(self, path: Path, size: int, mtime_ns: int) -> None:
        """Forget a pending file if it is still at this (size, mtime_ns): it was dealt with meanwhile (a
        rename event while a rescan waited on it). A newer version stays pending."""
        with self._lock:
            pend = self._pending.get(path)
            if pend is not None and (pend.size, pend.mtime_ns) == (size, mtime_ns):
                del self._pending[path]

    def next_due_in(self) -> float | None:
        """Seconds until the earliest pending file could be ready, for the poll loop's sleep."""
        with self._lock:
            if not self._pending:
                return None
            earliest = min(p.stable_since for p in self._pending.values())
        return max(0.0, earliest + self.settle_s - self.clock())

    def pop_ready(self) -> list[Path]:
        """Re-stat pending files; return (and forget) those unchanged for the whole settle window."""
        now = self.clock()
        ready: list[Path] = []
        with self._lock:
            items = list(self._pending.items())
        for path, pend in items:
            try:
                st = path.stat()
            except OSError:
                self.forget(path)  # deleted or renamed away before it settled
                continue
            with self._lock:
                if (st.st_size, st.st_mtime_ns) != (pend.size, pend.mtime_ns):
                    self._pending[path] = _Pending(st.st_size, st.st_mtime_ns, now)
                elif now - pend.stable_since >= self.settle_s:
                    self._pending.pop(path, None)
                    ready.append(path)
        return ready


class SettleQueue:
    """Files a scan found, released in the order found once `settle_s` has passed since their stat
    and a second stat agrees. Unlike `SettleTracker`, a look costs only what is due: a backlog of
    100k found photos is not re-stat'ed on every look."""

    def __init__(self, settle_s: float, clock: Callable[[], float] = time.monotonic):
        self.settle_s = settle_s
        self.clock = clock
        self._queue: deque[tuple[float, Path, int, int]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, path: Path, size: int, mtime_ns: int) -> None:
        self._queue.append((self.clock() + self.settle_s, path, size, mtime_ns))

    def next_due_in(self) -> float | None:
        if not self._queue:
            return None
        return max(0.0, self._queue[0][0] - self.clock())

    def pop_due(self, limit: int) -> list[Path]:
        """Up to `limit` files whose settle time has passed and which have not changed; a changed one
        waits another settle time, a vanished one is dropped."""
        ready: list[Path] = []
        now = self.clock()
        while self._queue and len(ready) < limit and self._queue[0][0] <= now:
            _, path, size, mtime_ns = self._queue.popleft()
            try:
                st = path.stat()
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns) == (size, mtime_ns):
                ready.append(path)
            else:
                self._queue.append((now + self.settle_s, path, st.st_size, st.st_mtime_ns))
        return ready
