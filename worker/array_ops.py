"""The few array operations the depth math needs, on numpy (CPU, OpenCV) or on torch tensors (any device).

`worker/preprocess.py` and `worker/depth.py` write each step of ml-depth-pro's math once, in terms of
these operations; which library runs a step follows the array it is handed. A numpy array runs on
the CPU, as every Core ML host does; a CUDA tensor stays on its GPU until `to_numpy` downloads the
result. The two sides are tested against each other (tests/test_gpu_path.py).

A Core ML host need not have torch: torch is imported only once a tensor arrives.
"""

from __future__ import annotations

from typing import Any, Protocol

import cv2
import numpy as np

# A numpy array or a torch tensor: the two kinds of array the math runs on. `Any`, so that this module
# and its callers never import torch to name the type.
Array = Any


class ArrayOps(Protocol):
    """What one library must provide. Images are (H, W, C) and maps (H, W) on both sides."""

    def float32(self, array: Array) -> Array:
        """As float32, without a copy when it already is."""

    def resize(self, array: Array, width: int, height: int) -> Array:
        """Bilinear, half-pixel centres, no antialias (torch's align_corners=False); same array if same size."""

    def channels_first(self, array: Array) -> Array:
        """(H, W, C) -> contiguous (C, H, W): the layout the model takes."""

    def private(self, result: Array, source: Array) -> Array:
        """`result`, copied if it shares memory with `source`: the in-place steps never write the caller's map."""

    def clip_(self, array: Array, low: float, high: float) -> Array:
        """Clamp in place."""

    def reciprocal_(self, array: Array) -> Array:
        """1/x in place."""

    def to_numpy(self, array: Array) -> np.ndarray:
        """float32 numpy on the host: a download, for a tensor on a GPU."""


class NumpyOps:
    """OpenCV's INTER_LINEAR is torch's bilinear with align_corners=False (and no antialias)."""

    def float32(self, array: Array) -> Array:
        return np.asarray(array, dtype=np.float32)

    def resize(self, array: Array, width: int, height: int) -> Array:
        if array.shape[1] == width and array.shape[0] == height:
            return array
        return cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)

    def channels_first(self, array: Array) -> Array:
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def private(self, result: Array, source: Array) -> Array:
        return result.copy() if np.shares_memory(result, source) else result

    def clip_(self, array: Array, low: float, high: float) -> Array:
        return np.clip(array, low, high, out=array)

    def reciprocal_(self, array: Array) -> Array:
        return np.reciprocal(array, out=array)

    def to_numpy(self, array: Array) -> np.ndarray:
        return array.astype(np.float32, copy=False)


class TorchOps:
    """`torch.nn.functional.interpolate` on the tensor's own device; nothing leaves it but `to_numpy`."""

    def float32(self, array: Array) -> Array:
        import torch

        return array.to(torch.float32)

    def resize(self, array: Array, width: int, height: int) -> Array:
        import torch.nn.functional as F

        if array.shape[1] == width and array.shape[0] == height:
            return array
        # interpolate wants (N, C, H, W): a map gains two axes, an image is viewed channels-first and
        # back, so that the caller sees the same layout as numpy's and no copy is made for it.
        batch = array[None, None] if array.ndim == 2 else array.permute(2, 0, 1)[None]
        out = F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
        return out[0, 0] if array.ndim == 2 else out[0].permute(1, 2, 0)

    def channels_first(self, array: Array) -> Array:
        return array.permute(2, 0, 1).contiguous()

    def private(self, result: Array, source: Array) -> Array:
        shared = result.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
        return result.clone() if shared else result

    def clip_(self, array: Array, low: float, high: float) -> Array:
        return array.clamp_(low, high)

    def reciprocal_(self, array: Array) -> Array:
        return array.reciprocal_()

    def to_numpy(self, array: Array) -> np.ndarray:
        import torch

        return array.to(torch.float32).cpu().numpy()


NUMPY = NumpyOps()
TORCH = TorchOps()


def ops_for(array: Array) -> ArrayOps:
    """numpy for anything numpy takes; torch for a tensor, wherever it lives."""
    if type(array).__module__.split(".")[0] == "torch":
        return TORCH
    return NUMPY
