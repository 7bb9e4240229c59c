"""The model's input, as ml-depth-pro prepares it: RGB rescaled to [-1, 1], bilinear resize, no antialias.

transformers' DepthPro image processor would need torchvision, so this is done here, and shared by
every backend so they all see the same pixels. The steps are written once: on a numpy photo they run
on the CPU (OpenCV), on a torch tensor on its device (a CUDA worker uploads the uint8 photo and
prepares it on the GPU). `worker/array_ops.py` holds the two sides.
"""

from __future__ import annotations

from worker.array_ops import Array, ops_for


def resize_bilinear(array: Array, width: int, height: int) -> Array:
    """Bilinear with half-pixel centres and no antialias: torch's interpolate(align_corners=False)."""
    return ops_for(array).resize(array, width, height)


def model_input(rgb: Array, size: int) -> Array:
    """uint8 (H, W, 3) -> float32 (3, size, size) in [-1, 1], numpy or torch as `rgb` is.

    Resizing before the rescale gives the same values as the reference's rescale-then-resize (both
    are affine per pixel) while touching far fewer floats.
    """
    ops = ops_for(rgb)
    small = ops.private(ops.resize(ops.float32(rgb), size, size), rgb)
    small *= 2.0 / 255.0
    small -= 1.0
    return ops.channels_first(small)
