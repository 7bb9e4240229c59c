"""One camera per video clip: the focal length every frame of a clip is measured at (issue 25, item 4).

A clip has one lens, but DepthPro estimates the field of view frame by frame, and for a fixed model
output depth is proportional to f_px (depth = f_px / (canonical inverse depth * W)). Frame-by-frame
FOVs would make a static scene breathe by as much as the estimate wobbles (a few percent for ±3
degrees). So the clip gets one focal length: the container's 35 mm equivalent where it has one
(iPhones write QuickTime's 35 mm equivalent focal length), else the median of the frames' FOV
estimates, which one bad frame cannot move.

A frame gets the clip's focal length in one of two ways, the same to float32 precision away from the
clamp, neither of them a second pass through the model:

- computed there: `worker.depth.metric_depth(..., focal_length_px=clip.f_px)`, when the clip's focal
  length is known before the frame's depth is computed;
- rescaled: `rescale_depth(depth, frame_f_px, clip_f_px)`, for a depth already computed at the
  frame's own f_px.

A model that gives no FOV (the hub's meters exports) on a clip without metadata has no focal length
to share: `ClipFocal.source` is None and each frame keeps its own depth.

The focal math itself lives in `worker/depth.py`, once; this module only chooses which focal length.
Units: focal lengths in pixels of the upright frame (W x H as the model sees it, after the container's
rotation), 35 mm equivalents in mm, angles in degrees (horizontal unless named vertical), depth in meters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from worker.depth import (
    MAX_INVERSE_DEPTH,
    MIN_INVERSE_DEPTH,
    focal_px_from_35mm,
    focal_px_from_fov,
    fov_from_focal_px,
    is_camera_fov,
)
from worker.errors import ModelOutputError

ClipFocalSource = Literal["metadata", "median of frames' FOV"]

# metric_depth's clamp of the inverse depth, in depth space: 0.1 mm to 10 km.
MIN_DEPTH_M = 1.0 / MAX_INVERSE_DEPTH
MAX_DEPTH_M = 1.0 / MIN_INVERSE_DEPTH


@dataclass(frozen=True)
class FovSpread:
    """How far the model's per-frame FOV estimates (degrees, horizontal) wander over the clip.

    For the clip sidecar: a wide spread says the model was unsure of the lens, which one focal length
    hides from the depth maps but should not hide from the reader.
    """

    frames: int  # frames that gave an estimate
    median_deg: float
    min_deg: float
    max_deg: float
    iqr_deg: float  # 75th minus 25th percentile, linearly interpolated


@dataclass(frozen=True)
class ClipFocal:
    """The one focal length of a clip of `width` x `height` upright frames, and where it came from.

    `f_px`, `source` and the clip's FOVs are None only when no frame has a FOV estimate and the
    container has no focal length (a meters-only model): each frame then keeps its own depth.
    `frame_fov_deg` is each frame's own estimate, in frame order, None where the model gave none.
    """

    width: int
    height: int
    f_px: float | None
    source: ClipFocalSource | None
    fov_deg: float | None
    fov_vertical_deg: float | None
    frame_fov_deg: tuple[float | None, ...]
    spread: FovSpread | None


def clip_focal_px(
    width: int,
    height: int,
    fov_estimates_deg: Sequence[float | None],
    focal_35mm: float | None,
) -> ClipFocal:
    """The clip's focal length: the container's 35 mm equivalent (mm) if usable, else the median frame FOV.

    `width` x `height` is the upright frame in pixels: a 35 mm equivalent is matched on the diagonal
    and a FOV is horizontal across the upright width, as `metric_depth` measures a photo.
    `fov_estimates_deg` holds the model's FOV (degrees) for each frame; None (no FOV head) is skipped.
    A `focal_35mm` of None, 0 (what some cameras write for "unknown") or not finite is absent, as
    for a photo's EXIF. The metadata wins over the frames' estimates, as EXIF wins for a photo: it is
    the lens, not a guess at it.

    Raises ModelOutputError for a FOV no camera has (outside 0 to 180 degrees, or not finite): the
    model's output is wrong, and its number would poison the median and the sidecar alike.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"a clip of {width} x {height} pixels has no frames to measure")
    frames = tuple(None if fov is None else float(fov) for fov in fov_estimates_deg)
    for index, fov in enumerate(frames):
        if fov is not None and not is_camera_fov(fov):
            raise ModelOutputError(
                f"the model answered a field of view of {fov!r} degrees for frame {index}, which no camera has "
                "(0 to 180): its output is wrong, not the clip. Check the model's weights"
            )
    known = [fov for fov in frames if fov is not None]
    spread = _spread(known) if known else None

    f_px: float | None = None
    source: ClipFocalSource | None = None
    if focal_35mm is not None and math.isfinite(focal_35mm) and focal_35mm > 0:
        f_px, source = focal_px_from_35mm(focal_35mm, width, height), "metadata"
    elif spread is not None:
        f_px, source = focal_px_from_fov(spread.median_deg, width), "median of frames' FOV"
    return ClipFocal(
        width=width,
        height=height,
        f_px=f_px,
        source=source,
        fov_deg=None if f_px is None else fov_from_focal_px(f_px, width),
        fov_vertical_deg=None if f_px is None else fov_from_focal_px(f_px, height),
        frame_fov_deg=frames,
        spread=spread,
    )


def _spread(fovs: list[float]) -> FovSpread:
    low, q1, median, q3, high = (float(v) for v in np.percentile(fovs, [0, 25, 50, 75, 100]))
    return FovSpread(frames=len(fovs), median_deg=median, min_deg=low, max_deg=high, iqr_deg=q3 - q1)


def rescale_depth(depth_m: np.ndarray, frame_f_px: float | None, clip_f_px: float | None) -> np.ndarray:
    """A frame's depth (meters) computed at its own focal length, moved to the clip's (both in pixels).

    For a fixed model output depth is proportional to f_px, so this is `depth * clip_f_px / frame_f_px`:
    exact, and no second pass through the model. Only for depth that `metric_depth` scaled itself from
    a canonical inverse depth; a meters-only model's depth was never scaled by a focal length.

    The clamp is the exception. `metric_depth` clamps the inverse depth, so depth lies in
    [MIN_DEPTH_M, MAX_DEPTH_M] = [1e-4, 1e4] m, and a pixel at a bound stands for anything beyond it.
    Here the product is clamped again to those bounds. Where the rescale pushes a clamped pixel
    further out (a far pixel at 1e4 m with clip_f_px > frame_f_px), that is exact; where it pulls
    one back in, the pixel lands at bound * clip_f_px / frame_f_px, off from what `metric_depth` would
    give at the clip's focal length by at most that ratio (10 km and 0.1 mm are no real depths anyway).

    Returns a new float32 array; the caller's map is never written. Raises ValueError when either
    focal length is missing (a frame or a clip with no focal length keeps its own depth) or not a
    positive number of pixels.
    """
    ratio = _focal_length("clip_f_px", clip_f_px) / _focal_length("frame_f_px", frame_f_px)
    # A Python float keeps float32 float32, with the same one rounding metric_depth's own scaling has.
    rescaled = np.asarray(depth_m, dtype=np.float32) * ratio
    return np.clip(rescaled, MIN_DEPTH_M, MAX_DEPTH_M, out=rescaled)


def _focal_length(name: str, f_px: float | None) -> float:
    if f_px is None:
        raise ValueError(
            f"{name} is None: without a focal length on both sides there is nothing to rescale, "
            "and the frame keeps its own depth (a meters-only model on a clip without metadata)"
        )
    if not (math.isfinite(f_px) and f_px > 0):
        raise ValueError(f"{name} {f_px!r} is not a focal length: a positive number of pixels")
    return float(f_px)
