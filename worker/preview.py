"""A picture of the depth for people: inverse depth in OpenCV's turbo colormap, near is warm."""

from __future__ import annotations

import cv2
import numpy as np

# As the reference CLI: colour only what lies between 0.1 m and 250 m.
_NEAR_M = 0.1
_FAR_M = 250.0


def preview_png(depth: np.ndarray) -> bytes:
    inverse = 1.0 / depth
    hi = min(float(inverse.max()), 1.0 / _NEAR_M)
    lo = max(float(inverse.min()), 1.0 / _FAR_M)
    span = hi - lo if hi > lo else 1.0
    scaled = np.clip((inverse - lo) / span, 0.0, 1.0)
    grey = (scaled * 255.0 + 0.5).astype(np.uint8)
    bgr = cv2.applyColorMap(grey, cv2.COLORMAP_TURBO)
    ok, encoded = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError("OpenCV could not encode the preview PNG")
    return encoded.tobytes()
