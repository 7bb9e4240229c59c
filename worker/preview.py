"""A picture of the depth for people: inverse depth in OpenCV's turbo colormap, near is warm.

At most the model's resolution: the depth map holds no finer detail than the model saw, and a
full-size preview of a 12 MP photo cost more CPU (colormap and PNG) than every other stage together.
"""

from __future__ import annotations

import cv2
import numpy as np

# As the reference CLI: colour only what lies between 0.1 m and 250 m.
_NEAR_M = 0.1
_FAR_M = 250.0
# libpng's adaptive row filters cost more than the deflate itself and gain nothing on a colormapped
# map: no filter is ~3x faster and smaller (measured in bench/overhead.py). OpenCV < 4.10 lacks the flag.
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 3]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):
    _PNG_PARAMS += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


def preview_png(depth: np.ndarray, max_side: int) -> bytes:
    """`depth` in meters at full resolution; the PNG's long side is at most `max_side` pixels."""
    height, width = depth.shape
    scale = max_side / max(height, width)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        # Bilinear is enough: the map is the model's output resized up, with no detail finer than the
        # model's grid to alias. Area averaging cost 20 ms more on a 12 MP map.
        depth = cv2.resize(depth, size, interpolation=cv2.INTER_LINEAR)
    inverse = 1.0 / depth
    hi = min(float(inverse.max()), 1.0 / _NEAR_M)
    lo = max(float(inverse.min()), 1.0 / _FAR_M)
    span = hi - lo if hi > lo else 1.0
    scaled = np.clip((inverse - lo) / span, 0.0, 1.0)
    grey = (scaled * 255.0 + 0.5).astype(np.uint8)
    bgr = cv2.applyColorMap(grey, cv2.COLORMAP_TURBO)
    ok, encoded = cv2.imencode(".png", bgr, _PNG_PARAMS)
    if not ok:
        raise RuntimeError("OpenCV could not encode the preview PNG")
    return encoded.tobytes()
