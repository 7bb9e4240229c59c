"""Metric depth from a DepthPro output, exactly as apple/ml-depth-pro `infer()` computes it.

Every backend feeds this one function, so the math cannot drift between Core ML and PyTorch. The
per-pixel steps (scale, resize back to the photo, clamp, reciprocal) run where the model's output
lies: a numpy map on the CPU, a CUDA tensor on its GPU, with only the float32 result downloaded.
`worker/array_ops.py` holds the two sides; this file holds the math once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from depthq.camera import Camera, pinhole
from worker.array_ops import Array, ops_for
from worker.backends.base import Prediction
from worker.errors import BadInputError, ModelOutputError

# The diagonal of a 36 x 24 mm frame, in mm.
_FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)
MIN_INVERSE_DEPTH = 1e-4  # 1/m: depth is capped at 10 km
MAX_INVERSE_DEPTH = 1e4  # 1/m: depth is floored at 0.1 mm

# "clip": the caller knew the focal length already, one for every frame of a video clip (worker/clip_camera.py).
FocalSource = Literal["exif", "model", "clip"]


@dataclass(frozen=True)
class MetricDepth:
    """`depth` is float32 meters, (height, width). Focal length in pixels, angles in degrees.

    The focal length and FOVs are None only for a model that outputs meters and no FOV, on a photo
    without an EXIF focal length: its depth is still metric, but nothing tells the camera's angle.
    """

    depth: np.ndarray
    focal_length_px: float | None
    focal_length_source: FocalSource | None
    fov_deg: float | None
    fov_vertical_deg: float | None

    @property
    def camera(self) -> Camera | None:
        """The pinhole this depth map was measured with (`depthq.camera`), for the sidecar and the PLY."""
        if self.focal_length_px is None:
            return None
        height, width = self.depth.shape
        return pinhole(self.focal_length_px, width, height)


def is_camera_fov(fov_deg: float | None) -> bool:
    """Whether a FOV estimate is one a camera could have (0 to 180 degrees; NaN and inf are not)."""
    return fov_deg is not None and 0.0 < fov_deg < 180.0


def focal_px_from_fov(fov_deg: float, width: int) -> float:
    """Focal length in pixels from the horizontal FOV in degrees of an image `width` pixels wide."""
    return 0.5 * width / math.tan(0.5 * math.radians(fov_deg))


def focal_px_from_35mm(focal_35mm: float, width: int, height: int) -> float:
    """Focal length in pixels from the 35 mm equivalent in mm: the diagonals match, so orientation does not matter."""
    return focal_35mm * math.hypot(width, height) / _FULL_FRAME_DIAGONAL_MM


def fov_from_focal_px(focal_px: float, size: int) -> float:
    """The FOV in degrees across `size` pixels (the width: horizontal; the height: vertical) at `focal_px` pixels."""
    return math.degrees(2.0 * math.atan(0.5 * size / focal_px))


def _focal(
    width: int, height: int, fov_deg: float | None, focal_35mm: float | None, focal_px: float | None = None
) -> tuple[float, FocalSource] | None:
    """A focal length the caller already knows wins; then EXIF over the model's FOV estimate, as in the reference."""
    if focal_px is not None:
        if not (math.isfinite(focal_px) and focal_px > 0):
            raise ValueError(f"focal_length_px {focal_px!r} is not a focal length: a positive number of pixels")
        return float(focal_px), "clip"
    if focal_35mm is not None and math.isfinite(focal_35mm) and focal_35mm > 0:
        return focal_px_from_35mm(focal_35mm, width, height), "exif"
    if is_camera_fov(fov_deg):
        return focal_px_from_fov(fov_deg, width), "model"
    return None


def metric_depth(
    inverse_depth: Array,
    width: int,
    height: int,
    fov_deg: float | None,
    focal_length_35mm: float | None = None,
    *,
    already_metric: bool = False,
    focal_length_px: float | None = None,
) -> MetricDepth:
    """Model-resolution inverse depth -> meters at the photo's upright width x height.

    `inverse_depth` is DepthPro's canonical inverse depth, scaled here by W / f_px. With
    `already_metric`, it is 1/meters from a model that did that scaling itself (a meters-only Core ML
    export); it then takes the same resize and clamp, and the focal length is reported, not used.
    A numpy map or a torch tensor on any device (a CUDA backend hands its output over without a
    download); the depth returned is float32 numpy either way.

    `focal_length_px` (pixels, of the upright width x height) is one the caller already knows, and wins
    over both the model's FOV and EXIF: a video clip has one lens, so each frame of it is measured at the
    clip's focal length (`worker/clip_camera.py`), and its depth does not flicker with the model's
    per-frame FOV estimate. The source is then "clip". Like EXIF's, it is reported, not used, with
    `already_metric`.
    """
    focal = _focal(width, height, fov_deg, focal_length_35mm, focal_length_px)
    ops = ops_for(inverse_depth)
    inverse = ops.float32(inverse_depth)
    if not already_metric:
        if focal is None and fov_deg is not None:
            raise ModelOutputError(
                f"the model answered a field of view of {fov_deg!r} degrees, which no camera has (0 to 180): "
                "its output is wrong, not the photo. Check the model's weights (model.path, or the Core ML "
                "package), or give the photo an EXIF FocalLengthIn35mmFilm"
            )
        if focal is None:
            raise ValueError(
                f"no usable focal length: model FOV {fov_deg!r} and no EXIF FocalLengthIn35mmFilm; "
                "use a model with a FOV head"
            )
        inverse = inverse * (width / focal[0])  # a Python float: float32 stays float32, numpy or torch
    # In place on the full-resolution map: two fewer 48 MB temporaries for a 12 MP photo. No resize and
    # no scaling leaves the caller's own map, which is never written.
    depth = ops.private(ops.resize(inverse, width, height), inverse_depth)
    ops.clip_(depth, MIN_INVERSE_DEPTH, MAX_INVERSE_DEPTH)
    ops.reciprocal_(depth)
    depth = ops.to_numpy(depth)
    if focal is None:
        return MetricDepth(depth, None, None, None, None)
    f_px, source = focal
    return MetricDepth(
        depth=depth,
        focal_length_px=float(f_px),
        focal_length_source=source,
        fov_deg=fov_from_focal_px(f_px, width),
        fov_vertical_deg=fov_from_focal_px(f_px, height),
    )


def metric_depth_of(
    name: str, prediction: Prediction, width: int, height: int, focal_length_35mm: float | None
) -> MetricDepth:
    """`metric_depth` of one photo or one frame of a clip, its refusals named for it (`name`: "a.jpg",
    "clip.mp4, frame 12"): a size or focal length it cannot use is the input's fault (BadInputError,
    recorded once), a FOV no camera has the model's (ModelOutputError)."""
    try:
        return metric_depth(
            prediction.inverse_depth,
            width,
            height,
            prediction.fov_deg,
            focal_length_35mm,
            already_metric=prediction.already_metric,
        )
    except ValueError as exc:
        raise BadInputError(f"{name}: {exc}") from None
    except ModelOutputError as exc:
        raise ModelOutputError(f"{name}: {exc}") from None


def depth_stats(depth: np.ndarray, model_side: int) -> dict[str, Any]:
    """Min and max of the map (exact), and the median of a sample: every step-th pixel each way, a grid
    no coarser than the model's output.

    The sampled median costs ~15 ms for 12 MP against ~90 ms for the exact one. It is not the exact
    median: on smooth maps they differ by about 1e-4 (relative; bench/overhead.py), but on maps with
    fine detail (foliage, fences) by up to ~1.5 %, since the full map's bilinear in-between values are
    not all in the sample. The README documents `depth.median` as this sampled median.
    """
    step = max(1, int(math.sqrt(depth.size) / model_side))
    sample = depth[::step, ::step].ravel().copy()
    mid = sample.size // 2
    if sample.size % 2:
        median = float(np.partition(sample, mid)[mid])
    else:
        part = np.partition(sample, (mid - 1, mid))
        median = float((part[mid - 1] + part[mid]) / 2)
    return {"unit": "m", "min": float(depth.min()), "max": float(depth.max()), "median": median}
