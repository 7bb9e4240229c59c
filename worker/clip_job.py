"""A video clip's jobs on a worker: a chunk of frames through the model, and the clip's assembly.

Data flows one way, as for a photo: payload -> frames -> backend -> metric depth -> store. A chunk job
decodes its frames (one seek, then forward), runs the model on each, computes each frame's metric depth
with the one metric function (`worker.depth.metric_depth`) at the frame's own focal length (the
container's 35 mm equivalent where it has one), and stages it in the clip's staging folder
(`depthq.clip_jobs.staging_folder`), writing its chunk record last. The assemble job, which rq starts
once every chunk has ended, picks the clip's one focal length (`worker.clip_camera.clip_focal_px`),
rescales each staged frame to it (exact: depth is proportional to f_px), writes `<clip>.depth/`, the
preview with one colour scale, and the clip sidecar last, atomically, then removes the staging folder.

Fencing is a photo's: a job handed to another worker, or a clip rewritten since it was enqueued, lands
nothing (`SupersededError`: the new version has jobs of its own). A chunk whose clip is bad records the
clip's error file; the assemble then finds it and only cleans up, so nothing half-written is left.
Frames are held one at a time: a worker never holds a clip in memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rq.job import Job, JobStatus

from depthq.clip_jobs import (
    CHUNK_RECORD,
    STAGED_FRAME,
    ClipPart,
    depth_folder,
    preview_path,
    staging_folder,
)
from depthq.clip_sidecar import FRAME_FILE_PATTERN, ClipSidecar, FrameDepth
from depthq.contract import JobPayload, output_path, recorded_stamp, source_stamp
from depthq.files import (
    atomic_bytes,
    atomic_write,
    is_temp_name,
    json_bytes,
    remove_stale_temps_in,
    staged_write,
    stale_temp_age_s,
)
from worker.backends.base import describe_model
from worker.clip_camera import ClipFocal, clip_focal_px, rescale_depth
from worker.clip_frames import chunk_frames
from worker.clip_preview import PreviewWriter, clip_depth_range
from worker.depth import depth_stats, metric_depth
from worker.errors import (
    BadClipError,
    BadInputError,
    ModelOutputError,
    RefusedJobError,
    SourceGoneError,
    SourceUnavailableError,
)
from worker.formats import exr_bytes, npy_bytes
from worker.runtime import Runtime, ms, queue_wait_s, stage
from worker.store import SupersededError, output_failures
from worker.transport import ClipFiles, Photo

log = logging.getLogger(__name__)

# What a clip job returns to rq, as a photo's job does: the clip's name and the stage times.
JobResult = dict[str, Any]


def run(rt: Runtime, p: JobPayload, part: ClipPart, job: Job | None) -> JobResult:
    """One job of a clip, by its part: a chunk, the assembly, or the producer's refusal to record."""
    files = rt.transports[p.transport].clips
    if files is None:
        raise RefusedJobError(
            f"{p.source}: a clip job over the {p.transport} transport, which carries no clips; "
            "clips travel over the shared transport (transport.mode: shared)"
        )
    if part.part == "refused":
        _current(files, p)  # a clip rewritten since has a job of its own: this refusal is not its
        raise BadClipError(part.message or f"{p.source}: refused by the producer")
    if part.part == "chunk":
        return _chunk(rt, files, p, part, job)
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


@contextlib.contextmanager
def _decoding(p: JobPayload, folder: Path) -> Iterator[None]:
    """A read error from the clip's own file is the folder's state (gone, a share down), not the clip's."""
    try:
        yield
    except FileNotFoundError:
        raise SourceGoneError(f"{p.source}: the clip no longer exists (moved or deleted)") from None
    except OSError as exc:
        if isinstance(exc, PermissionError):
            raise BadInputError(f"{p.source}: permission denied; make the clip readable by the worker's user") from None
        raise SourceUnavailableError(str(folder), "", exc) from exc


def _chunk(rt: Runtime, files: ClipFiles, p: JobPayload, part: ClipPart, job: Job | None) -> JobResult:
    t0 = time.perf_counter()
    wait = queue_wait_s(job)
    job_id = job.id if job else "local"
    path, stamp = _current(files, p)
    root = files.output.root
    staging = staging_folder(root, p.source, p.sha256)
    record_path = staging / CHUNK_RECORD.format(part.index)
    if _read_record(record_path, p.sha256) is not None:
        # Staged by an earlier attempt that died after its record (or a clip enqueued again): done.
        log.info("%s: chunk %d already staged; nothing to compute", p.source, part.index)
        return {"source": p.source, "aliases": [], "staged": True, "timings_ms": {"queue_wait": ms(wait)}}
    stage(rt, job, f"decoding chunk {part.index + 1}/{part.chunks}")
    with output_failures(root):
        staging.mkdir(parents=True, exist_ok=True)
    sums = dict.fromkeys(("decode", "inference", "postprocess", "write"), 0.0)
    frames: list[dict[str, Any]] = []
    chunk = chunk_frames(path, part.start, part.count, part.every_nth, rt.config.worker.max_image_pixels, p.source)
    with chunk, _decoding(p, path.parent):
        decoded = iter(chunk)
        while True:
            t_start = time.perf_counter()
            frame = next(decoded, None)
            if frame is None:
                break
            t_decoded = time.perf_counter()
            with rt.predicting():
                prediction = rt.backend.predict(frame.rgb)
            t_inferred = time.perf_counter()
            height, width = frame.rgb.shape[:2]
            try:
                md = metric_depth(
                    prediction.inverse_depth,
                    width,
                    height,
                    prediction.fov_deg,
                    part.focal_35mm,
                    already_metric=prediction.already_metric,
                )
            except ValueError as exc:
                raise BadClipError(f"{p.source}, frame {frame.index}: {exc}") from None
            except ModelOutputError as exc:
                raise ModelOutputError(f"{p.source}, frame {frame.index}: {exc}") from None
            stats = depth_stats(md.depth, rt.backend.input_size)
            number = frame.index // part.every_nth + 1
            t_post = time.perf_counter()
            with output_failures(root):
                atomic_write(staging / STAGED_FRAME.format(number), lambda f, d=md.depth: np.save(f, d))
            frames.append(
                {
                    "number": number,
                    "index": frame.index,
                    "time_s": frame.time_s,
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
    record = {
        "sha256": p.sha256,
        "source_stat": stamp,
        "chunk": part.index,
        "frames": frames,
        "shortfall": None if shortfall is None else {"missing": list(shortfall.missing), "message": shortfall.message},
        "host": rt.host,
        "worker": rt.worker_name,
        "enqueued_at": job.enqueued_at.timestamp() if job is not None and job.enqueued_at else None,
        "model": {**ran, "backend": rt.backend.name, "device": rt.backend.device},
        "warnings": list(rt.backend.warnings),
        "timings_ms": timings,
    }
    _fence(files, p, job_id, stamp)
    with output_failures(root):
        atomic_bytes(record_path, json_bytes(record))
    done = f"{part.index + 1}/{part.chunks}"
    log.info("%s: chunk %s staged, %d frames, %s ms (job %s)", p.source, done, len(frames), timings, job_id)
    return {"source": p.source, "aliases": [], "staged": True, "timings_ms": timings}


def _read_record(path: Path, sha256: str) -> dict[str, Any] | None:
    """A chunk record, if it is there, whole, and of this content."""
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("sha256") == sha256 else None


@dataclass(frozen=True)
class _Staged:
    """One staged frame as its chunk recorded it."""

    number: int
    fov_deg: float | None
    focal_length_px: float | None
    already_metric: bool
    depth: FrameDepth


def _drop(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def _failed_chunks(root: Path, p: JobPayload, stamp: dict[str, int], job: Job | None) -> bool:
    """Whether a chunk of this run failed (and so recorded the clip's error file): by the chunk jobs'
    own statuses, since an error file from an earlier run (retried since with `depthq failed retry`)
    says nothing of this one. Without a job (a test calling in directly), by the error file."""
    if job is not None:
        return any(chunk.get_status(refresh=False) == JobStatus.FAILED for chunk in job.fetch_dependencies())
    try:
        return recorded_stamp(json.loads(output_path(root, p.source, "error").read_bytes())) == stamp
    except (OSError, ValueError):
        return False


def _assemble(rt: Runtime, files: ClipFiles, p: JobPayload, part: ClipPart, job: Job | None) -> JobResult:
    t0 = time.perf_counter()
    wait = queue_wait_s(job)
    job_id = job.id if job else "local"
    root = files.output.root
    staging = staging_folder(root, p.source, p.sha256)
    try:
        _, stamp = _current(files, p)
    except (SourceGoneError, SupersededError):
        _drop(staging)  # its chunks' frames describe a file that is gone or no longer this
        raise
    if _failed_chunks(root, p, stamp, job):
        _drop(staging)
        log.info("%s: a chunk recorded the clip's error; nothing to assemble", p.source)
        return {"source": p.source, "aliases": [], "timings_ms": {"queue_wait": ms(wait)}}
    stage(rt, job, "assembling")
    records = []
    for index in range(part.chunks):
        record = _read_record(staging / CHUNK_RECORD.format(index), p.sha256)
        if record is None:
            raise RuntimeError(
                f"{p.source}: chunk {index + 1} of {part.chunks} ended without staging its frames; "
                "the assemble is retried, and recorded as failed after worker.retries"
            )
        records.append(record)
    frames = _staged_frames(p, records)
    width, height = part.upright_width, part.upright_height
    metric = not any(f.already_metric for f in frames)
    focal = clip_focal_px(width, height, [f.fov_deg for f in frames], part.focal_35mm)
    ratios = [_ratio(f, focal, metric) for f in frames]
    depth_range = clip_depth_range((f.depth.min_m * r, f.depth.max_m * r) for f, r in zip(frames, ratios, strict=True))
    fmt = "exr" if "exr" in p.outputs else "npy"
    folder = depth_folder(root, p.source)
    preview = preview_path(root, p.source)
    stage(rt, job, f"assembling: {len(frames)} frames")
    with output_failures(root):
        folder.mkdir(parents=True, exist_ok=True)

        def write_frames(out: Any) -> None:
            with PreviewWriter(
                out, part.frame_rate, width, height, depth_range, rt.backend.input_size, part.every_nth
            ) as writer:
                for staged, ratio in zip(frames, ratios, strict=True):
                    depth = np.load(staging / STAGED_FRAME.format(staged.number), allow_pickle=False)
                    if ratio != 1.0:
                        depth = rescale_depth(depth, staged.focal_length_px, focal.f_px)
                    encode = exr_bytes if fmt == "exr" else npy_bytes
                    atomic_bytes(folder / f"{FRAME_FILE_PATTERN % staged.number}.{fmt}", encode(depth))
                    writer.add(depth)

        staged_preview = staged_write(preview, write_frames)
    try:
        _remove_others(
            folder, {f"{FRAME_FILE_PATTERN % f.number}.{fmt}" for f in frames}, rt.config.queue.job_timeout_s
        )
        sidecar = _sidecar(rt, p, part, job_id, stamp, records, frames, ratios, focal, fmt, t0, wait)
        with output_failures(root):
            sidecar_path = output_path(root, p.source, "json")
            staged_sidecar = staged_write(sidecar_path, lambda f: f.write(json_bytes(sidecar.to_dict())))
        try:
            _fence(files, p, job_id, stamp)
            with output_failures(root):
                os.replace(staged_preview, preview)
                os.replace(staged_sidecar, sidecar_path)
                output_path(root, p.source, "error").unlink(missing_ok=True)  # superseded by this result
        finally:
            Path(staged_sidecar).unlink(missing_ok=True)
    finally:
        Path(staged_preview).unlink(missing_ok=True)
    _drop(staging)
    timings = dict(sidecar.timings_ms)
    log.info(
        "%s: clip of %d frames assembled, f %s px (%s), %s ms (job %s)",
        p.source,
        len(frames),
        None if focal.f_px is None else round(focal.f_px, 1),
        focal.source,
        timings,
        job_id,
    )
    return {"source": p.source, "aliases": [], "timings_ms": timings}


def _staged_frames(p: JobPayload, records: list[dict[str, Any]]) -> list[_Staged]:
    """Every staged frame in order, numbered 1..n without a gap (a clip that ended early ends early)."""
    frames = [
        _Staged(
            number=int(f["number"]),
            fov_deg=None if f["fov_deg"] is None else float(f["fov_deg"]),
            focal_length_px=None if f["focal_length_px"] is None else float(f["focal_length_px"]),
            already_metric=bool(f["already_metric"]),
            depth=FrameDepth(*(float(v) for v in f["depth"])),
        )
        for record in records
        for f in record["frames"]
    ]
    frames.sort(key=lambda f: f.number)
    if not frames:
        raise BadClipError(f"{p.source}: no frame of the clip could be decoded; export or copy the clip again")
    numbers = [f.number for f in frames]
    if numbers != list(range(1, len(frames) + 1)):
        missing = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
        raise BadClipError(
            f"{p.source}: frames {missing[:10]} could not be decoded while later ones could: the clip is "
            "damaged in the middle; export or copy the clip again"
        )
    return frames


def _ratio(frame: _Staged, focal: ClipFocal, metric: bool) -> float:
    """How much this frame's depth moves to reach the clip's focal length (1.0: it keeps its own)."""
    if not metric or focal.f_px is None or frame.focal_length_px is None:
        return 1.0
    return focal.f_px / frame.focal_length_px


def _remove_others(folder: Path, keep: set[str], job_timeout_s: float) -> None:
    """Depth files of an earlier version of the clip that this one does not have (it is shorter), and
    temporary files an assemble killed mid-write left, once no writer can still be at them."""
    names = [entry.name for entry in os.scandir(folder)]
    for name in names:
        if name not in keep and not is_temp_name(name):
            (folder / name).unlink(missing_ok=True)
    remove_stale_temps_in(folder, names, stale_temp_age_s(job_timeout_s), time.time())


def _sidecar(
    rt: Runtime,
    p: JobPayload,
    part: ClipPart,
    job_id: str,
    stamp: dict[str, int],
    records: list[dict[str, Any]],
    frames: list[_Staged],
    ratios: list[float],
    focal: ClipFocal,
    fmt: str,
    t0: float,
    wait: float,
) -> ClipSidecar:
    warnings = sorted({w for record in records for w in record.get("warnings", [])})
    for record in records:
        if record.get("shortfall"):
            warnings.append(record["shortfall"]["message"])
    first = min((r["enqueued_at"] for r in records if r.get("enqueued_at")), default=None)
    total_ms = (time.time() - first) * 1000.0 if first is not None else ms(time.perf_counter() - t0 + wait)
    spread = focal.spread
    return ClipSidecar.assemble(
        source=p.source,
        sha256=p.sha256,
        stamp=stamp,
        width=part.upright_width,
        height=part.upright_height,
        rotation=part.rotation,
        fps=part.frame_rate,
        frame_count=part.frame_count,
        frame_count_exact=part.frame_count_exact,
        every_nth=part.every_nth,
        focal_length_px=focal.f_px,
        focal_length_source=focal.source,
        focal_length_35mm=part.focal_35mm,
        fov_deg=focal.fov_deg,
        fov_vertical_deg=focal.fov_vertical_deg,
        frame_fov_deg=[f.fov_deg for f in frames],
        frame_fov_spread=None if spread is None else {k: float(v) for k, v in vars(spread).items()},
        frame_depth=[FrameDepth(*(v * r for v in f.depth)) for f, r in zip(frames, ratios, strict=True)],
        depth_format=fmt,
        model=records[0]["model"],
        workers=[(r["host"], r["worker"], len(r["frames"])) for r in records],
        chunk_timings_ms=[r["timings_ms"] for r in records],
        assemble_ms=ms(time.perf_counter() - t0),
        total_ms=total_ms,
        job_id=job_id,
        warnings=warnings,
    )
