"""A clip's assembly: its staged chunks into `<clip>.depth/`, `<clip>.preview.mp4` and `<clip>.json`, last.

Where the outputs are is where a clip is assembled: on the worker that takes the assemble job with the
shared transport (`worker.clip_job`), and on the producer's host with the redis transport, whose
collector runs `depthq assemble-clip` for it as a child process (`main` here), so the watcher itself
never loads numpy. One function, `assemble`, for both.

It reads each chunk's record (the frames' own FOV estimates, focal lengths and depth statistics), picks
the clip's one focal length (`worker.clip_camera.clip_focal_px`), and then, one frame at a time, loads
the staged depth, rescales it to that focal length (exact: depth is proportional to f_px), writes its
depth file and adds it to the preview, coloured on one scale for the whole clip. The sidecar is staged
and renamed into place last, after the fence, and the staging folder goes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from depthq.clip_jobs import CHUNK_RECORD, STAGED_FRAME, ClipPart, depth_folder, preview_path, staging_folder
from depthq.clip_sidecar import FRAME_FILE_PATTERN, ClipSidecar, FrameDepth
from depthq.contract import JobPayload, error_record, output_path, recorded_stamp, source_stamp
from depthq.files import (
    atomic_bytes,
    is_temp_name,
    json_bytes,
    remove_stale_temps_in,
    staged_write,
    stale_temp_age_s,
)
from worker.clip_camera import ClipFocal, clip_focal_px, rescale_depth
from worker.clip_preview import PreviewWriter, clip_depth_range
from worker.errors import BadClipError, EnvironmentUnavailableError
from worker.formats import exr_bytes, npy_bytes
from worker.runtime import ms
from worker.store import output_failures

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Assembly:
    """One clip to assemble: where its outputs go, its jobs' payload and part, the assemble job's id,
    the clip's stamp as its chunks read it, the model's input side in pixels (the preview's size), and
    `queue.job_timeout_s` (how old a temporary file must be before nothing can still be writing it)."""

    output_root: Path
    payload: JobPayload
    part: ClipPart
    job_id: str
    stamp: dict[str, int]
    model_side: int
    job_timeout_s: float
    queue_wait_s: float = 0.0

    @property
    def staging(self) -> Path:
        return staging_folder(self.output_root, self.payload.source, self.payload.sha256)


def drop_staging(output_root: Path, source: str, sha256: str) -> None:
    """The clip's staging folder, gone: assembled, or its frames describe a file that is gone or changed."""
    shutil.rmtree(staging_folder(output_root, source, sha256), ignore_errors=True)


class ChunkNotStagedError(RuntimeError):
    """A chunk's record is not in the staging folder (yet): its job ended without staging its frames, or,
    with the redis transport, its result is not collected yet. The assembly is tried again."""


def read_record(path: Path, sha256: str) -> dict[str, Any] | None:
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


def assemble(a: Assembly, fence: Callable[[], None] | None = None) -> ClipSidecar:
    """Write the clip's outputs from its staging folder, the sidecar last (after `fence`, which raises to
    land nothing), and remove the folder. Raises RuntimeError when a chunk's record is missing (retried),
    BadClipError when no frame, or a frame in the middle, could be decoded, and OutputUnavailableError
    for a full or failing output disk."""
    t0 = time.perf_counter()
    p, part, root, staging = a.payload, a.part, a.output_root, a.staging
    records = []
    for index in range(part.chunks):
        record = read_record(staging / CHUNK_RECORD.format(index), p.sha256)
        if record is None:
            raise ChunkNotStagedError(
                f"{p.source}: chunk {index + 1} of {part.chunks} has not staged its frames; "
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
    with output_failures(root):
        folder.mkdir(parents=True, exist_ok=True)

        def write_frames(out: Any) -> None:
            with PreviewWriter(
                out, part.frame_rate, width, height, depth_range, a.model_side, part.every_nth
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
        _remove_others(folder, {f"{FRAME_FILE_PATTERN % f.number}.{fmt}" for f in frames}, a.job_timeout_s)
        sidecar = _sidecar(p, part, a.job_id, a.stamp, records, frames, ratios, focal, fmt, t0, a.queue_wait_s)
        with output_failures(root):
            sidecar_path = output_path(root, p.source, "json")
            staged_sidecar = staged_write(sidecar_path, lambda f: f.write(json_bytes(sidecar.to_dict())))
        try:
            if fence is not None:
                fence()
            with output_failures(root):
                os.replace(staged_preview, preview)
                os.replace(staged_sidecar, sidecar_path)
                output_path(root, p.source, "error").unlink(missing_ok=True)  # superseded by this result
        finally:
            Path(staged_sidecar).unlink(missing_ok=True)
    finally:
        Path(staged_preview).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "%s: clip of %d frames assembled, f %s px (%s), %s ms (job %s)",
        p.source,
        len(frames),
        None if focal.f_px is None else round(focal.f_px, 1),
        focal.source,
        dict(sidecar.timings_ms),
        a.job_id,
    )
    return sidecar


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


# `depthq assemble-clip`'s exit code for "not now": the output disk refuses writes, or a chunk's staged
# files are not all collected yet. The collector keeps the request and asks again (sysexits' TEMPFAIL).
EXIT_LATER = 75


def assemble_requested(request: dict[str, Any], output_root: Path, clip: Path) -> int:
    """The redis transport's assembly, in the collector's child process (`depthq assemble-clip`), on the
    host that has the clip, the staging folder and the outputs. `request` is what the assemble job sent
    (`worker.clip_job`). Returns 0 when the request is done with (assembled, or nothing to assemble: the
    clip gone, rewritten, already assembled, a chunk failed, or the clip bad, with its error file), and
    EXIT_LATER to be asked again."""
    p = JobPayload.from_dict(request["payload"])
    part = ClipPart.from_dict(p.clip)
    stamp = {"size": p.size, "mtime": int(p.mtime)}
    try:
        now: dict[str, int] | None = source_stamp(clip.stat())
    except FileNotFoundError:
        now = None
    why = None
    if now != stamp:
        why = "the clip is gone, or changed since its jobs were made"
    elif request.get("failed"):
        why = "a chunk failed and recorded the clip's error"
    elif _assembled(output_root, p, stamp):
        why = "already assembled (the request came twice)"
    if why is not None:
        drop_staging(output_root, p.source, p.sha256)
        log.info("%s: nothing to assemble: %s", p.source, why)
        return 0
    job_id = str(request["job_id"])
    assembly = Assembly(
        output_root,
        p,
        part,
        job_id,
        stamp,
        int(request["model_side"]),
        float(request["job_timeout_s"]),
        float(request.get("queue_wait_s", 0.0)),
    )
    try:
        assemble(assembly)
    except (EnvironmentUnavailableError, ChunkNotStagedError) as exc:
        log.warning("%s; asked again later", exc)
        return EXIT_LATER
    except BadClipError as exc:
        with output_failures(output_root):
            atomic_bytes(
                output_path(output_root, p.source, "error"),
                json_bytes(error_record(p.source, job_id, "bad_input", str(exc), stamp)),
            )
        drop_staging(output_root, p.source, p.sha256)
        log.warning("%s", exc)
    return 0


def _assembled(output_root: Path, p: JobPayload, stamp: dict[str, int]) -> bool:
    try:
        record = json.loads(output_path(output_root, p.source, "json").read_bytes())
    except (OSError, ValueError):
        return False
    return recorded_stamp(record) == stamp and record.get("sha256") == p.sha256
