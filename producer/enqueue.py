"""Turn a finished photo into exactly one job: hash it, name the job by content and model, enqueue it.

A second event, a restart or a byte-identical copy maps to the same job id, and rq's `unique=True`
refuses the duplicate. What happens then depends on the existing job:
- pending: a copy under another name becomes an alias (the worker writes its outputs too);
- finished for another name: a cheap copy job reuses the stored result;
- over without a result for this photo (failed, stopped, or its output is gone): it runs again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from redis import Redis
from rq import Retry
from rq.exceptions import DeserializationError, DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus

from producer.config import Config
from producer.contract import (
    JOB_FUNCTION,
    SERIALIZER,
    JobPayload,
    aliases_key,
    done_key,
    file_sha256,
    is_finished,
    job_id,
    make_queue,
    requested_outputs,
)

log = logging.getLogger(__name__)

Outcome = Literal["enqueued", "requeued", "duplicate", "aliased", "copy", "changed", "done"]

# Atomic with the worker's MULTI that reads the alias set and sets the done marker: an alias is
# either seen by the worker, or the producer sees the marker. Never neither.
_ADD_ALIAS = """
if redis.call('exists', KEYS[1]) == 1 then return redis.call('get', KEYS[1]) end
redis.call('sadd', KEYS[2], ARGV[1])
redis.call('expire', KEYS[2], ARGV[2])
return false
"""

_PENDING = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED}
_OVER = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}
# Rescans hash only what changed: (source, size, mtime_ns) -> sha256, for this many photos.
_HASH_CACHE_SIZE = 100_000


class SourceError(ValueError):
    """A path the producer will not enqueue (outside the watch root, not a regular file)."""


@dataclass(frozen=True)
class Submitted:
    outcome: Outcome
    job_id: str
    source: str


class Enqueuer:
    def __init__(self, config: Config, connection: Redis):
        self.config = config
        self.connection = connection
        self.queue = make_queue(connection, config)
        self.watch_root = config.producer.watch.resolve()
        self.outputs = requested_outputs(config)
        retries = config.worker.retries
        self.retry = Retry(max=retries, interval=config.worker.retry_backoff_s) if retries else None
        self._add_alias = connection.register_script(_ADD_ALIAS)
        self._hashes: OrderedDict[tuple[str, int, int], str] = OrderedDict()

    def relative(self, path: Path) -> tuple[str, str | None]:
        """The photo's name under the watch root, and why the producer must not read it (or None).

        The name is the link's own, not its target's. A symlink out of the root is still named, so
        that it becomes a job the worker refuses, with an error file the user can see.
        """
        try:
            resolved = path.resolve(strict=True)
        except OSError as exc:
            raise SourceError(f"{path}: cannot be read ({exc.strerror})") from None
        if not resolved.is_file():
            raise SourceError(f"{path}: not a regular file")
        for candidate in (Path(os.path.abspath(path)), resolved):
            with contextlib.suppress(ValueError):
                rel = candidate.relative_to(self.watch_root).as_posix()
                if resolved.is_relative_to(self.watch_root):
                    return rel, None
                return rel, f"resolves to {resolved}, outside the watch root"
        raise SourceError(f"{path}: outside the watch root {self.watch_root}; move the photo into the watched folder")

    def submit(self, path: Path, force: bool = False) -> Submitted:
        """Enqueue one photo unless it is already done. Raises SourceError for paths that must not be jobs."""
        source, unreadable = self.relative(path)
        before = path.stat()
        if not force and is_finished(self.config.output.dir, source, before):
            return Submitted("done", "", source)
        if unreadable is None:
            try:
                sha = self._sha256(path, source, before)
            except PermissionError:
                unreadable = "permission denied"
        if unreadable is not None:
            return self._refusal(path, source, before, unreadable)
        sha = self._sha256(path, source, before)
        after = path.stat()
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            return Submitted("changed", "", source)  # still being written: the watcher will see it again
        payload = JobPayload(
            source=source,
            size=after.st_size,
            mtime=after.st_mtime,
            sha256=sha,
            model=self.config.model.path,
            outputs=list(self.outputs),
        )
        jid = job_id(sha, payload.model)
        if force:
            self._forget(jid)
        for _ in range(2):  # a job can expire between the refusal and our look at it: then try again
            try:
                self._enqueue(jid, payload)
                log.info("enqueued %s as job %s", source, jid)
                return Submitted("enqueued", jid, source)
            except DuplicateJobError:
                handled = self._duplicate(jid, payload)
                if handled is not None:
                    return handled
        return Submitted("duplicate", jid, source)

    def _refusal(self, path: Path, source: str, st: os.stat_result, why: str) -> Submitted:
        """A file the producer will not read still becomes a job, keyed by its name: the worker, which
        decides what it may read, computes it or writes the error file the user needs to see."""
        log.warning("%s: %s; the worker will decide and record it", path, why)
        payload = JobPayload(
            source=source,
            size=st.st_size,
            mtime=st.st_mtime,
            sha256="",
            model=self.config.model.path,
            outputs=list(self.outputs),
        )
        jid = "unread-" + hashlib.sha256(f"{source}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:32]
        try:
            self._enqueue(jid, payload)
        except DuplicateJobError:
            return self._duplicate(jid, payload) or Submitted("duplicate", jid, source)
        return Submitted("enqueued", jid, source)

    def _sha256(self, path: Path, source: str, st: os.stat_result) -> str:
        key = (source, st.st_size, st.st_mtime_ns)
        sha = self._hashes.get(key)
        if sha is None:
            sha = file_sha256(path)
            self._hashes[key] = sha
            if len(self._hashes) > _HASH_CACHE_SIZE:
                self._hashes.popitem(last=False)
        else:
            self._hashes.move_to_end(key)
        return sha

    def _enqueue(self, jid: str, payload: JobPayload) -> None:
        q = self.config.queue
        self.queue.enqueue(
            JOB_FUNCTION,
            payload.to_dict(),
            job_id=jid,
            unique=True,
            retry=self.retry,
            result_ttl=q.result_ttl_s,
            failure_ttl=q.failure_ttl_s,
            job_timeout=q.job_timeout_s,
            description=payload.source,
        )

    def _duplicate(self, jid: str, payload: JobPayload) -> Submitted | None:
        """The content already has a job. None: it vanished meanwhile, enqueue again."""
        try:
            job = Job.fetch(jid, connection=self.connection, serializer=SERIALIZER)
        except NoSuchJobError:
            return None
        status = job.get_status(refresh=False)
        try:
            existing = job.args[0]["source"]
        except (DeserializationError, LookupError, TypeError):
            existing = None  # a foreign job under our id: never ours to reuse
        # submit() found no result for this photo, so a job that is over must run again for it.
        if status in _OVER and (existing == payload.source or status != JobStatus.FINISHED):
            job.delete()
            self._enqueue(jid, payload)
            log.info("%s: job %s was %s without a result for it; enqueued again", payload.source, jid, status)
            return Submitted("requeued", jid, payload.source)
        if existing == payload.source:
            log.debug("%s: job %s already %s", payload.source, jid, status)
            return Submitted("duplicate", jid, payload.source)
        if status == JobStatus.FINISHED:
            done_for = self.connection.get(done_key(self.queue.name, jid))
            return self._own_job(jid, payload, same_as=done_for.decode() if done_for else None)
        done_for = self._add_alias(
            keys=[done_key(self.queue.name, jid), aliases_key(self.queue.name, jid)],
            args=[payload.source, max(self.config.queue.result_ttl_s, 60)],
        )
        if done_for is None:
            log.info("%s: same content as %s (job %s); it will get the same depth", payload.source, existing, jid)
            return Submitted("aliased", jid, payload.source)
        return self._own_job(jid, payload, same_as=done_for.decode())

    def _own_job(self, jid: str, payload: JobPayload, same_as: str | None) -> Submitted:
        """A job for this name alone: a copy of a stored result if there is one, else a computation."""
        own = JobPayload(**{**payload.to_dict(), "same_as": same_as})
        own_id = f"{jid}-{hashlib.sha256(payload.source.encode()).hexdigest()[:8]}"
        try:
            self._enqueue(own_id, own)
        except DuplicateJobError:
            return Submitted("duplicate", own_id, payload.source)
        log.info(
            "%s: same content as %s, already done; %s",
            payload.source,
            same_as,
            "copying its result" if same_as else "computing it for this name",
        )
        return Submitted("copy", own_id, payload.source)

    def _forget(self, jid: str) -> None:
        """For --force: drop a finished or failed job so the same id can run again."""
        try:
            job = Job.fetch(jid, connection=self.connection, serializer=SERIALIZER)
        except NoSuchJobError:
            job = None
        if job is not None and job.get_status(refresh=True) in _PENDING:
            return  # it is going to run anyway
        if job is not None:
            job.delete()
        self.connection.delete(done_key(self.queue.name, jid))
