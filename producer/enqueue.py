"""Turn a finished photo into exactly one job: hash it, name the job by content and model, enqueue it.

A second event, a restart or a byte-identical copy maps to the same job id, and rq's `unique=True`
refuses the duplicate. What happens then depends on the existing job:
- pending: a copy under another name becomes an alias (the worker writes its outputs too);
- finished for another name: a cheap copy job reuses the stored result;
- over without a result for this photo (failed, stopped, or its output is gone): it runs again.

A burst (a rescan, a folder dropped in) goes through `submit_many`, which enqueues the common case,
new content with no job yet, a few hundred at a time in one transaction, and leaves everything else
to `submit`, one by one.

What differs between the transports (how a photo is read and sent, whether Redis has room for it,
who records a refusal) is the `Sender`'s (producer.sending); this module never asks which one it has.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from redis import Redis
from redis.exceptions import WatchError
from rq import Queue, Retry
from rq.exceptions import DeserializationError, DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus

from depthq import attempts
from depthq.config import Config
from depthq.contract import (
    JOB_FUNCTION,
    SERIALIZER,
    JobPayload,
    Lane,
    aliases_key,
    done_key,
    is_finished,
    job_id,
    make_queue,
    requested_outputs,
)
from producer.clip_enqueue import ClipEnqueuer
from producer.readiness import clip_extensions
from producer.sending import OVER, Sender, sender_for

log = logging.getLogger(__name__)

Outcome = Literal["enqueued", "requeued", "duplicate", "aliased", "copy", "changed", "done", "deferred", "refused"]

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
    # The photo's (size, mtime_ns) as read, when it now has a job: this version needs no other.
    version: tuple[int, int] | None = None


@dataclass(frozen=True)
class _Photo:
    """A photo read and hashed: its job id, its payload, and the (size, mtime_ns) it was read at."""

    jid: str
    payload: JobPayload
    version: tuple[int, int]
    # The bytes that were hashed, when the sender sends them beside the job (None when it does not).
    data: bytes | None = None


@dataclass(frozen=True)
class _Unread:
    """A photo the producer must not read (a symlink out of the root, no permission): a refusal job."""

    source: str
    st: os.stat_result
    why: str


class Enqueuer:
    """One lane's enqueuer (`live` for what events report, `backfill` for what scans find); a photo's
    job id is the same in both, so one photo never has a job in each."""

    def __init__(self, config: Config, connection: Redis, lane: Lane = "live"):
        self.config = config
        self.connection = connection
        self.lane = lane
        self.queue = make_queue(connection, config, lane)
        # What Redis keys are named by (in-flight photos, aliases, attempts): the same for both lanes.
        self.name = config.queue.name
        self.watch_root = config.producer.watch.resolve()
        self.outputs = requested_outputs(config)
        retries = config.worker.retries
        self.retry = Retry(max=retries, interval=config.worker.retry_backoff_s) if retries else None
        self._add_alias = connection.register_script(_ADD_ALIAS)
        self.sender: Sender = sender_for(config, connection)
        self.clip_extensions = frozenset(clip_extensions(config))
        self.clips = ClipEnqueuer(config, connection, self.queue, self.retry, self._delete, self.sender)

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
        read = self._read(path, force)
        if isinstance(read, Submitted):
            return read
        version = (read.st.st_size, read.st.st_mtime_ns) if isinstance(read, _Unread) else read.version
        if isinstance(read, _Unread):
            refused = self._refusal(path, read.source, read.st, read.why)
            return replace(refused, version=version)
        if self.is_clip(read.payload.source):
            outcome, jid = self.clips.submit(path, read.payload)
            return Submitted(outcome, jid, read.payload.source, version)
        if force:
            self._forget(read.jid)
        return replace(self._enqueue_once(read.jid, read.payload, read.data), version=version)

    def is_clip(self, source: str) -> bool:
        """Whether `source` is a video clip this producer cuts into chunk jobs (`video.extensions`)."""
        dot = source.rfind(".")
        return dot >= 0 and source[dot + 1 :].lower() in self.clip_extensions

    def _enqueue_once(self, jid: str, payload: JobPayload, data: bytes | None) -> Submitted:
        """rq refuses a second job under an id; what then depends on the job that holds it."""
        for _ in range(2):  # a job can expire between the refusal and our look at it: then try again
            try:
                self._enqueue(jid, payload, data)
                log.info("enqueued %s as job %s", payload.source, jid)
                return Submitted("enqueued", jid, payload.source)
            except DuplicateJobError:
                handled = self._duplicate(jid, payload, data)
                if handled is not None:
                    return handled
        return Submitted("duplicate", jid, payload.source)

    def submit_many(self, paths: Sequence[Path]) -> list[tuple[Path, Submitted | None]]:
        """Enqueue a burst of photos in one transaction; None for each one left to `submit`.

        One by one, each photo costs two round trips to Redis (four when its job exists), which caps a
        burst at a few hundred photos a second. Here the common case, new content with no job yet, is
        enqueued in one MULTI/EXEC, and a photo whose job is still pending for it (an event and a
        rescan both saw it) is a duplicate found by one bulk read. Anything else is left to `submit`,
        which knows what to do with it: a refusal, a job that is over or another name's (alias,
        copy, requeue), a path that cannot be read or is not ours, and a photo with the same content
        as one earlier in the batch (an alias, once the first is enqueued). Call `submit` on those
        after this returns, in order. A sender that does not batch (the redis transport: each photo's
        bytes must find room in Redis first) leaves them all to `submit`.
        """
        if not self.sender.batches:
            return [(path, None) for path in paths]
        out: list[tuple[Path, Submitted | None]] = []
        fresh: dict[str, tuple[int, _Photo]] = {}  # job id -> (its place in out, the photo)
        for path in paths:
            try:
                read = self._read(path)
            except (SourceError, OSError):
                read = None  # submit() raises it again, to a caller that decides what it means
            if isinstance(read, _Photo) and read.jid not in fresh and not self.is_clip(read.payload.source):
                fresh[read.jid] = (len(out), read)
            out.append((path, read if isinstance(read, Submitted) else None))
        enqueued, taken = self._enqueue_new({jid: photo.payload for jid, (_, photo) in fresh.items()})
        for jid in enqueued:
            place, photo = fresh[jid]
            log.info("enqueued %s as job %s", photo.payload.source, jid)
            out[place] = (out[place][0], Submitted("enqueued", jid, photo.payload.source, photo.version))
        for jid in self._still_pending({jid: fresh[jid][1].payload for jid in taken}):
            place, photo = fresh[jid]
            log.debug("%s: job %s already pending", photo.payload.source, jid)
            out[place] = (out[place][0], Submitted("duplicate", jid, photo.payload.source, photo.version))
        return out

    def pending_jobs(self, jids: Sequence[str]) -> set[str]:
        """Which of these jobs are still queued, running or waiting to retry: one round trip for all."""
        if not jids:
            return set()
        with self.connection.pipeline(transaction=False) as look:
            for jid in jids:
                look.hget(Job.key_for(jid), "status")
            statuses = look.execute()
        pending = {s.value for s in _PENDING}
        return {jid for jid, status in zip(jids, statuses, strict=True) if status and status.decode() in pending}

    def _read(self, path: Path, force: bool = False) -> Submitted | _Unread | _Photo:
        """What the disk says about a photo: done already, still changing, not ours to read, or its job."""
        source, unreadable = self.relative(path)
        before = path.stat()
        if not force and is_finished(self.config.output.dir, source, before):
            return Submitted("done", "", source)
        # A clip is never sent whole: its chunks are, each within the in-flight limits (producer.clip_enqueue).
        clip = self.is_clip(source)
        if unreadable is None and not clip:
            unreadable = self.sender.cannot_send(before)
        if unreadable is None and not clip and not self.sender.has_room(before.st_size):
            return Submitted("deferred", "", source)  # held on disk until the collector frees room
        sha, data = "", None
        if unreadable is None:
            try:
                sha, data = self.clips.hash(path, source, before) if clip else self.sender.read(path, source, before)
            except PermissionError:
                unreadable = "permission denied"
        if unreadable is not None:
            return _Unread(source, before, unreadable)
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
            root=self.config.transport.root,
            transport=self.config.transport.mode,
        )
        return _Photo(job_id(sha, payload.model), payload, (after.st_size, after.st_mtime_ns), data)

    def _refusal(self, path: Path, source: str, st: os.stat_result, why: str) -> Submitted:
        """A file the producer will not read still becomes a job, keyed by its name: the worker, which
        decides what it may read, computes it or writes the error file the user needs to see. Unless
        the sender records it itself (the redis transport: no worker can read what was not sent)."""
        if self.sender.refuse_here(source, st, why):
            return Submitted("refused", "", source)
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

    def _enqueue(self, jid: str, payload: JobPayload, data: bytes | None = None) -> None:
        """The job, after its photo's bytes when they travel beside it (`Sender.put`)."""
        q = self.config.queue
        if data is not None:
            self.sender.put(jid, data)
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

    def _enqueue_new(self, payloads: dict[str, JobPayload]) -> tuple[list[str], list[str]]:
        """Enqueue, in one transaction, those of these jobs whose id is not taken: (enqueued, taken).

        As safe as `unique=True`: the ids are WATCHed before we look, so if one appears before the
        EXEC (another producer, `depthq enqueue`), nothing is written, and every photo of the batch
        goes one by one (neither list names it). A job that exists is never overwritten.
        """
        if not payloads:
            return [], []
        q = self.config.queue
        keys = [Job.key_for(jid) for jid in payloads]
        with self.connection.pipeline(transaction=True) as tx:
            try:
                tx.watch(*keys)
                with self.connection.pipeline(transaction=False) as look:
                    for key in keys:
                        look.exists(key)
                    exists = look.execute()
                new = [jid for jid, found in zip(payloads, exists, strict=True) if not found]
                taken = [jid for jid, found in zip(payloads, exists, strict=True) if found]
                if not new:
                    return [], taken
                tx.multi()
                self.queue.enqueue_many(
                    [
                        Queue.prepare_data(
                            JOB_FUNCTION,
                            args=(payloads[jid].to_dict(),),
                            job_id=jid,
                            retry=self.retry,
                            result_ttl=q.result_ttl_s,
                            failure_ttl=q.failure_ttl_s,
                            timeout=q.job_timeout_s,
                            description=payloads[jid].source,
                        )
                        for jid in new
                    ],
                    pipeline=tx,
                )
                tx.execute()
            except WatchError:
                return [], []
        return new, taken

    def _still_pending(self, payloads: dict[str, JobPayload]) -> list[str]:
        """Of these existing jobs, those still pending for the very same photo: nothing to do.

        What `_duplicate` decides first, for many jobs in one read. The others (over, another name's,
        not ours) need its judgement, one by one.
        """
        if not payloads:
            return []
        try:
            jobs = Job.fetch_many(list(payloads), connection=self.connection, serializer=SERIALIZER)
            return [
                jid
                for (jid, payload), job in zip(payloads.items(), jobs, strict=True)
                if job is not None
                and job.get_status(refresh=False) in _PENDING
                and job.args[0]["source"] == payload.source
            ]
        except (DeserializationError, LookupError, TypeError):
            return []  # a job that is not ours among them: submit() judges each

    def _duplicate(self, jid: str, payload: JobPayload, data: bytes | None = None) -> Submitted | None:
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
        if existing == payload.source and self.sender.result_waiting(jid):
            log.debug("%s: job %s is done, its result waiting for the collector", payload.source, jid)
            return Submitted("duplicate", jid, payload.source)
        if existing != payload.source and status not in OVER and not self.sender.can_alias:
            # A copy that cannot ride on its original's job gets its own, not an alias.
            return self._own_job(jid, payload, same_as=None, data=data)
        # submit() found no result for this photo, so a job that is over must run again for it.
        if status in OVER and (existing == payload.source or status != JobStatus.FINISHED):
            self._delete(job)
            self._enqueue(jid, payload, data)
            log.info("%s: job %s was %s without a result for it; enqueued again", payload.source, jid, status)
            return Submitted("requeued", jid, payload.source)
        if existing == payload.source:
            log.debug("%s: job %s already %s", payload.source, jid, status)
            return Submitted("duplicate", jid, payload.source)
        if status == JobStatus.FINISHED:
            done_for = self.connection.get(done_key(self.name, jid)) if self.sender.copies_results else None
            return self._own_job(jid, payload, same_as=done_for.decode() if done_for else None, data=data)
        done_for = self._add_alias(
            keys=[done_key(self.name, jid), aliases_key(self.name, jid)],
            args=[payload.source, max(self.config.queue.result_ttl_s, 60)],
        )
        if done_for is None:
            log.info("%s: same content as %s (job %s); it will get the same depth", payload.source, existing, jid)
            return Submitted("aliased", jid, payload.source)
        # An empty marker: the job ended with no result to copy (its photo gone, or it failed).
        return self._own_job(jid, payload, same_as=done_for.decode() or None)

    def _own_job(self, jid: str, payload: JobPayload, same_as: str | None, data: bytes | None = None) -> Submitted:
        """A job for this name alone: a copy of a stored result if there is one, else a computation."""
        # The bytes just put under `jid` (if any) are not needed if its job is over: free them now.
        self.sender.drop_orphans([jid], grace=False)
        # A copy queued as an alias of `jid` earlier, whose job then ended without taking it (its photo
        # changed meanwhile): this job is its own now, and the set must not hand it to `jid` again.
        self.connection.srem(aliases_key(self.name, jid), payload.source)
        own = JobPayload(**{**payload.to_dict(), "same_as": same_as})
        own_id = f"{jid}-{hashlib.sha256(payload.source.encode()).hexdigest()[:8]}"
        try:
            self._enqueue(own_id, own, data)
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
            self._delete(job)
        self.connection.delete(done_key(self.name, jid))
        attempts.forget(self.connection, self.name, jid)  # asked for: the deaths so far no longer count

    def _delete(self, job: Job) -> None:
        """rq's delete, which also fetches each of the job's executions, and raises ValueError for one
        that expired (a worker that died in it): then the rest of the job goes without them."""
        try:
            job.delete()
        except ValueError as exc:
            log.info("job %s: %s; deleting it without its lost execution records", job.id, exc)
            with self.connection.pipeline(transaction=True) as tx:
                job._remove_from_registries(pipeline=tx)  # rq < 4 is pinned for such private hooks
                tx.delete(job.key, job.dependents_key, job.dependencies_key, job.execution_registry.key)
                tx.execute()
