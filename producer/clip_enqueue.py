"""A finished video clip into its jobs: chunk jobs for its frames, and one assemble job that waits for them.

`Enqueuer.submit` hands a clip here once it is read and hashed, as it would enqueue a photo. The clip's
fate is in hand while its assemble job (or the refusal under that id) is pending: a second event, a
rescan or a restart then finds it and adds nothing. Anything else (no assemble job, or one that is
over while the clip has no result) makes the clip's jobs again; chunk jobs still pending are kept, and
a chunk whose frames an earlier run staged returns at once on the worker, so nothing is computed twice.

The assemble job depends on every chunk job with `allow_failure` (rq's `Dependency`): Redis holds the
fan-in, no depthq process waits on it, and the assemble runs once every chunk has ended, well or not,
so a bad clip never leaves a job deferred for ever; it then goes to the front of its lane, so a clip whose
frames are all done is not held behind a backlog. The clip is probed here, on the watcher's host,
with PyAV alone (`producer.clip_probe`: no numpy).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Literal

from redis import Redis
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Dependency, Job, JobStatus

from depthq.clip_jobs import (
    CHUNK_RECORD,
    ClipPart,
    assemble_job_id,
    chunk_job_id,
    clip_job_base,
    computed_frames,
    describe,
    plan_chunks,
    staging_folder,
)
from depthq.config import Config
from depthq.contract import JOB_FUNCTION, SERIALIZER, JobPayload, file_sha256
from producer.clip_probe import ClipError, ClipInfo, probe
from producer.clip_slicer import slice_chunk
from producer.sending import Sender

log = logging.getLogger(__name__)

ClipOutcome = Literal["enqueued", "duplicate", "refused"]

# Long enough to probe a clip and enqueue a 10-minute clip's chunks; a producer killed meanwhile holds
# the clip back no longer than this.
_MAKING_TTL_S = 120
# Clips whose hash is remembered (producer.sending keeps photos' the same way).
_HASHES_KEPT = 256
_PENDING = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED}


class ClipEnqueuer:
    """One lane's clip jobs: `queue` is the lane's, `delete` the enqueuer's way of dropping an old job."""

    def __init__(
        self,
        config: Config,
        connection: Redis,
        queue: Queue,
        retry: Retry | None,
        delete: Callable[[Job], None],
        sender: Sender,
    ):
        self.config = config
        self.connection = connection
        self.queue = queue
        self.retry = retry
        self.delete = delete
        self.sender = sender
        self._hashes: OrderedDict[tuple[str, int, int], str] = OrderedDict()

    def hash(self, path: Path, source: str, st: os.stat_result) -> tuple[str, None]:
        """The clip's SHA-256, read in blocks (a clip is never read whole into memory, nor sent whole),
        remembered by (name, size, mtime) so a clip sent a few chunks at a time is not hashed at every look."""
        key = (source, st.st_size, st.st_mtime_ns)
        sha = self._hashes.get(key)
        if sha is None:
            sha = self._hashes[key] = file_sha256(path)
            if len(self._hashes) > _HASHES_KEPT:
                self._hashes.popitem(last=False)
        return sha, None

    def submit(self, path: Path, payload: JobPayload) -> tuple[ClipOutcome, str]:
        """The clip's jobs, unless they are pending already: (outcome, the assemble job's id)."""
        base = clip_job_base(payload.sha256, payload.model, payload.source)
        assemble_id = assemble_job_id(base)
        # rq takes no `unique` with dependencies: one producer at a time makes a clip's jobs instead.
        making = f"depthq:{self.config.queue.name}:making:{assemble_id}"
        if not self.connection.set(making, self.config.queue.name, nx=True, ex=_MAKING_TTL_S):
            return "duplicate", assemble_id
        try:
            return self._submit(path, payload, base, assemble_id)
        finally:
            self.connection.delete(making)

    def _submit(self, path: Path, payload: JobPayload, base: str, assemble_id: str) -> tuple[ClipOutcome, str]:
        existing = self._fetch(assemble_id)
        if existing is not None:
            if existing.get_status(refresh=False) in _PENDING and not self._stuck(existing):
                log.debug("%s: clip job %s already pending", payload.source, assemble_id)
                return "duplicate", assemble_id
            self.delete(existing)  # over (or stuck), and the clip has no result for this version: again
        try:
            info = probe(path)
        except ClipError as exc:
            return self._refuse(assemble_id, payload, str(exc), path)
        video = self.config.video
        if info.frame_count > video.max_frames:
            return self._refuse(
                assemble_id,
                payload,
                f"{path}: {info.frame_count} frames, more than video.max_frames ({video.max_frames}); "
                "raise video.max_frames, set video.every_nth, or cut the clip shorter",
                path,
            )
        chunks = plan_chunks(info.frame_count, video.every_nth, video.chunk_frames)
        ids = []
        for index, (start, count) in enumerate(chunks):
            jid, part = chunk_job_id(base, index), self._part(info, "chunk", index, start, count, len(chunks))
            if not self.sender.collected:
                ids.append(self._chunk(jid, payload, part))
                continue
            try:
                sent = self._send_chunk(path, jid, payload, part)
            except ClipError as exc:
                return self._refuse(assemble_id, payload, str(exc), path)
            if not sent:
                log.debug("%s: chunk %d of %d waits for room in Redis", payload.source, index + 1, len(chunks))
                return "deferred", assemble_id
            ids.append(jid)
        assemble = self._part(info, "assemble", 0, 0, computed_frames(info.frame_count, video.every_nth), len(chunks))
        self._enqueue(
            assemble_id,
            replace(payload, clip=assemble.to_dict()),
            describe(payload.source, assemble),
            Dependency(jobs=ids, allow_failure=True, enqueue_at_front=True),
        )
        log.info("enqueued %s as %d chunk job(s) and assemble job %s", payload.source, len(ids), assemble_id)
        return "enqueued", assemble_id

    def _part(
        self, info: ClipInfo, kind: Literal["chunk", "assemble"], index: int, start: int, count: int, chunks: int
    ) -> ClipPart:
        return ClipPart(
            part=kind,
            index=index,
            start=start,
            count=count,
            chunks=chunks,
            frames=computed_frames(info.frame_count, self.config.video.every_nth),
            every_nth=self.config.video.every_nth,
            width=info.width,
            height=info.height,
            rotation=info.rotation,
            fps=f"{info.fps.numerator}/{info.fps.denominator}",
            frame_count=info.frame_count,
            frame_count_exact=info.frame_count_exact,
            focal_35mm=info.focal_length_35mm,
        )

    def _refuse(self, assemble_id: str, payload: JobPayload, message: str, path: Path) -> tuple[ClipOutcome, str]:
        """The producer's reason, recorded as the clip's error file: by the producer itself where the
        sender records refusals (the redis transport), else by a worker (as for a photo the producer
        cannot read), under the assemble job's id so a second look finds it pending."""
        with contextlib.suppress(OSError):
            if self.sender.refuse_here(payload.source, path.stat(), message.removeprefix(f"{path}: ")):
                return "refused", assemble_id
        log.warning("%s", message)
        part = ClipPart(
            part="refused", index=0, start=0, count=0, chunks=0, frames=0, every_nth=1, width=0, height=0,
            rotation=0, fps="1/1", frame_count=0, frame_count_exact=False, message=message,
        )  # fmt: skip
        try:
            self._enqueue(assemble_id, replace(payload, clip=part.to_dict()), describe(payload.source, part))
        except DuplicateJobError:
            return "duplicate", assemble_id
        return "refused", assemble_id

    def _chunk(self, jid: str, payload: JobPayload, part: ClipPart) -> str:
        """One chunk job, unless it is pending already (a clip made again keeps its running chunks)."""
        for _ in range(2):
            try:
                self._enqueue(jid, replace(payload, clip=part.to_dict()), describe(payload.source, part))
                return jid
            except DuplicateJobError:
                job = self._fetch(jid)
                if job is None:
                    continue
                status = job.get_status(refresh=False)
                if status in _PENDING or (status == JobStatus.FINISHED and self._staged(payload, part)):
                    return jid  # running, or done with its frames still staged for the assemble
                self.delete(job)
        return jid

    def _send_chunk(self, path: Path, jid: str, payload: JobPayload, part: ClipPart) -> bool:
        """The redis transport: the chunk's own packets (`producer.clip_slicer`, lossless: never decoded)
        into Redis beside its job, if Redis has room for them; False if not (the clip waits on disk, and
        the next look goes on from here). A chunk pending, or done with its frames staged or on their
        way to the collector, is kept. Raises ClipError for a clip that cannot be cut (a variable frame
        rate that a slice reads differently)."""
        job = self._fetch(jid)
        if job is not None:
            status = job.get_status(refresh=False)
            done = status == JobStatus.FINISHED and (self._staged(payload, part) or self.sender.result_waiting(jid))
            if status in _PENDING or done:
                return True
            self.delete(job)
        sliced = slice_chunk(path, part.start, part.count, part.every_nth)
        if not self.sender.has_room(len(sliced.data)):
            return False
        part = replace(part, offset=sliced.first_index, offset_time_s=sliced.first_time_s)
        self.sender.put(jid, sliced.data)
        self._enqueue(jid, replace(payload, clip=part.to_dict()), describe(payload.source, part))
        return True

    def _staged(self, payload: JobPayload, part: ClipPart) -> bool:
        """Whether this chunk's frames are staged for this version of the clip (its record is there): a
        chunk job that finished once is no proof, since an assemble (or `depthq audit --repair`) removes
        the staging folder when it is done with it."""
        folder = staging_folder(self.config.output.dir, payload.source, payload.sha256)
        return (folder / CHUNK_RECORD.format(part.index)).is_file()

    def _enqueue(self, jid: str, payload: JobPayload, description: str, depends_on: Dependency | None = None) -> None:
        q = self.config.queue
        self.queue.enqueue(
            JOB_FUNCTION,
            payload.to_dict(),
            job_id=jid,
            unique=depends_on is None,
            retry=self.retry,
            result_ttl=q.result_ttl_s,
            failure_ttl=q.failure_ttl_s,
            job_timeout=q.job_timeout_s,
            description=description,
            depends_on=depends_on,
        )

    def _stuck(self, assemble: Job) -> bool:
        """A deferred assemble none of whose chunks will ever end: rq enqueues a dependent when a dependency
        ends through a worker, not when one is deleted or expires (a chunk purged by hand, a Redis that
        lost it). Such an assemble would wait for ever; made again, the clip reuses every staged chunk."""
        if assemble.get_status(refresh=False) != JobStatus.DEFERRED:
            return False
        ids = sorted(m.decode() for m in self.connection.smembers(assemble.dependencies_key))
        with self.connection.pipeline(transaction=False) as look:
            for jid in ids:
                look.hget(Job.key_for(jid), "status")
            statuses = look.execute()
        pending = {status.value for status in _PENDING}
        waiting = [s for s in statuses if s is not None and s.decode() in pending]
        if waiting:
            return False
        log.warning("%s: its assemble job %s waits on chunks that are over or gone; making the clip's jobs again",
                    assemble.description, assemble.id)  # fmt: skip
        return True

    def _fetch(self, jid: str) -> Job | None:
        try:
            return Job.fetch(jid, connection=self.connection, serializer=SERIALIZER)
        except NoSuchJobError:
            return None
