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
describes. One writer (the watcher) holds it, by a lock on `.depthq-index.lock` beside it; readers
(`depthq audit`) read it at the same time, which WAL allows. Where the output folder is a share
without shared memory for WAL, the writer takes SQLite's exclusive locking mode instead, and readers
go without it (they read the sidecars).

The index sits on the output disk, so it meets what the outputs meet: a full disk, a read-only
remount. Such a write is skipped and said once (`depthq.environment`); the rescan carries on, reading
sidecars where the index has no answer, and the index takes writes again once the disk does. Only a
file SQLite calls corrupt is started afresh: a full disk at start is no reason to throw it away.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from depthq.environment import describe, is_environment_failure
from depthq.outage import Outage

log = logging.getLogger(__name__)

INDEX_NAME = ".depthq-index.sqlite"
# Held (flock) by the one watcher that writes the index.
LOCK_NAME = ".depthq-index.lock"
# The index's own files in the output folder, which are no one's outputs.
INDEX_FILES = frozenset({INDEX_NAME, f"{INDEX_NAME}-wal", f"{INDEX_NAME}-shm", f"{INDEX_NAME}-journal", LOCK_NAME})
# SQLite's result codes for a file that is not a database, or a broken one: only then is it rebuilt.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
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


class IndexHeldError(Exception):
    """Another watcher writes this index (it holds the lock beside it)."""


def _corrupt(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


class PhotoIndex:
    """The done and queued tables, one folder at a time (a folder is the rescan's unit of work).

    `read_only`: a reader beside the running watcher (`depthq audit`), which never writes.
    """

    def __init__(self, path: Path, read_only: bool = False):
        self.path = path
        self.read_only = read_only
        self.in_memory = str(path) == ":memory:"
        self._lock = threading.Lock()
        self._lock_file: int | None = None
        # Whether the last write was refused by the disk: the outage and its end are said once each.
        self.failing = Outage()
        # Whether the last read failed (said once): a reader then stops asking, and reads sidecars.
        self._unreadable = False
        if not self.in_memory and not read_only:
            self._lock_file = self._take_writer_lock(path.with_name(LOCK_NAME))
        try:
            self._db = self._open_reader(path) if read_only else self._open(path)
        except BaseException:
            self._release_writer_lock()
            raise

    @staticmethod
    def _take_writer_lock(path: Path) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise IndexHeldError(f"{path} is held by another watcher of this output folder") from None
        except OSError:
            os.close(fd)
            raise
        return fd

    def _release_writer_lock(self) -> None:
        if self._lock_file is not None:
            os.close(self._lock_file)  # closing the descriptor releases the flock
            self._lock_file = None

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        try:
            return PhotoIndex._open_with(path, exclusive=False)
        except sqlite3.OperationalError as exc:
            if is_environment_failure(exc) and "shm" not in str(exc).lower():
                raise
            # WAL needs shared memory beside the file, which some shares cannot give: exclusive mode
            # keeps WAL's index in this process alone (and readers go without the index).
            log.info("%s: no shared memory for WAL here (%s); using exclusive locking", path, exc)
            return PhotoIndex._open_with(path, exclusive=True)

    @staticmethod
    def _open_with(path: Path, exclusive: bool) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            if exclusive:
                db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a lost tail costs a sidecar read, never a wrong answer
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                db.executescript(" ".join(f"DROP TABLE IF EXISTS {t};" for t in ("done", "queued", "outputs")))
            db.executescript(_SCHEMA)
            if version != _SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except sqlite3.Error:
            db.close()
            raise
        return db

    @staticmethod
    def _open_reader(path: Path) -> sqlite3.Connection:
        if not path.is_file():
            raise FileNotFoundError(path)
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False, timeout=2.0)
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"{path} has another schema version")
        except sqlite3.Error:
            db.close()
            raise
        return db

    @classmethod
    def open_beside(cls, output_root: Path, again: bool = False) -> PhotoIndex | None:
        """The index in the output folder; None (and said why) when it cannot be had, in which case
        the rescan reads sidecars as before: slower, never wrong. A corrupt file is started afresh;
        a full or read-only disk leaves it as it is (the caller tries again later: `again` says so,
        and the reasons it was said before are not said again)."""
        path = output_root / INDEX_NAME
        level = logging.DEBUG if again else logging.WARNING
        try:
            output_root.mkdir(parents=True, exist_ok=True)
            return cls(path)
        except IndexHeldError:
            log.log(level, "%s is held by another watcher of this output folder; rescans read sidecars", path)
            return None
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc):
                log.log(level, "%s is held by another watcher of this output folder; rescans read sidecars", path)
                return None
            if not _corrupt(exc):
                log.log(
                    level, "no photo index at %s for now (%s); rescans read sidecars meanwhile", path, describe(exc)
                )
                return None
            log.warning("%s is unreadable (%s); starting it afresh from the sidecars", path, exc)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            try:
                return cls(path)
            except (sqlite3.Error, OSError, IndexHeldError) as again:
                log.warning("no photo index at %s (%s); rescans read sidecars", path, again)
                return None
        except OSError as exc:
            log.log(level, "no photo index at %s for now (%s); rescans read sidecars meanwhile", path, describe(exc))
            return None

    @classmethod
    def open_reader(cls, output_root: Path) -> PhotoIndex | None:
        """The index for reading beside a running watcher (`depthq audit`); None where there is none,
        or the watcher holds it exclusively (a share without shared memory): then read the sidecars."""
        try:
            return cls(output_root / INDEX_NAME, read_only=True)
        except (sqlite3.Error, OSError) as exc:
            log.info("no photo index to read at %s (%s); reading the sidecars", output_root / INDEX_NAME, exc)
            return None

    def _refused(self, exc: sqlite3.Error) -> None:
        """A write the disk refused (or a file gone bad): said once, and the index carries on without it."""
        if self.failing.begins():
            how = "the disk refuses writes" if is_environment_failure(exc) else "SQLite refuses it"
            log.error(
                "the photo index %s cannot be written (%s: %s); rescans go on and read sidecars where it has "
                "no answer, and it is written again once it can be",
                self.path,
                how,
                describe(exc),
            )

    def _wrote(self) -> None:
        if self.failing.ends():
            log.warning("the photo index %s takes writes again", self.path)

    def folder(self, folder: str) -> tuple[dict[str, tuple[int, int, str]], dict[str, Queued], int | None]:
        """Everything known about the photos directly in `folder` ('' for the root): name -> (size,
        mtime, kind) of what is done (plain tuples: a rescan asks this of every photo), name -> the
        job given to a version, and the output folder's mtime when all of it was last seen listed."""
        done: dict[str, tuple[int, int, str]] = {}
        queued: dict[str, Queued] = {}
        listed_at: int | None = None
        if self.read_only and self._unreadable:
            rows = []  # it failed once: a reader reads the sidecars from then on, without waiting on it
        else:
            try:
                with self._lock:
                    rows = self._db.execute(_FOLDER_QUERY, (folder, folder, folder)).fetchall()  # one a folder
            except sqlite3.Error as exc:
                if not self._unreadable:
                    log.warning("the photo index %s cannot be read (%s); reading the sidecars", self.path, exc)
                self._unreadable = True
                rows = []
            else:
                self._unreadable = False
        for table, name, size, mtime, text in rows:
            if table == 0:
                done[name] = (size, mtime, text)
            elif table == 1:
                queued[name] = Queued(size, mtime, text)
            else:
                listed_at = size
        return done, queued, listed_at

    def update_folder(
        self,
        folder: str,
        forget: Iterable[tuple[str, str]],
        done: Iterable[tuple[str, str, Done]],
        listed_mtime_ns: int | None,
    ) -> bool:
        """What one rescan of a folder learned, in one transaction: entries the disk contradicts
        (an output deleted by hand, a photo gone), what sidecars say is done, and, if given, that every
        output in the folder was listed and checked while it had this mtime. All or nothing: a folder
        recorded as checked while a contradicted entry stayed would hide a deleted output."""
        forget = list(forget)
        done_rows = [(f, n, d.size, d.mtime, d.kind) for f, n, d in done]
        statements: list[tuple[str, list[tuple[object, ...]]]] = [
            ("DELETE FROM done WHERE folder=? AND name=?", forget),
            ("DELETE FROM queued WHERE folder=? AND name=?", forget),
            ("INSERT OR REPLACE INTO done VALUES (?, ?, ?, ?, ?)", done_rows),
            ("DELETE FROM queued WHERE folder=? AND name=?", [(f, n) for f, n, *_ in done_rows]),
        ]
        if listed_mtime_ns is not None:
            statements.append(("INSERT OR REPLACE INTO outputs VALUES (?, ?)", [(folder, listed_mtime_ns)]))
        return self._write(*statements)

    def record_done(self, rows: Iterable[tuple[str, str, Done]]) -> bool:
        """(folder, name, what its sidecar says): done, and so no longer queued."""
        rows = list(rows)
        done = [(f, n, d.size, d.mtime, d.kind) for f, n, d in rows]
        return self._write(
            ("INSERT OR REPLACE INTO done VALUES (?, ?, ?, ?, ?)", done),
            ("DELETE FROM queued WHERE folder=? AND name=?", [(f, n) for f, n, _ in rows]),
        )

    def record_queued(self, rows: Iterable[tuple[str, str, Queued]]) -> bool:
        queued = [(f, n, q.size, q.mtime_ns, q.job_id) for f, n, q in rows]
        return self._write(("INSERT OR REPLACE INTO queued VALUES (?, ?, ?, ?, ?)", queued))

    def forget(self, rows: Iterable[tuple[str, str]]) -> bool:
        """Entries the disk contradicts (output deleted by hand, photo gone): dropped, not trusted."""
        rows = list(rows)
        return self._write(
            ("DELETE FROM done WHERE folder=? AND name=?", rows),
            ("DELETE FROM queued WHERE folder=? AND name=?", rows),
        )

    def _write(self, *statements: tuple[str, list[tuple[object, ...]]]) -> bool:
        """Each statement over its rows, all in one transaction; nothing at all when there are no rows.
        False when the disk (or SQLite) refused it: then nothing of it was written."""
        if self.read_only or not any(rows for _, rows in statements):
            return not self.read_only
        try:
            with self._lock, self._db:
                self._db.execute("BEGIN")
                for sql, rows in statements:
                    self._db.executemany(sql, rows)
        except sqlite3.Error as exc:
            self._refused(exc)
            return False
        self._wrote()
        return True

    def forget_folders_except(self, folders: set[str]) -> int:
        """After a whole walk: drop the entries of folders that no longer exist. Returns how many."""
        if self.read_only:
            return 0
        try:
            with self._lock:
                rows = self._db.execute("SELECT DISTINCT folder FROM done UNION SELECT DISTINCT folder FROM queued")
                gone = sorted({row[0] for row in rows} - folders)
        except sqlite3.Error as exc:
            self._refused(exc)
            return 0
        written = self._write(
            ("DELETE FROM done WHERE folder=?", [(f,) for f in gone]),
            ("DELETE FROM queued WHERE folder=?", [(f,) for f in gone]),
            ("DELETE FROM outputs WHERE folder=?", [(f,) for f in gone]),
        )
        return len(gone) if written else 0

    def counts(self) -> tuple[int, int]:
        """(done, queued) rows: what the watcher reports to `depthq status`."""
        try:
            with self._lock:
                done = self._db.execute("SELECT count(*) FROM done").fetchone()[0]
                queued = self._db.execute("SELECT count(*) FROM queued").fetchone()[0]
        except sqlite3.Error:
            return 0, 0
        return int(done), int(queued)

    def close(self) -> None:
        """Close the database (its last connection checkpoints the WAL and removes it), then let go of
        the writer's lock. Safe to call twice."""
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._release_writer_lock()
