"""Where a job's photo comes from and where its outputs go, as its payload's `transport` says.

shared: the photo is a file under this host's mount of the job's named root, and the outputs go
into `output.dir`, a folder every host shares. redis: the producer put the photo's bytes in Redis,
and the outputs go back through Redis to the collector on the producer's host; this host needs no
shared disk at all. The job code above this sees the same calls either way, and asks a transport
what it can do (`copies`), never which one it is.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from redis import Redis

from depthq.config import Config
from depthq.contract import (
    JobPayload,
    PayloadError,
    done_key,
    photo_key,
    root_folder,
    safe_relative,
    source_stamp,
)
from depthq.environment import is_environment_failure
from worker.errors import BadInputError, ExpectedError, SourceGoneError, SourceUnavailableError, SourceUnreadableError
from worker.store import (
    HandedOverError,
    OutputStore,
    RedisResultStore,
    Store,
    StoredResult,
    SupersededError,
    job_owner,
)


class PhotoGoneError(ExpectedError):
    """The photo's bytes are no longer in Redis: collected already, or expired. Nothing is wrong with
    the photo, so no error file is written; the producer's rescan sends it again if it has no output."""

    kind = "photo_gone"


class AlreadyDoneError(Exception):
    """The photo's bytes are gone because another worker already did this job and its result was
    collected (a worker cut off and back handed it in first). The job ends as done."""


class RootNotMappedError(RuntimeError):
    """This worker does not map the job's root. Retried (another worker may map it); the message says
    which setting to add."""


@dataclass(frozen=True)
class Photo:
    """The bytes a job reads, and the stamp its sidecar records (size, whole-second mtime)."""

    data: bytes
    stamp: dict[str, int]


class Copies(Protocol):
    """What lets byte-identical photos share one computation: reading a copy by its name (an alias
    queued while its job was pending) and an earlier result (a `same_as` job), and writing a copy's
    outputs. Only a transport whose workers see the watched folder and the output folder has it."""

    # Where a copy's outputs go: the output folder itself (a copy's set is its own; no fence).
    output: OutputStore

    def read_copy(self, root: str, source: str) -> Photo: ...

    def stored_result(self, source: str) -> StoredResult | None:
        """The depth, preview and sidecar stored for `source`, or None if it has no whole set."""
        ...


class ClipFiles(Protocol):
    """What a video clip's jobs need: the clip's file on this host, and the output folder where its chunks
    are staged and its outputs written. Only a transport whose workers see both has it."""

    output: OutputStore

    def clip_path(self, p: JobPayload) -> Path:
        """The clip on this host's disk (SourceGoneError, SourceUnreadableError as for a photo)."""
        ...

    def store(self, job_id: str, p: JobPayload | None = None, photo: Photo | None = None) -> OutputStore: ...


class Transport(Protocol):
    @property
    def copies(self) -> Copies | None:
        """How byte-identical copies share a result here, or None where they cannot (each its own job)."""
        ...

    @property
    def clips(self) -> ClipFiles | None:
        """How a clip's jobs reach its file and the outputs, or None where they cannot (no clip is sent)."""
        ...

    def read(self, p: JobPayload, job_id: str) -> Photo: ...

    def stamp(self, p: JobPayload) -> dict[str, int] | None:
        """The photo's stamp for an error record, if it can be had without reading it."""
        ...

    def store(self, job_id: str, p: JobPayload | None = None, photo: Photo | None = None) -> Store: ...


def source_path(watch_root: Path, source: str) -> Path:
    """The photo on this host's disk; refuses anything that resolves outside the root."""
    path = watch_root.joinpath(*safe_relative(source).parts)
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise SourceGoneError(f"{source}: the file no longer exists in {watch_root} (moved or deleted)") from None
    except OSError as exc:
        _unless_unavailable(watch_root, exc)
        raise SourceUnreadableError(f"{source}: cannot be read ({exc.strerror})") from None
    if not resolved.is_relative_to(watch_root.resolve()):
        raise SourceUnreadableError(
            f"{source}: resolves outside the watch root {watch_root}; symlinks out of it are refused"
        )
    if not resolved.is_file():
        raise SourceUnreadableError(f"{source}: not a regular file")
    return resolved


def read_file(path: Path, source: str) -> Photo:
    """The bytes and the stamp of one open file, so the recorded stamp is that of what was read."""
    try:
        with path.open("rb") as f:
            return Photo(f.read(), source_stamp(os.fstat(f.fileno())))
    except FileNotFoundError:
        raise SourceGoneError(f"{source}: the file no longer exists (moved or deleted)") from None
    except PermissionError:
        raise SourceUnreadableError(
            f"{source}: permission denied; make the file readable by the worker's user"
        ) from None
    except IsADirectoryError:
        raise SourceUnreadableError(f"{source}: is a folder, not a photo") from None
    except OSError as exc:
        _unless_unavailable(path.parent, exc)
        raise SourceUnreadableError(f"{source}: cannot be read ({exc.strerror})") from None


def _unless_unavailable(folder: Path, exc: OSError) -> None:
    """An I/O error or a share gone is the mount's failure, retried without cost to the photo; a
    permission problem stays the photo's (its error file says how to fix it)."""
    if is_environment_failure(exc) and exc.errno not in (errno.EACCES, errno.EPERM):
        raise SourceUnavailableError(str(folder), "", exc) from exc


class SharedTransport:
    """The photo from this host's mount of the job's root; the outputs into the shared output folder.

    Its results are fenced as the redis transport's are: just before they land, the job must still be
    this worker's (not handed to another while this one was frozen or cut off), and the photo must
    still be the one that was read (not rewritten meanwhile, which gives it a newer job).
    """

    def __init__(self, config: Config, store: OutputStore, connection: Redis | None = None, worker_name: str = ""):
        self.config = config
        self.output = store
        self.connection = connection
        self.worker_name = worker_name

    def folder(self, root: str) -> Path:
        try:
            return root_folder(self.config, root)
        except PayloadError as exc:
            raise RootNotMappedError(str(exc)) from None

    @property
    def copies(self) -> SharedTransport:
        return self

    @property
    def clips(self) -> SharedTransport:
        return self

    def clip_path(self, p: JobPayload) -> Path:
        return source_path(self.folder(p.root), p.source)

    def read(self, p: JobPayload, job_id: str) -> Photo:
        return self.read_copy(p.root, p.source)

    def read_copy(self, root: str, source: str) -> Photo:
        return read_file(source_path(self.folder(root), source), source)

    def stored_result(self, source: str) -> StoredResult | None:
        return self.output.read_result(source)

    def stamp(self, p: JobPayload) -> dict[str, int] | None:
        # Stamped as the producer sees it (following links, even out of the root: stat reads no
        # content). A photo that is gone has nothing to stamp.
        with contextlib.suppress(OSError, RootNotMappedError):
            return source_stamp(self.folder(p.root).joinpath(*safe_relative(p.source).parts).stat())
        return None

    def store(self, job_id: str, p: JobPayload | None = None, photo: Photo | None = None) -> OutputStore:
        def fence() -> None:
            if self.connection is not None:
                owner = job_owner(self.connection, job_id)
                if owner is not None and owner != self.worker_name:
                    raise HandedOverError(job_id, owner)
            if p is None or photo is None:
                return
            try:
                now = source_stamp(source_path(self.folder(p.root), p.source).stat())
            except (OSError, BadInputError, RootNotMappedError):
                return  # gone or unreadable now: what was read is still the last version anyone saw
            if now != photo.stamp:
                raise SupersededError(
                    f"{p.source} changed while its depth was computed (size, mtime {photo.stamp} -> {now}); "
                    "this result is dropped, and the new version gets its own"
                )

        return OutputStore(self.output.root, fence)


class RedisTransport:
    """The photo's bytes from Redis; the outputs back through Redis (`RedisResultStore`)."""

    def __init__(self, config: Config, connection: Redis, worker_name: str):
        self.config = config
        self.connection = connection
        self.worker_name = worker_name

    @property
    def copies(self) -> None:
        """None: a worker here reads no file, so a copy is a job of its own (the producer sends it so)."""
        return None

    @property
    def clips(self) -> None:
        """None: the producer sends no clip over this transport yet (its watcher does not take clips)."""
        return None

    def read(self, p: JobPayload, job_id: str) -> Photo:
        data = self.connection.get(photo_key(self.config.queue.name, job_id))
        if data is None:
            owner = job_owner(self.connection, job_id)
            if owner is not None and owner != self.worker_name:
                raise HandedOverError(job_id, owner)  # and the other worker collected it already
            if self.connection.exists(done_key(self.config.queue.name, job_id)):
                raise AlreadyDoneError(f"{p.source}: job {job_id} was done by another worker meanwhile")
            raise PhotoGoneError(
                f"{p.source}: its bytes are no longer in Redis (collected already, or older than "
                f"transport.blob_ttl_s={self.config.transport.blob_ttl_s}); the producer sends it again "
                "on its next rescan if it has no output"
            )
        assert isinstance(data, bytes)
        return Photo(data, self.stamp(p))

    def stamp(self, p: JobPayload) -> dict[str, int]:
        # The producer stat'ed the photo when it read the bytes; its "is it done?" check compares this.
        return {"size": p.size, "mtime": int(p.mtime)}

    def store(self, job_id: str, p: JobPayload | None = None, photo: Photo | None = None) -> RedisResultStore:
        t = self.config.transport
        q = self.config.queue
        return RedisResultStore(
            self.connection, q.name, job_id, self.worker_name, t.blob_ttl_s, t.zstd_level, q.result_ttl_s
        )
