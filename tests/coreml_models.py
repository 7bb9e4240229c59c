"""Small Core ML programs with the I/O of the published DepthPro exports (built by coremltools on Linux).

They compute nothing like depth; they exist so contract detection sees the real names, types and shapes.
"""

from __future__ import annotations

from pathlib import Path

import coremltools as ct
from coremltools.converters.mil import Builder as mb

SIZE = 32


def _save(prog, inputs: list, path: Path) -> Path:
    model = ct.convert(prog, inputs=inputs, convert_to="mlprogram", minimum_deployment_target=ct.target.macOS13)
    model.save(str(path))
    return path


def meters_model(path: Path, size: int = SIZE) -> Path:
    """Like the hub's DepthPro.mlpackage: `image` + `originalWidth` -> `depthMeters` (1, 1, S, S)."""

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, size, size)), mb.TensorSpec(shape=(1, 1, 1, 1))])
    def prog(image, originalWidth):
        mean = mb.reduce_mean(x=image, axes=[1], keep_dims=True)
        return mb.add(x=mean, y=originalWidth, name="depthMeters")

    inputs = [
        ct.ImageType(name="image", shape=(1, 3, size, size)),
        ct.TensorType(name="originalWidth", shape=(1, 1, 1, 1)),
    ]
    return _save(prog, inputs, path)


def normalized_model(path: Path, size: int = SIZE) -> Path:
    """Like DepthProNormalizedInverseDepth: `image` -> `normalizedInverseDepth`, relative only."""

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, size, size))])
    def prog(image):
        return mb.reduce_mean(x=image, axes=[1], keep_dims=True, name="normalizedInverseDepth")

    return _save(prog, [ct.ImageType(name="image", shape=(1, 3, size, size))], path)


def older_export(path: Path, size: int = SIZE) -> Path:
    """Older exports: multi-array `pixel_values` -> `depth_meters` and `view_angle`."""

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, size, size))])
    def prog(pixel_values):
        depth = mb.reduce_mean(x=pixel_values, axes=[1], keep_dims=False, name="depth_meters")
        angle = mb.reduce_mean(x=pixel_values, axes=[1, 2, 3], keep_dims=False, name="view_angle")
        return depth, angle

    return _save(prog, [ct.TensorType(name="pixel_values", shape=(1, 3, size, size))], path)


def canonical_without_fov(path: Path, size: int = SIZE) -> Path:
    """Canonical inverse depth and no FOV: usable only with EXIF, so never picked automatically."""

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, size, size))])
    def prog(image):
        return mb.reduce_mean(x=image, axes=[1], keep_dims=False, name="canonical_inverse_depth")

    return _save(prog, [ct.ImageType(name="image", shape=(1, 3, size, size))], path)
