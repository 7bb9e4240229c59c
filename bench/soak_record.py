"""The soak's own records: a ledger of every file it wrote into the watched folder, and a timeline.

The ledger is how the soak knows, at the end, what must exist without asking the service: for every
name it wrote, the content now there (its sha256, size and mtime), whether that content is a bad file
that must get an error file, every good content the name ever held (a name is computed once per
content, so that bounds its computations), and whether it was deleted or moved away meanwhile. The
service is judged against this, never against its own view of the folder.

The timeline is what happened when, in seconds since the soak started, for the report and for
telling a duplicate computation that a fault caused from one that it did not.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath


class Timeline:
    """Events in order, each stamped with seconds since `start`; safe to add to from any thread."""

    def __init__(self, echo: Callable[[str], None] | None = None) -> None:
        self.start_monotonic = time.monotonic()
        # Wall-clock time of the start, to place the service's own log lines (which carry wall time).
        self.start_wall = time.time()
        self.events: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._echo = echo

    def now(self) -> float:
        """Seconds since the soak started."""
        return time.monotonic() - self.start_monotonic

    def add(self, event: str) -> float:
        t = self.now()
        with self._lock:
            self.events.append((t, event))
        if self._echo is not None:
            self._echo(f"[{t:7.1f} s] {event}")
        return t

    def wall_to_soak(self, wall: float) -> float:
        """A wall-clock time (epoch seconds, as log lines carry) as seconds since the soak started."""
        return wall - self.start_wall


@dataclass
class Entry:
    """One name in the watched folder, as the soak last left it."""

    rel: str  # under the watched folder, POSIX, exactly the bytes written (NFC and NFD differ)
    pattern: str  # how it was written: plain, slow, part, rsync, ...
    sha256: str
    size: int
    mtime: float
    bad: bool  # not a photo (empty, truncated, text): must get an error file, never a sidecar
    written_at: float  # seconds since the soak started
    # Every good content the name held, in order: each is one job, so one computation at most.
    versions: list[str] = field(default_factory=list)
    gone: str | None = None  # "deleted", or "moved to <rel>": nothing is expected for this name any more

    @property
    def present(self) -> bool:
        return self.gone is None


def file_digest(path: Path) -> tuple[str, os.stat_result]:
    """The file's sha256 and its stat, taken together (stat after reading, so both describe one version)."""
    with path.open("rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return sha, path.stat()


class Ledger:
    """Every file the soak wrote, by name. Thread-safe: the load's writer threads all record here."""

    def __init__(self, watch: Path) -> None:
        self.watch = watch
        self.entries: dict[str, Entry] = {}
        # Names taken by a writer that has not finished: no other pattern may copy, move or overwrite them.
        self.busy: set[str] = set()
        self.files_by_pattern: Counter[str] = Counter()
        self.bad_by_pattern: Counter[str] = Counter()
        self._lock = threading.Lock()

    def path(self, rel: str) -> Path:
        """The file's path; refuses a name that would land outside the watched folder (a harness bug)."""
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "" in rel.split("/"):
            raise ValueError(f"{rel!r} is not a plain relative name under the watched folder")
        return self.watch.joinpath(*parts)

    def claim(self, rel: str) -> bool:
        """Reserve a name for a writer; False if another writer has it."""
        with self._lock:
            if rel in self.busy:
                return False
            self.busy.add(rel)
            return True

    def release(self, rel: str) -> None:
        with self._lock:
            self.busy.discard(rel)

    def record(self, rel: str, pattern: str, bad: bool, written_at: float) -> Entry:
        """The file at `rel` as it is now on disk: a new name, or a new content for a known one."""
        sha, st = file_digest(self.path(rel))
        with self._lock:
            entry = self.entries.get(rel)
            if entry is None or entry.gone is not None:
                entry = Entry(rel, pattern, sha, st.st_size, st.st_mtime, bad, written_at)
                self.entries[rel] = entry
            else:
                entry.pattern, entry.bad, entry.written_at = pattern, bad, written_at
                entry.sha256, entry.size, entry.mtime = sha, st.st_size, st.st_mtime
            if not bad and sha not in entry.versions:
                entry.versions.append(sha)
            self.files_by_pattern[pattern] += 1
            self.bad_by_pattern[pattern] += bad
        return entry

    def forget(self, rel: str, why: str) -> None:
        with self._lock:
            self.entries[rel].gone = why

    def pick(self, rng: random.Random, accept: Callable[[Entry], bool], tries: int = 20) -> Entry | None:
        """A random present, idle entry that `accept` takes; None if `tries` draws find none."""
        with self._lock:
            candidates = [e for e in self.entries.values() if e.present and e.rel not in self.busy]
        for entry in rng.sample(candidates, min(tries, len(candidates))):
            if accept(entry):
                return entry
        return None

    def present(self) -> list[Entry]:
        with self._lock:
            return [e for e in self.entries.values() if e.present]

    def all(self) -> list[Entry]:
        with self._lock:
            return list(self.entries.values())

    def save(self, path: Path) -> None:
        """The ledger as JSON, one object per name, for a kept soak folder (`--keep`)."""
        path.write_text(json.dumps([asdict(e) for e in self.all()], indent=1, ensure_ascii=False))
