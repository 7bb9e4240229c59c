"""The model's input, as ml-depth-pro prepares it: RGB rescaled to [-1, 1], bilinear resize, no antialias.

transformers' DepthPro image processor would need torchvision, so this is done here, on numpy, and
shared by every backend so they all see the same pixels.
"""

from __future__ import annotations

import cv2
import numpy as np


def resize_bilinear(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear with half-pixel centres and no antialias: torch's interpolate(align_corners=False)."""
    if array.shape[1] == width and array.shape[0] == height:
        return array
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)


def model_input(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, size, size) in [-1, 1].

    Resizing before the rescale gives the same values as the reference's rescale-then-resize (both
    are affine per pixel) while touching far fewer floats.
    """
    small = resize_bilinear(rgb.astype(np.float32), size, size)
    small *= 2.0 / 255.0
    small -= 1.0
    return np.ascontiguousarray(small.transpose(2, 0, 1))
