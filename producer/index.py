"""What the producer already knows about each photo, so a rescan of a million costs a walk and a stat.

The sidecars (`<photo>.json`, `<photo>.error.json`) stay the truth: a photo is done when its sidecar
records this very file's size and mtime. Reading one sidecar per photo per rescan is what made a
rescan of 100k photos cost 24 s and 410 MB of reads, so the index remembers what a sidecar said, and
a rescan trusts it only while the sidecar is still listed in the output folder (a deleted output is
seen by the folder listing alone, without a stat). Whatever the index lacks or contradicts is read
from the sidecar again, so losing the index costs one slow rescan, never a wrong answer.

So that a rescan need not even list an output folder, it keeps each output folder's mtime from when
every output in it was last checked: deleting a file, or a worker writing one, moves that mtime, and
the folder is listed again. A folder changed within the last two seconds is not taken at its word
(the "racily clean" rule of git's index: a later change could land within the same mtime tick).

It also remembers which version of a photo was given which job: a photo waiting in a backlog of 100k
is not hashed and re-submitted by every rescan; one bulk look at its job's status is enough.

Why SQLite beside the output and not Redis: Redis holds live state, bounded by memory and emptied by
a `FLUSHALL` or a new server; the done set of an archive only grows, and belongs with the outputs it
describes. One writer (the watcher) holds it, so `locking_mode=EXCLUSIVE` lets WAL work even where
the output folder is a network share without shared memory.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

INDEX_NAME = ".depthq-index.sqlite"
_SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS done (
    folder TEXT NOT NULL, name TEXT NOT NULL,
    size INTEGER NOT NULL, mtime INTEGER NOT NULL, kind TEXT NOT NULL,
    PRIMARY KEY (folder, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outputs (
    folder TEXT NOT NULL PRIMARY KEY, mtime_ns INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queued (
    folder TEXT NOT NULL, name TEXT NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, job_id TEXT NOT NULL,
    PRIMARY KEY (folder, name)
) WITHOUT ROWID;
"""

_FOLDER_QUERY = """
SELECT 0, name, size, mtime, kind FROM done WHERE folder=?
UNION ALL SELECT 1, name, size, mtime_ns, job_id FROM queued WHERE folder=?
UNION ALL SELECT 2, folder, mtime_ns, 0, '' FROM outputs WHERE folder=?
"""


@dataclass(frozen=True)
class Done:
    """A sidecar's word: the photo of this size and mtime (whole seconds) ended as `kind`."""

    size: int
    mtime: int
    kind: str  # "json" (computed) or "error" (recorded error)


@dataclass(frozen=True)
class Queued:
    """The photo at this (size, mtime_ns) was given job `job_id`."""

    size: int
    mtime_ns: int
    job_id: str


class PhotoIndex:
    """The done and queued tables, one folder at a time (a folder is the rescan's unit of work)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._db = self._open(path)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a lost tail costs a sidecar read, never a wrong answer
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                db.executescript(" ".join(f"DROP TABLE IF EXISTS {t};" for t in ("done", "queued", "outputs")))
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    @classmethod
    def open_beside(cls, output_root: Path) -> PhotoIndex | None:
        """The index in the output folder; None (and said why) when it cannot be had, in which case
        the rescan reads sidecars as before: slower, never wrong. A corrupt file is started afresh."""
        path = output_root / INDEX_NAME
        try:
            output_root.mkdir(parents=True, exist_ok=True)
            return cls(path)
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc):
                log.warning("%s is held by another watcher of this output folder; rescans read sidecars", path)
                return None
            log.warning("%s is unreadable (%s); starting it afresh from the sidecars", path, exc)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            try:
                return cls(path)
            except (sqlite3.Error, OSError) as again:
                log.warning("no photo index at %s (%s); rescans read sidecars", path, again)
                return None
        except OSError as exc:
            log.warning("no photo index at %s (%s); rescans read sidecars", path, exc)
            return None

    def folder(self, folder: str) -> tuple[dict[str, tuple[int, int, str]], dict[str, Queued], int | None]:
        """Everything known about the photos directly in `folder` ('' for the root): name -> (size,
        mtime, kind) of what is done (plain tuples: a rescan asks this of every photo), name -> the
        job given to a version, and the output folder's mtime when all of it was last seen listed."""
        done: dict[str, tuple[int, int, str]] = {}
        queued: dict[str, Queued] = {}
        listed_at: int | None = None
        with self._lock:
            rows = self._db.execute(_FOLDER_QUERY, (folder, folder, folder)).fetchall()  # one query a folder
        for table, name, size, mtime, text in rows:
            if table == 0:
                done[name] = (size, mtime, text)
            elif table == 1:
                queued[name] = Queued(size, mtime, text)
            else:
                listed_at = size
        return done, queued, listed_at

    def record_listed(self, folder: str, mtime_ns: int) -> None:
        """Every output in this folder was listed and checked while the folder had this mtime."""
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO outputs VALUES (?, ?)", (folder, mtime_ns))

    def record_done(self, rows: Iterable[tuple[str, str, Done]]) -> None:
        """(folder, name, what its sidecar says): done, and so no longer queued."""
        rows = list(rows)
        done = [(f, n, d.size, d.mtime, d.kind) for f, n, d in rows]
        self._write(
            ("INSERT OR REPLACE INTO done VALUES (?, ?, ?, ?, ?)", done),
            ("DELETE FROM queued WHERE folder=? AND name=?", [(f, n) for f, n, _ in rows]),
        )

    def record_queued(self, rows: Iterable[tuple[str, str, Queued]]) -> None:
        queued = [(f, n, q.size, q.mtime_ns, q.job_id) for f, n, q in rows]
        self._write(("INSERT OR REPLACE INTO queued VALUES (?, ?, ?, ?, ?)", queued))

    def forget(self, rows: Iterable[tuple[str, str]]) -> None:
        """Entries the disk contradicts (output deleted by hand, photo gone): dropped, not trusted."""
        rows = list(rows)
        self._write(
            ("DELETE FROM done WHERE folder=? AND name=?", rows),
            ("DELETE FROM queued WHERE folder=? AND name=?", rows),
        )

    def _write(self, *statements: tuple[str, list[tuple[object, ...]]]) -> None:
        """Each statement over its rows, all in one transaction; nothing at all when there are no rows."""
        if not any(rows for _, rows in statements):
            return
        with self._lock, self._db:
            self._db.execute("BEGIN")
            for sql, rows in statements:
                self._db.executemany(sql, rows)

    def forget_folders_except(self, folders: set[str]) -> int:
        """After a whole walk: drop the entries of folders that no longer exist. Returns how many."""
        with self._lock, self._db:
            rows = self._db.execute("SELECT DISTINCT folder FROM done UNION SELECT DISTINCT folder FROM queued")
            known = {row[0] for row in rows}
            gone = sorted(known - folders)
            if gone:
                self._db.execute("BEGIN")
                self._db.executemany("DELETE FROM done WHERE folder=?", [(f,) for f in gone])
                self._db.executemany("DELETE FROM queued WHERE folder=?", [(f,) for f in gone])
                self._db.executemany("DELETE FROM outputs WHERE folder=?", [(f,) for f in gone])
        return len(gone)

    def counts(self) -> tuple[int, int]:
        """(done, queued) rows: what the watcher reports to `depthq status`."""
        with self._lock:
            done = self._db.execute("SELECT count(*) FROM done").fetchone()[0]
            queued = self._db.execute("SELECT count(*) FROM queued").fetchone()[0]
        return int(done), int(queued)

    def close(self) -> None:
        with self._lock:
            self._db.close()
