"""Small Core ML programs with the I/O of the published DepthPro exports (built by coremltools on Linux).

They compute nothing like depth; they exist so contract detection sees the real names, types and shapes.
"""

from __future__ import annotations

from pathlib import Path

import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

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


def pruned_qlinear_export(path: Path, size: int = SIZE) -> Path:
    """Like DepthPro_pruned10_Qlinear in the Swift sample: `pixel_values` + `original_widths` (Float16
    [1,1,1,1]) -> `depth_meters`, meters with no FOV."""

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(1, 3, size, size)), mb.TensorSpec(shape=(1, 1, 1, 1), dtype=types.fp16)],
        opset_version=ct.target.macOS13,
    )
    def prog(pixel_values, original_widths):
        mean = mb.reduce_mean(x=pixel_values, axes=[1], keep_dims=True)
        return mb.add(x=mean, y=mb.cast(x=original_widths, dtype="fp32"), name="depth_meters")

    inputs = [
        ct.TensorType(name="pixel_values", shape=(1, 3, size, size)),
        ct.TensorType(name="original_widths", shape=(1, 1, 1, 1), dtype=np.float16),
    ]
    return _save(prog, inputs, path)


def seed_nid_export(path: Path, size: int = SIZE) -> Path:
    """Like the seed app's NID model: `pixel_values` -> `normalized_inverse_depth`, a OneComponent16Half image.

    A MIL program cannot declare an image output, so the spec's output type is rewritten, as the
    published model's spec has it (a GRAYSCALE_FLOAT16 image its Swift code divides by 255)."""

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, size, size))], opset_version=ct.target.macOS13)
    def prog(pixel_values):
        mean = mb.reduce_mean(x=pixel_values, axes=[1], keep_dims=True)
        return mb.cast(x=mean, dtype="fp16", name="normalized_inverse_depth")

    inputs = [ct.TensorType(name="pixel_values", shape=(1, 3, size, size))]
    model = ct.convert(prog, inputs=inputs, convert_to="mlprogram", minimum_deployment_target=ct.target.macOS13)
    spec = model.get_spec()
    output = spec.description.output[0]
    output.type.imageType.width = size
    output.type.imageType.height = size
    output.type.imageType.colorSpace = ct.proto.FeatureTypes_pb2.ImageFeatureType.GRAYSCALE_FLOAT16
    ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True).save(str(path))
    return path


def unnamed_export(path: Path, size: int = SIZE, with_scalar: bool = True) -> Path:
    """Outputs left with the converter's own names (`var_...`): a map, and a single number if `with_scalar`."""

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, size, size))])
    def prog(image):
        depth = mb.reduce_mean(x=image, axes=[1], keep_dims=False, name="var_1031")
        if not with_scalar:
            return depth
        return depth, mb.reduce_mean(x=image, axes=[1, 2, 3], keep_dims=False, name="var_1032")

    return _save(prog, [ct.ImageType(name="image", shape=(1, 3, size, size))], path)


def extra_input_export(path: Path, size: int = SIZE) -> Path:
    """A depth model that also wants a `mask` input: nothing depthq knows how to feed."""

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, size, size)), mb.TensorSpec(shape=(1, 2))])
    def prog(image, mask):
        depth = mb.reduce_mean(x=image, axes=[1], keep_dims=True)
        return mb.add(x=depth, y=mb.reduce_mean(x=mask, axes=[0, 1]), name="depthMeters")

    inputs = [ct.ImageType(name="image", shape=(1, 3, size, size)), ct.TensorType(name="mask", shape=(1, 2))]
    return _save(prog, inputs, path)


def flip_resize_corners(package: Path, path: Path) -> Path:
    """A copy of `package` whose every bilinear resize has the other corner alignment: the lowering
    mistake a converter could make, as the Mac would receive it (the spec itself edited, weights as they were)."""
    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    main = spec.mlProgram.functions["main"]
    block = main.block_specializations[main.opset]
    consts = {op.outputs[0].name: op for op in block.operations if op.type == "const"}
    # Resizes may share one constant: each is flipped once.
    names = {op.inputs["align_corners"].arguments[0].name for op in block.operations if op.type == "upsample_bilinear"}
    assert names, f"{package} has no bilinear resize to flip"
    for name in names:
        flag = consts[name].attributes["val"].immediateValue.tensor.bools
        flag.values[0] = not flag.values[0]
    ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True).save(str(path))
    return path
