"""`<photo>.json`, the sidecar: what a depth result says of itself (README's Output section).

One type for every side that touches it: the job writes it (`Sidecar.for_photo` for a computed
result, a copy and an alias alike), and the job (copies), the gallery and its measuring page, the
rescan's "is it done?" and the audit read it back through `Sidecar.from_dict`, never by string keys
of their own, so a key renamed on one side cannot silently break another.

Reading is lenient: a sidecar may be hand-edited, truncated or older. A field that is missing or of
the wrong type reads as None (or empty), and a non-finite number too (Python's json reads NaN, which
would make the gallery's JSON invalid for the browser). Writing gives exactly the documented keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from depthq.camera import Camera
from depthq.contract import Stamp, output_name, recorded_stamp


def number(value: Any) -> float | None:
    """A finite JSON number, or None (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def count(value: Any) -> int | None:
    """A non-negative JSON integer (pixels, frames, degrees of rotation), or None; bools are not counts."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def items(value: Any) -> list[Any]:
    """A JSON list, or an empty one for anything else."""
    return value if isinstance(value, list) else []


def section(record: dict[str, Any], key: str) -> dict[str, Any]:
    value = record.get(key)
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Sidecar:
    """A depth result's description. `depth` is `{unit, min, max, median, file}` (meters), `model`
    what `describe_model` gives plus backend and device, `worker` `{host, name}`, `timings_ms` the
    stages' milliseconds; `camera` is None only when nothing gave a focal length."""

    source: str
    sha256: str | None
    source_stat: Stamp | None
    width: int | None
    height: int | None
    fov_deg: float | None
    fov_vertical_deg: float | None
    focal_length_px: float | None
    focal_length_source: str | None
    focal_length_35mm: float | None
    fov_model_deg: float | None
    camera: Camera | None
    depth: dict[str, Any]
    model: dict[str, Any]
    worker: dict[str, Any]
    timings_ms: dict[str, float] = field(default_factory=dict)
    job_id: str | None = None
    created_at: str | None = None
    warnings: tuple[str, ...] = ()
    copied_from: str | None = None

    def for_photo(
        self,
        source: str,
        job_id: str,
        timings: dict[str, float],
        stamp: Stamp | None,
        copied_from: str | None = None,
    ) -> Sidecar:
        """The sidecar one photo's set is written with: this result, named for `source` (its depth
        file's name too), stamped with what was read of it. The one way every written sidecar is made:
        for a computed photo, for a byte-identical copy of a stored result, and for an alias."""
        return dataclasses.replace(
            self,
            source=source,
            source_stat=stamp,
            depth={**self.depth, "file": output_name(source.rsplit("/", 1)[-1], "npy")},
            timings_ms=timings,
            job_id=job_id,
            created_at=datetime.now(UTC).isoformat(),
            copied_from=copied_from,
        )

    @property
    def requested_model(self) -> str | None:
        """The model the result was asked for: the job's when the worker ran another, else what ran."""
        m = self.model
        return text(m.get("requested")) or text(m.get("source")) or text(m.get("name"))

    def to_dict(self) -> dict[str, Any]:
        """The JSON on disk: README's Output section, key for key."""
        out: dict[str, Any] = {
            "source": self.source,
            "sha256": self.sha256,
            "source_stat": self.source_stat,
            "width": self.width,
            "height": self.height,
            "fov_deg": self.fov_deg,
            "fov_vertical_deg": self.fov_vertical_deg,
            "focal_length_px": self.focal_length_px,
            "focal_length_source": self.focal_length_source,
            "focal_length_35mm": self.focal_length_35mm,
            "fov_model_deg": self.fov_model_deg,
            "camera": self.camera.to_dict() if self.camera is not None else None,
            "depth": self.depth,
            "model": self.model,
            "worker": self.worker,
        }
        if self.warnings:
            out["warnings"] = list(self.warnings)
        out.update(timings_ms=self.timings_ms, job_id=self.job_id, created_at=self.created_at)
        if self.copied_from is not None:
            out["copied_from"] = self.copied_from
        return out

    @classmethod
    def from_dict(cls, record: Any, source: str | None = None) -> Sidecar | None:
        """A sidecar read back, or None if it is no photo's sidecar at all: not an object, no `source`
        where the reader gives none (the gallery names a record by its file's name), or one that says it
        is of another kind. A video clip's `<clip>.json` (`kind: "clip"`, `depthq.clip_sidecar`) sits
        where a photo's would and shares many of its keys, so without the check it would read as a
        photo's result with no depth file; a photo's sidecar has no `kind`."""
        named = text(record.get("source")) if isinstance(record, dict) else None
        if not isinstance(record, dict) or (named or source) is None:
            return None
        if text(record.get("kind")) not in (None, "photo"):
            return None
        return cls(
            source=named or source or "",
            sha256=text(record.get("sha256")),
            source_stat=recorded_stamp(record),
            width=count(record.get("width")),
            height=count(record.get("height")),
            fov_deg=number(record.get("fov_deg")),
            fov_vertical_deg=number(record.get("fov_vertical_deg")),
            focal_length_px=number(record.get("focal_length_px")),
            focal_length_source=text(record.get("focal_length_source")),
            focal_length_35mm=number(record.get("focal_length_35mm")),
            fov_model_deg=number(record.get("fov_model_deg")),
            camera=Camera.from_dict(record.get("camera")),
            depth=section(record, "depth"),
            model=section(record, "model"),
            worker=section(record, "worker"),
            timings_ms=section(record, "timings_ms"),
            job_id=text(record.get("job_id")),
            created_at=text(record.get("created_at")),
            warnings=tuple(w for w in items(record.get("warnings")) if isinstance(w, str)),
            copied_from=text(record.get("copied_from")),
        )
