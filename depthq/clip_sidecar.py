"""`<clip>.json`, a video clip's sidecar: what a clip's depth result says of itself (issue 25).

The clip's counterpart of `depthq.sidecar`'s photo sidecar, and like it one type for every side: the
assemble job makes it (`ClipSidecar.assemble`, the one way every clip sidecar is made) once every chunk
of frames is computed, and writes it last, atomically, as for photos, so its presence says the clip's
`<clip>.depth/` and `<clip>.preview.mp4` are complete; readers take it back through
`ClipSidecar.from_dict`. It records `source_stat` as a photo's does, so `contract.finished_kind` judges a
clip done the same way. It says `kind: "clip"`, which a photo's sidecar does not, so no reader of photo
results takes it for one (`Sidecar.from_dict` refuses it).

Reading is lenient as for photos: a field missing, of the wrong type or not finite reads as None (or
empty), using `depthq.sidecar`'s helpers. Writing gives exactly the documented keys in a fixed order, and
only finite numbers: `assemble` refuses anything else, so `files.json_bytes` (allow_nan=False) never fails.

The frames computed are the clip's frames 0, n, 2n, ... (0-based display index, n = `every_nth`), as
the chunk jobs cut them, up to where the clip ends. They are numbered from 1 in computed order: depth
file `%06d` k is the k-th computed frame, the clip's frame (k - 1) x n, shown at (k - 1) x n / fps
seconds; and `frame_fov_deg[k - 1]` is its FOV. Consecutive numbers let any image-sequence reader
(FFmpeg, Nuke, Blender) take the folder as one sequence at fps / n, which it would not across the gaps
of display-index numbers with n > 1.

Kept free of numpy, PyAV and the worker's and producer's modules: the watcher and the dashboard read
sidecars too. Units: sizes and focal lengths in pixels of the upright frame, angles in degrees
(horizontal unless named vertical), depth in meters, rates in frames per second, times in milliseconds.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any, Literal, NamedTuple

from depthq.camera import Camera, pinhole
from depthq.contract import Stamp, output_base, recorded_stamp
from depthq.sidecar import count, items, number, section, text

KIND = "clip"
# Beside `<clip>.json`: the folder of per-frame depth files and the colourised MP4. The photo's suffixes
# live in contract.OUTPUT_SUFFIXES; these join them when clips are wired in.
DEPTH_FOLDER_SUFFIX = ".depth"
PREVIEW_SUFFIX = ".preview.mp4"
# A depth file's name in the folder: printf's pattern, which FFmpeg and Nuke read as is.
FRAME_FILE_PATTERN = "%06d"
DEPTH_FORMATS = ("exr", "npy")

ClipFocalSource = Literal["metadata", "median of frames' FOV"]
FOCAL_SOURCES: tuple[ClipFocalSource, ...] = ("metadata", "median of frames' FOV")
ROTATIONS = (0, 90, 180, 270)
# The stages a chunk job times, as a photo's job does; the clip's `timings_ms` sums them over its chunks.
CHUNK_STAGES = ("queue_wait", "decode", "inference", "postprocess", "write")
# The stages that are work on a frame, and so have a per-frame mean (queue_wait is a chunk's, not a frame's).
FRAME_STAGES = ("decode", "inference", "postprocess", "write")
SPREAD_KEYS = ("frames", "median_deg", "min_deg", "max_deg", "iqr_deg")
DEPTH_KEYS = ("unit", "min", "max", "median", "folder", "files", "format")

NO_FOV_NO_FOCAL = (
    "per-frame depth: the model gives no FOV and the clip's metadata no focal length, so each frame keeps "
    "the depth the model gave it, scaled on its own (the depth may flicker from frame to frame), and "
    "there is no camera"
)
NO_FOV_METADATA_FOCAL = (
    "per-frame depth: the model gives no FOV and outputs meters itself, so each frame keeps the depth the "
    "model gave it, scaled on its own (the depth may flicker from frame to frame); the focal length from "
    "the clip's metadata is reported, not used"
)

_EXACT_FPS = re.compile(r"[1-9][0-9]*/[1-9][0-9]*")


class FrameDepth(NamedTuple):
    """One computed frame's depth statistics in meters, as its chunk job measured them (a photo's
    `depth` min, max and median): what the clip's statistics are made of without holding its maps."""

    min_m: float
    max_m: float
    median_m: float


@dataclass(frozen=True)
class ClipSidecar:
    """A clip's depth result. `width` x `height` is the upright frame in pixels (what the depth maps and
    the preview are), `rotation` the counter-clockwise degrees that stood the stored frames upright.

    `fps` is the average frame rate in frames/s as a float, for arithmetic; `fps_exact` the same rate as
    the container gives it, "num/den" ("30000/1001" for 29.97), because no float is 30000/1001: frame
    times from it do not drift over an hour-long clip, and FFmpeg takes it as is (`-r 30000/1001`).

    `focal_length_px` is the clip's one focal length (`worker.clip_camera`), `focal_length_source` where
    it came from ("metadata", "median of frames' FOV"), both None only when neither gave one;
    `frame_fov_deg` is each computed frame's own FOV estimate in computed order (None where the model
    gave none) and `frame_fov_spread` how far they wander ({frames, median_deg, min_deg, max_deg,
    iqr_deg}, None without estimates). `depth` is {unit, min, max, median, folder, files, format}: min
    and max over every frame, median the median of the frames' medians. `workers` is
    ({host, name, frames}, ...). `timings_ms` holds the chunk jobs' stage times summed over the clip,
    plus `assemble` and the wall-clock `total`; `frame_timings_ms` the per-frame means of the work stages.
    """

    source: str
    sha256: str | None
    source_stat: Stamp | None
    width: int | None
    height: int | None
    rotation: int | None
    fps: float | None
    fps_exact: str | None
    frame_count: int | None
    frame_count_exact: bool | None
    every_nth: int | None
    frames_computed: int | None
    fov_deg: float | None
    fov_vertical_deg: float | None
    focal_length_px: float | None
    focal_length_source: str | None
    focal_length_35mm: float | None
    frame_fov_deg: tuple[float | None, ...]
    frame_fov_spread: dict[str, float] | None
    camera: Camera | None
    depth: dict[str, Any]
    preview: str | None
    model: dict[str, Any]
    workers: tuple[dict[str, Any], ...] = ()
    timings_ms: dict[str, float] = field(default_factory=dict)
    frame_timings_ms: dict[str, float] = field(default_factory=dict)
    job_id: str | None = None
    created_at: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def frame_rate(self) -> Fraction | None:
        """The exact frame rate in frames/s, for frame times that do not drift; None if not recorded."""
        return Fraction(self.fps_exact) if self.fps_exact is not None else None

    @classmethod
    def assemble(
        cls,
        *,
        source: str,
        sha256: str,
        stamp: Stamp | None,
        width: int,
        height: int,
        rotation: int,
        fps: Fraction,
        frame_count: int,
        frame_count_exact: bool,
        every_nth: int,
        focal_length_px: float | None,
        focal_length_source: str | None,
        focal_length_35mm: float | None,
        fov_deg: float | None,
        fov_vertical_deg: float | None,
        frame_fov_deg: Sequence[float | None],
        frame_fov_spread: Mapping[str, float] | None,
        frame_depth: Sequence[FrameDepth],
        depth_format: str,
        model: Mapping[str, Any],
        workers: Iterable[tuple[str, str, int]],
        chunk_timings_ms: Iterable[Mapping[str, float]],
        assemble_ms: float,
        total_ms: float,
        job_id: str,
        warnings: Sequence[str] = (),
    ) -> ClipSidecar:
        """The sidecar a clip's set is written with: the one way every clip sidecar is made.

        Plain values, so depthq needs nothing of the worker's: the clip as probed (`width` x `height`
        upright pixels, `rotation` degrees, `fps` exact frames/s, `frame_count`, 35 mm focal in mm),
        the clip's focal length as `worker.clip_camera.ClipFocal` gives it (`focal_length_px` pixels,
        its source, FOVs in degrees, each computed frame's FOV and their spread as a dict), each
        computed frame's `FrameDepth` in computed order, the depth files' format ("exr" or "npy"),
        `workers` as one (host, worker name, frames) per chunk job (the same worker twice is summed),
        and each chunk job's stage timings in ms (`CHUNK_STAGES`; `total_ms` is the wall clock the
        caller measured, from the clip's first chunk enqueued to this sidecar).

        A model that gives no FOV (every frame's estimate None) keeps per-frame depth, and the warnings
        say so. Raises ValueError for values that are not a clip's result (no frames, a per-frame list
        of another length, a focal source with no focal length, a number that is not finite): a caller's
        mistake, which must not reach the disk as a sidecar that looks whole.
        """
        frames = len(frame_depth)
        if frames < 1:
            raise ValueError(f"{source}: a clip's sidecar needs at least one computed frame")
        if len(frame_fov_deg) != frames:
            raise ValueError(
                f"{source}: {len(frame_fov_deg)} per-frame FOVs for {frames} computed frames; they must align"
            )
        if width < 1 or height < 1 or rotation not in ROTATIONS or fps <= 0 or every_nth < 1 or frame_count < 0:
            raise ValueError(
                f"{source}: not a clip's geometry: {width} x {height} px, rotation {rotation}, fps {fps}, "
                f"every_nth {every_nth}, frame_count {frame_count}"
            )
        if depth_format not in DEPTH_FORMATS:
            raise ValueError(f"{source}: depth files are one of {DEPTH_FORMATS}, not {depth_format!r}")
        fovs = tuple(None if v is None else _finite("frame_fov_deg", v, source) for v in frame_fov_deg)
        if focal_length_source is None:
            if focal_length_px is not None or any(v is not None for v in fovs):
                raise ValueError(
                    f"{source}: a focal length with no source; only a clip without metadata and a model "
                    "without FOV has none, and then no frame has an estimate either"
                )
            focal: float | None = None
        elif focal_length_source not in FOCAL_SOURCES:
            raise ValueError(f"{source}: focal length source {focal_length_source!r} is none of {FOCAL_SOURCES}")
        elif focal_length_source == "median of frames' FOV" and all(v is None for v in fovs):
            raise ValueError(f"{source}: a focal length from the frames' FOV, but no frame has an estimate")
        else:
            focal = _finite("focal_length_px", focal_length_px, source)
        notes = list(warnings)
        if all(v is None for v in fovs):
            notes.append(NO_FOV_NO_FOCAL if focal is None else NO_FOV_METADATA_FOCAL)

        name = source.rsplit("/", 1)[-1]
        stats = [tuple(_finite("frame_depth", v, source) for v in frame) for frame in frame_depth]
        per_worker: dict[tuple[str, str], int] = {}
        for host, worker_name, done in workers:
            per_worker[host, worker_name] = per_worker.get((host, worker_name), 0) + done
        sums = dict.fromkeys(CHUNK_STAGES, 0.0)
        for chunk in chunk_timings_ms:
            for stage in CHUNK_STAGES:
                sums[stage] += _finite(f"timings_ms.{stage}", chunk.get(stage, 0.0), source)
        timings = {stage: round(ms, 1) for stage, ms in sums.items()}
        timings["assemble"] = round(_finite("assemble_ms", assemble_ms, source), 1)
        timings["total"] = round(_finite("total_ms", total_ms, source), 1)
        return cls(
            source=source,
            sha256=sha256,
            source_stat=stamp,
            width=width,
            height=height,
            rotation=rotation,
            fps=float(fps),
            fps_exact=f"{fps.numerator}/{fps.denominator}",
            frame_count=frame_count,
            frame_count_exact=frame_count_exact,
            every_nth=every_nth,
            frames_computed=frames,
            fov_deg=None if focal is None else _finite("fov_deg", fov_deg, source),
            fov_vertical_deg=None if focal is None else _finite("fov_vertical_deg", fov_vertical_deg, source),
            focal_length_px=focal,
            focal_length_source=focal_length_source,
            focal_length_35mm=_positive(focal_length_35mm),
            frame_fov_deg=fovs,
            frame_fov_spread=_spread(frame_fov_spread, source),
            camera=None if focal is None else pinhole(focal, width, height),
            depth={
                "unit": "m",
                "min": min(s[0] for s in stats),
                "max": max(s[1] for s in stats),
                "median": float(statistics.median(s[2] for s in stats)),
                "folder": output_base(name) + DEPTH_FOLDER_SUFFIX,
                "files": f"{FRAME_FILE_PATTERN}.{depth_format}",
                "format": depth_format,
            },
            preview=output_base(name) + PREVIEW_SUFFIX,
            model=dict(model),
            workers=tuple(
                {"host": host, "name": worker_name, "frames": count}
                for (host, worker_name), count in sorted(per_worker.items())
            ),
            timings_ms=timings,
            frame_timings_ms={stage: round(sums[stage] / frames, 1) for stage in FRAME_STAGES},
            job_id=job_id,
            created_at=datetime.now(UTC).isoformat(),
            warnings=tuple(notes),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON on disk, key for key as documented, in this order; `warnings` only when there are any."""
        out: dict[str, Any] = {
            "kind": KIND,
            "source": self.source,
            "sha256": self.sha256,
            "source_stat": self.source_stat,
            "width": self.width,
            "height": self.height,
            "rotation": self.rotation,
            "fps": self.fps,
            "fps_exact": self.fps_exact,
            "frame_count": self.frame_count,
            "frame_count_exact": self.frame_count_exact,
            "every_nth": self.every_nth,
            "frames_computed": self.frames_computed,
            "fov_deg": self.fov_deg,
            "fov_vertical_deg": self.fov_vertical_deg,
            "focal_length_px": self.focal_length_px,
            "focal_length_source": self.focal_length_source,
            "focal_length_35mm": self.focal_length_35mm,
            "frame_fov_deg": list(self.frame_fov_deg),
            "frame_fov_spread": self.frame_fov_spread,
            "camera": self.camera.to_dict() if self.camera is not None else None,
            "depth": self.depth,
            "preview": self.preview,
            "model": self.model,
            "workers": [dict(w) for w in self.workers],
        }
        if self.warnings:
            out["warnings"] = list(self.warnings)
        out.update(
            timings_ms=self.timings_ms,
            frame_timings_ms=self.frame_timings_ms,
            job_id=self.job_id,
            created_at=self.created_at,
        )
        return out

    @classmethod
    def from_dict(cls, record: Any, source: str | None = None) -> ClipSidecar | None:
        """A clip's sidecar read back, or None if it is none: not an object, not `kind: "clip"` (a
        photo's sidecar), or no `source` where the reader gives none."""
        if not isinstance(record, dict) or record.get("kind") != KIND:
            return None
        named = text(record.get("source"))
        if (named or source) is None:
            return None
        fps_exact = text(record.get("fps_exact"))
        exact = record.get("frame_count_exact")
        rotation = count(record.get("rotation"))
        return cls(
            source=named or source or "",
            sha256=text(record.get("sha256")),
            source_stat=recorded_stamp(record),
            width=count(record.get("width")),
            height=count(record.get("height")),
            rotation=rotation if rotation in ROTATIONS else None,
            fps=_positive(record.get("fps")),
            fps_exact=fps_exact if fps_exact is not None and _EXACT_FPS.fullmatch(fps_exact) else None,
            frame_count=count(record.get("frame_count")),
            frame_count_exact=exact if isinstance(exact, bool) else None,
            every_nth=count(record.get("every_nth")),
            frames_computed=count(record.get("frames_computed")),
            fov_deg=number(record.get("fov_deg")),
            fov_vertical_deg=number(record.get("fov_vertical_deg")),
            focal_length_px=number(record.get("focal_length_px")),
            focal_length_source=text(record.get("focal_length_source")),
            focal_length_35mm=number(record.get("focal_length_35mm")),
            frame_fov_deg=tuple(number(v) for v in items(record.get("frame_fov_deg"))),
            frame_fov_spread=_read_spread(record.get("frame_fov_spread")),
            camera=Camera.from_dict(record.get("camera")),
            depth=_read_depth(section(record, "depth")),
            preview=text(record.get("preview")),
            model=section(record, "model"),
            workers=tuple(
                {"host": text(w.get("host")), "name": text(w.get("name")), "frames": count(w.get("frames"))}
                for w in items(record.get("workers"))
                if isinstance(w, dict)
            ),
            timings_ms=_numbers(section(record, "timings_ms")),
            frame_timings_ms=_numbers(section(record, "frame_timings_ms")),
            job_id=text(record.get("job_id")),
            created_at=text(record.get("created_at")),
            warnings=tuple(w for w in items(record.get("warnings")) if isinstance(w, str)),
        )


def _finite(name: str, value: Any, source: str) -> float:
    found = number(value)
    if found is None:
        raise ValueError(f"{source}: {name} {value!r} is not a finite number, which a sidecar cannot record")
    return found


def _spread(spread: Mapping[str, float] | None, source: str) -> dict[str, float] | None:
    """`FovSpread` as a dict, its keys in a fixed order; `frames` counts frames, the rest are degrees."""
    if spread is None:
        return None
    out = {key: _finite(f"frame_fov_spread.{key}", spread.get(key), source) for key in SPREAD_KEYS}
    out["frames"] = int(out["frames"])
    return out


def _read_spread(value: Any) -> dict[str, float] | None:
    """The spread as written, or None when any of its numbers is missing: half a spread says nothing."""
    if not isinstance(value, dict):
        return None
    frames = count(value.get("frames"))
    degrees = {key: number(value.get(key)) for key in SPREAD_KEYS[1:]}
    if frames is None or any(v is None for v in degrees.values()):
        return None
    return {"frames": frames, **degrees}  # type: ignore[dict-item]


def _read_depth(depth: dict[str, Any]) -> dict[str, Any]:
    """The documented keys of `depth` only, numbers finite, names strings; what is missing is left out."""
    read = {
        key: (number(depth.get(key)) if key in ("min", "max", "median") else text(depth.get(key))) for key in DEPTH_KEYS
    }
    return {key: value for key, value in read.items() if value is not None}


def _positive(value: Any) -> float | None:
    """A finite number above 0 (a frame rate, a 35 mm focal length: 0 is a camera's "unknown"), or None."""
    found = number(value)
    return found if found is not None and found > 0 else None


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {key: found for key, value in values.items() if (found := number(value)) is not None}
