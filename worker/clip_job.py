"""A video clip's jobs on a worker: a chunk of frames through the model, and the clip's assembly.

Data flows one way, as for a photo: payload -> frames -> backend -> metric depth -> store. A chunk job
decodes its frames (one seek, then forward), runs the model on each, computes each frame's metric depth
with the one metric function (`worker.depth.metric_depth`) at the frame's own focal length (the
container's 35 mm equivalent where it has one), and stages it in the clip's staging folder
(`depthq.clip_jobs.staging_folder`), writing its chunk record last. The assemble job, which rq starts
once every chunk has ended, has the clip assembled where its outputs are (`worker.clip_assembly`): here
with the shared transport; with the redis transport, where a worker has no disk, its chunks read their
own slice of the clip from Redis and send each staged file back through it, and the assemble job asks
the collector on the producer's host to assemble the clip there.

Fencing is a photo's: a job handed to another worker, or a clip rewritten since it was enqueued, lands
nothing (`SupersededError`: the new version has jobs of its own). A chunk whose clip is bad records the
clip's error file; the assemble then finds it and only cleans up, so nothing half-written is left.
Frames are held one at a time: a worker never holds a clip in memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from rq.job import Job, JobStatus

from depthq.clip_jobs import (
    ASSEMBLE_KIND,
    CHUNK_RECORD,
    STAGED_FRAME,
    ClipPart,
    staged_kind,
    staging_folder,
)
from depthq.contract import JobPayload, output_path, recorded_stamp, source_stamp
from depthq.files import (
    atomic_bytes,
    atomic_write,
    json_bytes,
)
from worker.backends.base import describe_model
from worker.clip_assembly import Assembly, assemble, drop_staging, read_record
from worker.clip_frames import chunk_frames
from worker.depth import depth_stats, metric_depth_of
from worker.errors import (
    BadClipError,
    BadInputError,
    RefusedJobError,
    SourceGoneError,
    SourceUnavailableError,
)
from worker.formats import npy_bytes
from worker.runtime import Runtime, ms, queue_wait_s, stage
from worker.store import RedisResultStore, SupersededError, output_failures
from worker.transport import ClipFiles, Photo

log = logging.getLogger(__name__)

# What a clip job returns to rq, as a photo's job does: the clip's name and the stage times.
JobResult = dict[str, Any]


def run(rt: Runtime, p: JobPayload, part: ClipPart, job: Job | None) -> JobResult:
    """One job of a clip, by its part: a chunk, the assembly, or the producer's refusal to record."""
    transport = rt.transports[p.transport]
    files = transport.clips
    job_id = job.id if job else "local"
    if files is None:
        # The redis transport: the chunk's own frames come from Redis, and its staged frames, like the
        # request to assemble, go back through Redis to the collector, which has the outputs.
        if part.part == "chunk":
            photo = transport.read(p, job_id)
            return _chunk(rt, p, part, job, photo.data, photo.stamp, _RedisStaging(rt, p, job_id))
        if part.part == "assemble":
            return _request_assembly(rt, p, part, job)
        raise RefusedJobError(
            f"{p.source}: a refused clip's job over the redis transport, where the producer records it"
        )
    if part.part == "refused":
        _current(files, p)  # a clip rewritten since has a job of its own: this refusal is not its
        raise BadClipError(part.message or f"{p.source}: refused by the producer")
    if part.part == "chunk":
        path, stamp = _current(files, p)
        staging = _FolderStaging(files, p, part, job_id, stamp)
        if staging.done():
            # Staged by an earlier attempt that died after its record (or a clip made again): done.
            log.info("%s: chunk %d already staged; nothing to compute", p.source, part.index)
            return {
                "source": p.source,
                "aliases": [],
                "staged": True,
                "timings_ms": {"queue_wait": ms(queue_wait_s(job))},
            }
        return _chunk(rt, p, part, job, path, stamp, staging)
    return _assemble(rt, files, p, part, job)


def _stamp_of(p: JobPayload) -> dict[str, int]:
    return {"size": p.size, "mtime": int(p.mtime)}


def _current(files: ClipFiles, p: JobPayload) -> tuple[Path, dict[str, int]]:
    """The clip's path and stamp, if it is still the version the job was made for; SupersededError if
    it was rewritten since (that version has its own jobs), SourceGoneError if it is gone."""
    path = files.clip_path(p)
    try:
        stamp = source_stamp(path.stat())
    except FileNotFoundError:
        raise SourceGoneError(f"{p.source}: the clip no longer exists (moved or deleted)") from None
    if stamp != _stamp_of(p):
        raise SupersededError(
            f"{p.source} changed since its jobs were made (size, mtime {_stamp_of(p)} -> {stamp}); "
            "this version's work is dropped, and the new version gets its own"
        )
    return path, stamp


def _fence(files: ClipFiles, p: JobPayload, job_id: str, stamp: dict[str, int]) -> None:
    """A photo's fence: the job still this worker's, and the clip still the one read."""
    fence = files.store(job_id, p, Photo(b"", stamp)).fence
    if fence is not None:
        fence()


class _Staging(Protocol):
    """Where a chunk's frames wait for the assemble: each frame's depth as it is computed, then the
    chunk's record, last (its presence says the chunk is staged)."""

    def frame(self, number: int, depth: np.ndarray) -> None: ...

    def record(self, record: dict[str, Any]) -> None: ...


class _FolderStaging:
    """The shared transport: the clip's staging folder beside the outputs, each file written atomically;
    the record after the fence, so a worker that lost its job, or read a clip since rewritten, stages no
    record."""

    def __init__(self, files: ClipFiles, p: JobPayload, part: ClipPart, job_id: str, stamp: dict[str, int]):
        self.files, self.p, self.job_id, self.stamp = files, p, job_id, stamp
        self.root = files.output.root
        self.folder = staging_folder(self.root, p.source, p.sha256)
        self.record_path = self.folder / CHUNK_RECORD.format(part.index)

    def done(self) -> bool:
        return read_record(self.record_path, self.p.sha256) is not None

    def frame(self, number: int, depth: np.ndarray) -> None:
        with output_failures(self.root):
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self.folder / STAGED_FRAME.format(number), lambda f: np.save(f, depth))

    def record(self, record: dict[str, Any]) -> None:
        _fence(self.files, self.p, self.job_id, self.stamp)
        with output_failures(self.root):
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_bytes(self.record_path, json_bytes(record))


class _RedisStaging:
    """The redis transport: each staged file goes back through Redis as a result of its own, which the
    collector writes into the clip's staging folder on the producer's host (`contract.staged_kind`).
    Sent one frame at a time, so a worker holds one frame's depth, never a chunk's; each send is fenced
    as a photo's result is (only while the job is still this worker's)."""

    def __init__(self, rt: Runtime, p: JobPayload, job_id: str):
        store = rt.transports[p.transport].store(job_id)
        assert isinstance(store, RedisResultStore)
        self.store, self.p, self.job_id = store, p, job_id

    def frame(self, number: int, depth: np.ndarray) -> None:
        name = STAGED_FRAME.format(number)
        self.store.send(
            self.p.source, {staged_kind(self.p.sha256, name): npy_bytes(depth)}, entry=f"{self.job_id}/{name}"
        )

    def record(self, record: dict[str, Any]) -> None:
        name = CHUNK_RECORD.format(record["chunk"])
        # Done with it: a second run of the chunk (its worker killed just after) finds it so once the
        # collector has freed the chunk's bytes.
        self.store.send(self.p.source, {staged_kind(self.p.sha256, name): json_bytes(record)}, done=True)


@contextlib.contextmanager
def _decoding(p: JobPayload, folder: Path | None) -> Iterator[None]:
    """A read error from the clip's own file is the folder's state (gone, a share down), not the clip's."""
    try:
        yield
    except FileNotFoundError:
        raise SourceGoneError(f"{p.source}: the clip no longer exists (moved or deleted)") from None
    except OSError as exc:
        if isinstance(exc, PermissionError):
            raise BadInputError(f"{p.source}: permission denied; make the clip readable by the worker's user") from None
        raise SourceUnavailableError(str(folder), "", exc) from exc


def _chunk(
    rt: Runtime,
    p: JobPayload,
    part: ClipPart,
    job: Job | None,
    source: Path | bytes,
    stamp: dict[str, int],
    staging: _Staging,
) -> JobResult:
    """The chunk's frames through the model and the metric math, each staged at its own focal length as
    it is done; the chunk's record last. `source` is the clip on this host's disk, or (redis) the
    chunk's own slice of it, whose frame 0 is the clip's frame `part.offset`."""
    t0 = time.perf_counter()
    wait = queue_wait_s(job)
    job_id = job.id if job else "local"
    stage(rt, job, f"decoding chunk {part.index + 1}/{part.chunks}")
    sums = dict.fromkeys(("decode", "inference", "postprocess", "write"), 0.0)
    frames: list[dict[str, Any]] = []
    chunk = chunk_frames(
        source, part.start - part.offset, part.count, part.every_nth, rt.config.worker.max_image_pixels, p.source
    )
    with chunk, _decoding(p, source.parent if isinstance(source, Path) else None):
        decoded = iter(chunk)
        while True:
            t_start = time.perf_counter()
            frame = next(decoded, None)
            if frame is None:
                break
            index = frame.index + part.offset  # the clip's own display index
            t_decoded = time.perf_counter()
            with rt.predicting():
                prediction = rt.backend.predict(frame.rgb)
            t_inferred = time.perf_counter()
            height, width = frame.rgb.shape[:2]
            md = metric_depth_of(f"{p.source}, frame {index}", prediction, width, height, part.focal_35mm)
            stats = depth_stats(md.depth, rt.backend.input_size)
            number = index // part.every_nth + 1
            t_post = time.perf_counter()
            staging.frame(number, md.depth)
            frames.append(
                {
                    "number": number,
                    "index": index,
                    "time_s": frame.time_s + part.offset_time_s,
                    "fov_deg": prediction.fov_deg,
                    "focal_length_px": md.focal_length_px,
                    "already_metric": prediction.already_metric,
                    "width": width,
                    "height": height,
                    "depth": [stats["min"], stats["max"], stats["median"]],
                }
            )
            for name, seconds in (
                ("decode", t_decoded - t_start),
                ("inference", t_inferred - t_decoded),
                ("postprocess", t_post - t_inferred),
                ("write", time.perf_counter() - t_post),
            ):
                sums[name] += seconds
            stage(rt, job, f"chunk {part.index + 1}/{part.chunks}: frame {len(frames)}/{part.count}")
    shortfall = chunk.shortfall
    timings = {"queue_wait": ms(wait), **{name: ms(seconds) for name, seconds in sums.items()}}
    timings["total"] = ms(time.perf_counter() - t0 + wait)
    ran = describe_model(rt.backend)
    staging.record(
        {
            "sha256": p.sha256,
            "source_stat": stamp,
            "chunk": part.index,
            "frames": frames,
            "shortfall": None
            if shortfall is None
            else {"missing": [i + part.offset for i in shortfall.missing], "message": shortfall.message},
            "host": rt.host,
            "worker": rt.worker_name,
            "enqueued_at": job.enqueued_at.timestamp() if job is not None and job.enqueued_at else None,
            "model": {**ran, "backend": rt.backend.name, "device": rt.backend.device},
            "warnings": list(rt.backend.warnings),
            "timings_ms": timings,
        }
    )
    done = f"{part.index + 1}/{part.chunks}"
    log.info("%s: chunk %s staged, %d frames, %s ms (job %s)", p.source, done, len(frames), timings, job_id)
    return {"source": p.source, "aliases": [], "staged": True, "timings_ms": timings}


def _request_assembly(rt: Runtime, p: JobPayload, part: ClipPart, job: Job | None) -> JobResult:
    """The redis transport: the clip's staging folder is on the producer's host, so the assembly is
    asked of its collector (`worker.clip_assembly.main`), through Redis, fenced as a result is. When a
    chunk failed (and so recorded the clip's error), the request says so, and the collector only
    removes the staging folder."""
    wait = queue_wait_s(job)
    job_id = job.id if job else "local"
    request = {
        "payload": p.to_dict(),
        "job_id": job_id,
        "model_side": rt.backend.input_size,
        "job_timeout_s": rt.config.queue.job_timeout_s,
        "queue_wait_s": wait,
        "failed": _failed_chunks(None, p, _stamp_of(p), job),
    }
    store = rt.transports[p.transport].store(job_id)
    assert isinstance(store, RedisResultStore)
    store.send(p.source, {ASSEMBLE_KIND: json_bytes(request)})
    log.info("%s: assembly of %d chunk(s) asked of the collector (job %s)", p.source, part.chunks, job_id)
    return {"source": p.source, "aliases": [], "timings_ms": {"queue_wait": ms(wait)}}


def _failed_chunks(root: Path | None, p: JobPayload, stamp: dict[str, int], job: Job | None) -> bool:
    """Whether a chunk of this run failed (and so recorded the clip's error file): by the chunk jobs'
    own statuses, since an error file from an earlier run (retried since with `depthq failed retry`)
    says nothing of this one. Without a job (a test calling in directly), by the error file."""
    if job is not None:
        return any(chunk.get_status(refresh=False) == JobStatus.FAILED for chunk in job.fetch_dependencies())
    if root is None:
        return False
    try:
        return recorded_stamp(json.loads(output_path(root, p.source, "error").read_bytes())) == stamp
    except (OSError, ValueError):
        return False


def _assemble(rt: Runtime, files: ClipFiles, p: JobPayload, part: ClipPart, job: Job | None) -> JobResult:
    wait = queue_wait_s(job)
    job_id = job.id if job else "local"
    root = files.output.root
    try:
        _, stamp = _current(files, p)
    except (SourceGoneError, SupersededError):
        drop_staging(root, p.source, p.sha256)  # its chunks' frames describe a file gone or changed
        raise
    if _failed_chunks(root, p, stamp, job):
        drop_staging(root, p.source, p.sha256)
        log.info("%s: a chunk recorded the clip's error; nothing to assemble", p.source)
        return {"source": p.source, "aliases": [], "timings_ms": {"queue_wait": ms(wait)}}
    stage(rt, job, "assembling")
    assembly = Assembly(root, p, part, job_id, stamp, rt.backend.input_size, rt.config.queue.job_timeout_s, wait)
    sidecar = assemble(assembly, lambda: _fence(files, p, job_id, stamp))
    timings = dict(sidecar.timings_ms)
    return {"source": p.source, "aliases": [], "timings_ms": timings}
