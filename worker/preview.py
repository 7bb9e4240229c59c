"""A picture of the depth for people: inverse depth in OpenCV's turbo colormap, near is warm.

At most the model's resolution: the depth map holds no finer detail than the model saw, and a
full-size preview of a 12 MP photo cost more CPU (colormap and PNG) than every other stage together.
"""

from __future__ import annotations

import cv2
import numpy as np

# As the reference CLI: colour only what lies between 0.1 m and 250 m.
NEAR_M = 0.1
FAR_M = 250.0
# libpng's adaptive row filters cost more than the deflate itself and gain nothing on a colormapped
# map: no filter is ~3x faster and smaller (measured in bench/overhead.py). OpenCV < 4.10 lacks the flag.
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 3]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):
    _PNG_PARAMS += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


def preview_png(depth: np.ndarray, max_side: int) -> bytes:
    """`depth` in meters at full resolution; the PNG's long side is at most `max_side` pixels."""
    bgr = turbo_bgr(shrink(depth, max_side))
    ok, encoded = cv2.imencode(".png", bgr, _PNG_PARAMS)
    if not ok:
        raise RuntimeError("OpenCV could not encode the preview PNG")
    return encoded.tobytes()


def shrink(depth: np.ndarray, max_side: int) -> np.ndarray:
    """`depth` (meters) with its long side at most `max_side` pixels, keeping its shape; never enlarged."""
    height, width = depth.shape
    size = fit_size(width, height, max_side)
    if size != (width, height):
        # Bilinear is enough: the map is the model's output resized up, with no detail finer than the
        # model's grid to alias. Area averaging cost 20 ms more on a 12 MP map.
        depth = cv2.resize(depth, size, interpolation=cv2.INTER_LINEAR)
    return depth


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) in pixels of a map shrunk to a long side of at most `max_side`; never enlarged."""
    scale = max_side / max(height, width)
    if scale < 1.0:
        return max(1, round(width * scale)), max(1, round(height * scale))
    return width, height


def turbo_bgr(depth: np.ndarray, depth_range: tuple[float, float] | None = None) -> np.ndarray:
    """Inverse depth in turbo (BGR, uint8), from `depth_range` = (nearest, farthest) in meters: near is red.

    A photo is scaled between its own nearest and farthest points (None); a clip passes one range for all
    its frames, or the colours would flicker as the range moves. Either way only 0.1 m to 250 m is coloured.
    """
    inverse = 1.0 / depth
    if depth_range is None:
        hi, lo = float(inverse.max()), float(inverse.min())
    else:
        # Clamped in meters first, so that a range of 0 m or inf m is no division by zero.
        hi, lo = 1.0 / max(depth_range[0], NEAR_M), 1.0 / min(depth_range[1], FAR_M)
    hi = min(hi, 1.0 / NEAR_M)
    lo = max(lo, 1.0 / FAR_M)
    span = hi - lo if hi > lo else 1.0
    scaled = np.clip((inverse - lo) / span, 0.0, 1.0)
    grey = (scaled * 255.0 + 0.5).astype(np.uint8)
    return cv2.applyColorMap(grey, cv2.COLORMAP_TURBO)
