"""Where a job's outputs go: a folder (`OutputStore`), or back through Redis to a collector
(`RedisResultStore`). Both take the same calls from the job, data first and the sidecar last.

In a folder, every file is atomic (temp file in the same folder, then rename) and the sidecar JSON is
written after the data files, so its presence means the whole set is there. Through Redis, the set
travels as one hash and one stream entry, written in one transaction: the collector sees all or none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import zstandard
from redis import Redis
from rq.job import Job

from depthq.contract import (
    COMPRESSED_KINDS,
    ERROR_KIND,
    done_key,
    inflight_key,
    output_path,
    result_key,
    results_stream,
)
from depthq.environment import free_space, is_environment_failure
from depthq.files import atomic_bytes, json_bytes, staged_write
from depthq.sidecar import Sidecar
from worker.errors import OutputUnavailableError
from worker.formats import Scene, extra_files, npy_bytes


class HandedOverError(Exception):
    """This worker was out of reach so long that its job went to another worker (rq's abandoned-job
    handling). Its copy of the job ends quietly: the other worker's result is the one that counts."""

    def __init__(self, job_id: str, owner: str):
        super().__init__(f"job {job_id} was handed to {owner} while this worker was out of reach; its copy is dropped")
        self.owner = owner


@dataclass(frozen=True)
class StoredResult:
    """A photo's whole output set read back: what a byte-identical copy reuses instead of the model."""

    depth: np.ndarray
    preview: bytes
    sidecar: Sidecar


class Store(Protocol):
    """What a job writes, in this order: write_data, then write_sidecar; or write_error alone.

    `scene` (the photo's colours and camera) is needed for a PLY only; without one, none is written.
    """

    def write_data(
        self, source: str, depth: np.ndarray, preview: bytes, formats: Iterable[str], scene: Scene | None = None
    ) -> None: ...

    def write_sidecar(self, source: str, sidecar: Sidecar) -> None: ...

    def write_error(self, source: str, error: dict[str, Any]) -> None: ...


@contextmanager
def output_failures(root: Path) -> Iterator[None]:
    """Turn a full, read-only or failing output folder into OutputUnavailableError, naming its free space,
    however the failure shows itself (an errno, numpy's short write: `depthq.environment`)."""
    try:
        yield
    except OSError as exc:
        if not is_environment_failure(exc):
            raise
        raise OutputUnavailableError(str(root), free_space(root), exc) from exc


class SupersededError(Exception):
    """The photo changed on disk while this job computed it: the result describes content that no longer
    exists, and the newer version has (or will have) its own job. The result is dropped, not written."""


class OutputStore:
    """The output folder on this host (the shared transport, and every single-machine setup).

    The data files are written under temporary names first and renamed into place only with the
    sidecar, after `fence` (if given) has had its say: a worker that lost its job (frozen, cut off) or
    whose photo was rewritten meanwhile raises there, and nothing of its result lands.
    """

    def __init__(self, root: Path, fence: Callable[[], None] | None = None):
        self.root = root
        self.fence = fence
        self._staged: list[tuple[Path, Path]] = []

    def path(self, source: str, kind: str) -> Path:
        return output_path(self.root, source, kind)

    def write_data(
        self, source: str, depth: np.ndarray, preview: bytes, formats: Iterable[str], scene: Scene | None = None
    ) -> None:
        """Everything but the sidecar, staged. Callers write the sidecar after, so it can carry the write time."""
        files: dict[str, Callable[[IO[bytes]], Any]] = {
            # np.save streams into the file: no second copy of a 48 MB map in memory.
            "npy": lambda f: np.save(f, depth.astype(np.float32, copy=False)),
            "preview": lambda f: f.write(preview),
        }
        for kind, data in extra_files(depth, formats, scene).items():
            files[kind] = lambda f, data=data: f.write(data)
        self._discard()
        try:
            with output_failures(self.root):
                for kind, write in files.items():
                    path = self.path(source, kind)
                    self._staged.append((staged_write(path, write), path))
        except BaseException:
            self._discard()  # the files staged before the one that failed would be left for good
            raise

    def write_sidecar(self, source: str, sidecar: Sidecar) -> None:
        """The last file of a set: its presence tells readers the set is complete.

        The sidecar is staged too before anything is renamed, so every byte of the set is on disk
        before the first rename: a disk that fills up leaves the old set as it was, never new data
        files beside an old sidecar."""
        try:
            with output_failures(self.root):
                sidecar_path = self.path(source, "json")
                data = json_bytes(sidecar.to_dict())
                self._staged.append((staged_write(sidecar_path, lambda f: f.write(data)), sidecar_path))
            if self.fence is not None:
                self.fence()
            with output_failures(self.root):
                for tmp, path in self._staged:
                    os.replace(tmp, path)
                self._staged = []
                self.path(source, ERROR_KIND).unlink(missing_ok=True)  # superseded by this result
        finally:
            self._discard()

    def _discard(self) -> None:
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged = []

    def write_result(
        self,
        source: str,
        depth: np.ndarray,
        preview: bytes,
        sidecar: Sidecar,
        formats: Iterable[str],
        scene: Scene | None = None,
    ) -> None:
        self.write_data(source, depth, preview, formats, scene)
        self.write_sidecar(source, sidecar)

    def read_result(self, source: str) -> StoredResult | None:
        """The stored depth, preview and sidecar of `source`, or None if any is missing or unreadable."""
        try:
            sidecar = Sidecar.from_dict(json.loads(self.path(source, "json").read_text(encoding="utf-8")))
            depth = np.load(self.path(source, "npy"), allow_pickle=False)
            preview = self.path(source, "preview").read_bytes()
        except (OSError, ValueError):
            return None
        return StoredResult(depth, preview, sidecar) if sidecar is not None else None

    def write_error(self, source: str, error: dict[str, Any]) -> None:
        if self.fence is not None:
            self.fence()
        with output_failures(self.root):
            atomic_bytes(self.path(source, ERROR_KIND), json_bytes(error))


# The result goes in only if the job is still this worker's: a worker cut off mid-job, whose job
# another worker has taken over, must not send a second result when its network comes back.
# A photo's own result also marks its job done (KEYS[5], for ARGV[6] seconds when not 0), in the same
# step: a worker killed just after sending leaves a job whose bytes the collector may free at once, and
# the worker it is handed to must then find it done, not its photo gone.
_SEND_RESULT = """
local owner = redis.call('HGET', KEYS[1], 'worker_name')
if owner and owner ~= '' and owner ~= ARGV[1] then return owner end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('XADD', KEYS[3], '*', 'job', ARGV[3], 'source', ARGV[4])
redis.call('HINCRBY', KEYS[4], ARGV[3], ARGV[5])
if ARGV[6] ~= '0' then redis.call('SET', KEYS[5], ARGV[4], 'EX', ARGV[6]) end
return false
"""


class RedisResultStore:
    """One job's outputs, sent back through Redis (the redis transport): the worker shares no disk.

    The files go into one hash, and an entry on the results stream tells the collectors; both in one
    script, so a collector never finds half a set, and only while the job is still this worker's.
    The bytes are added to the job's entry in the in-flight hash, which the producer reads to hold
    new photos back while Redis holds enough.
    """

    def __init__(
        self,
        connection: Redis,
        queue_name: str,
        job_id: str,
        worker_name: str,
        ttl_s: int,
        zstd_level: int,
        done_ttl_s: int = 86400,
    ):
        self.connection = connection
        # How long the job's done marker lives (`queue.result_ttl_s`, as the job's own `_drain_aliases` sets it).
        self.done_ttl_s = max(done_ttl_s, 60)
        self.queue_name = queue_name
        self.job_id = job_id
        self.worker_name = worker_name
        self.ttl_s = ttl_s
        self.compressor = zstandard.ZstdCompressor(level=zstd_level)
        self._pending: dict[str, bytes] = {}

    def write_data(
        self, source: str, depth: np.ndarray, preview: bytes, formats: Iterable[str], scene: Scene | None = None
    ) -> None:
        files = {"npy": npy_bytes(depth), "preview": preview, **extra_files(depth, formats, scene)}
        # Lossless; a float32 map compresses to about 0.84, and PNGs are compressed already.
        self._pending = {k: self.compressor.compress(v) if k in COMPRESSED_KINDS else v for k, v in files.items()}

    def write_sidecar(self, source: str, sidecar: Sidecar) -> None:
        self._send(source, {**self._pending, "json": json_bytes(sidecar.to_dict())})
        self._pending = {}

    def write_error(self, source: str, error: dict[str, Any]) -> None:
        self._send(source, {ERROR_KIND: json_bytes(error)})

    def send(self, source: str, files: dict[str, bytes], entry: str | None = None, done: bool = False) -> None:
        """Files of the job's that are not a photo's set (a clip's staged frames and records, its
        assemble request), as one result of their own: under `entry` (default: the job's id), which
        the collector frees on its own. Fenced as the job's result is; `done` marks the job done with
        it, as a photo's sidecar does. Staged `.npy` depth is compressed, as a photo's npy is."""
        packed = {k: self.compressor.compress(v) if k.endswith(".npy") else v for k, v in files.items()}
        self._send(source, packed, entry, done)

    def _send(self, source: str, files: dict[str, bytes], entry: str | None = None, done: bool | None = None) -> None:
        result = entry or self.job_id
        keys = [
            Job.key_for(self.job_id),
            result_key(self.queue_name, result),
            results_stream(self.queue_name),
            inflight_key(self.queue_name),
            done_key(self.queue_name, self.job_id),
        ]
        size = sum(len(v) for v in files.values())
        fields = [x for kind, data in files.items() for x in (kind, data)]
        if done is None:
            done = entry is None and "json" in files  # a photo's whole set, its sidecar last
        done_for = self.done_ttl_s if done else 0
        args = [self.worker_name, self.ttl_s, result, source, size, done_for, *fields]
        owner = self.connection.eval(_SEND_RESULT, len(keys), *keys, *args)
        if owner is not None:
            raise HandedOverError(self.job_id, owner.decode() if isinstance(owner, bytes) else str(owner))


def job_owner(connection: Redis, job_id: str) -> str | None:
    """The worker rq last gave the job to (None if the job is gone)."""
    owner = connection.hget(Job.key_for(job_id), "worker_name")
    return owner.decode() if isinstance(owner, bytes) and owner else None
