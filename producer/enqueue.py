"""Turn a finished photo into exactly one job: hash it, name the job by content and model, enqueue it.

A second event, a restart or a byte-identical copy maps to the same job id, and rq's `unique=True`
refuses the duplicate. A copy under another name is recorded as an alias of the pending job (the
worker writes its outputs too), or, if that job is already done, becomes a cheap copy job.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from redis import Redis
from rq import Retry
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus

from producer.config import Config
from producer.contract import (
    JOB_FUNCTION,
    SERIALIZER,
    JobPayload,
    aliases_key,
    done_key,
    file_sha256,
    job_id,
    make_queue,
    requested_outputs,
)

log = logging.getLogger(__name__)

Outcome = Literal["enqueued", "duplicate", "aliased", "copy", "changed"]

# Atomic with the worker's MULTI that reads the alias set and sets the done marker: an alias is
# either seen by the worker, or the producer sees the marker. Never neither.
_ADD_ALIAS = """
if redis.call('exists', KEYS[1]) == 1 then return redis.call('get', KEYS[1]) end
redis.call('sadd', KEYS[2], ARGV[1])
redis.call('expire', KEYS[2], ARGV[2])
return false
"""

_PENDING = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED}


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

    def relative(self, path: Path) -> str:
        try:
            resolved = path.resolve(strict=True)
        except OSError as exc:
            raise SourceError(f"{path}: cannot be read ({exc.strerror})") from None
        try:
            rel = resolved.relative_to(self.watch_root)
        except ValueError:
            raise SourceError(
                f"{path}: resolves to {resolved}, outside the watch root {self.watch_root}; "
                "move the photo into the watched folder (symlinks out of it are refused)"
            ) from None
        if not resolved.is_file():
            raise SourceError(f"{path}: not a regular file")
        return rel.as_posix()

    def submit(self, path: Path, force: bool = False) -> Submitted:
        """Enqueue one photo. Raises SourceError for paths that must not become jobs."""
        source = self.relative(path)
        before = path.stat()
        sha = file_sha256(path)
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
        try:
            self._enqueue(jid, payload)
            log.info("enqueued %s as job %s", source, jid)
            return Submitted("enqueued", jid, source)
        except DuplicateJobError:
            return self._duplicate(jid, payload)

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

    def _existing_source(self, jid: str) -> str | None:
        try:
            job = Job.fetch(jid, connection=self.connection, serializer=SERIALIZER)
            return job.args[0]["source"]
        except (NoSuchJobError, LookupError, TypeError):
            return None
        except Exception:  # a foreign job under our id: not ours to interpret
            return None

    def _duplicate(self, jid: str, payload: JobPayload) -> Submitted:
        existing = self._existing_source(jid)
        if existing is None or existing == payload.source:
            log.debug("%s: job %s already exists", payload.source, jid)
            return Submitted("duplicate", jid, payload.source)
        ttl = max(self.config.queue.result_ttl_s, 60)
        done_for = self._add_alias(
            keys=[done_key(self.queue.name, jid), aliases_key(self.queue.name, jid)],
            args=[payload.source, ttl],
        )
        if done_for is None:
            log.info("%s: same content as %s (job %s); it will get the same depth", payload.source, existing, jid)
            return Submitted("aliased", jid, payload.source)
        original = done_for.decode() if isinstance(done_for, bytes) else str(done_for)
        copy = JobPayload(**{**payload.to_dict(), "same_as": original})
        copy_id = f"{jid}-{hashlib.sha256(payload.source.encode()).hexdigest()[:8]}"
        try:
            self._enqueue(copy_id, copy)
        except DuplicateJobError:
            return Submitted("duplicate", copy_id, payload.source)
        log.info("%s: same content as %s, already done; copying its result", payload.source, original)
        return Submitted("copy", copy_id, payload.source)

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
