"""`depthq models convert`: official DepthPro weights -> a Core ML mlprogram with canonical inverse depth AND FOV.

The hub's Core ML exports give meters without a field of view, so a Mac mini running them can report
no focal length and cannot use EXIF the way the reference does. This conversion keeps DepthPro's two
outputs, so the Core ML backend runs the same metric math as torch. It runs on Linux or macOS.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any, Literal, get_args

from depthq.config import ModelConfig
from worker.errors import ModelUnavailableError
from worker.models import resolve_model_dir

log = logging.getLogger(__name__)

# The CLI offers these as its choices: this module imports no numpy, torch or coremltools until it converts.
Compression = Literal["none", "int8", "palettize8", "palettize6", "palettize4"]
COMPRESSIONS: tuple[str, ...] = get_args(Compression)
Precision = Literal["float16", "float32"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
Contract = Literal["canonical", "meters"]
CONTRACTS: tuple[str, ...] = get_args(Contract)
IMAGE_INPUT = "image"
DEPTH_OUTPUT = "canonical_inverse_depth"
FOV_OUTPUT = "fov_deg"
# The hub exports' interface, for apps written against it (e.g. the DepthProSample app).
WIDTH_INPUT = "originalWidth"
METERS_OUTPUT = "depthMeters"


def freeze_position_embeddings(model: Any, examples: tuple[Any, ...]) -> None:
    """Hold every Dinov2 position-embedding interpolation at the traced input size.

    Dinov2 always interpolates its position embeddings while tracing, bicubically, and Core ML has no
    bicubic upsample. The input size is fixed in the export anyway, so one eager pass computes those
    tensors and the trace replays them as constants.
    """
    import torch
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings

    for module in model.modules():
        if not isinstance(module, Dinov2Embeddings):
            continue
        original = module.interpolate_pos_encoding
        cache: dict[tuple[int, int, int], torch.Tensor] = {}

        def fixed(self: Any, embeddings: torch.Tensor, height: int, width: int, original=original, cache=cache):
            key = (int(embeddings.shape[1]), int(height), int(width))
            if key not in cache:
                if torch.jit.is_tracing():
                    raise RuntimeError(f"position embeddings for {key} were not computed before tracing")
                cache[key] = original(embeddings, height, width).detach().clone()
            return cache[key]

        module.interpolate_pos_encoding = types.MethodType(fixed, module)
    with torch.no_grad():
        model(*examples)


def _compress(mlmodel: Any, compression: Compression) -> Any:
    if compression == "none":
        return mlmodel
    import coremltools.optimize.coreml as cto

    if compression == "int8":
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric"))
        return cto.linear_quantize_weights(mlmodel, config=config)
    nbits = int(compression.removeprefix("palettize"))
    # "uniform" needs no scikit-learn (k-means would); the depth difference is what to check either way.
    config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="uniform", nbits=nbits))
    return cto.palettize_weights(mlmodel, config=config)


def convert(
    model: ModelConfig,
    output: Path,
    compression: Compression = "none",
    precision: Precision = "float16",
    contract: Contract = "canonical",
) -> Path:
    """Convert `model.path` (hub id or local checkpoint) to `output` (.mlpackage), atomically.

    `canonical` (the default) outputs canonical inverse depth and FOV, so workers can use EXIF focal
    lengths. `meters` reproduces the hub exports' I/O (`image`, `originalWidth` -> `depthMeters`).
    """
    import coremltools as ct
    import torch
    from transformers import DepthProForDepthEstimation

    from worker.backends.torch_backend import input_size_of

    if output.suffix != ".mlpackage":
        raise ModelUnavailableError(f"--output {output}: a Core ML mlprogram is saved as a folder ending in .mlpackage")
    folder = resolve_model_dir(model)
    net, info = DepthProForDepthEstimation.from_pretrained(folder, use_fov_model=True, output_loading_info=True)
    if any("fov_model" in k for k in info.get("missing_keys", [])):
        raise ModelUnavailableError(
            f"{folder} has no FOV head weights; the point of this conversion is the FOV output. "
            "Use a checkpoint with the FOV model (apple/DepthPro-hf has it)"
        )
    net = net.eval().float()
    size = input_size_of(net.config)

    class DepthAndFov(torch.nn.Module):
        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.inner(pixel_values=pixel_values)
            return out.predicted_depth, out.field_of_view

    class Meters(DepthAndFov):
        """ml-depth-pro's infer() at model resolution; the width cancels out, as in the hub exports."""

        def forward(self, pixel_values: torch.Tensor, width: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            cid, fov = super().forward(pixel_values)
            f_px = 0.5 * width.reshape(1) / torch.tan(fov * (math.pi / 360.0))  # Core ML has no deg2rad
            inverse = cid * (width.reshape(1, 1, 1) / f_px.reshape(1, 1, 1))
            return (1.0 / torch.clamp(inverse, min=1e-4, max=1e4)).unsqueeze(1)

    example = torch.zeros(1, 3, size, size)
    image = ct.ImageType(
        name=IMAGE_INPUT,
        shape=example.shape,
        # The reference's rescale to [-1, 1], done inside the model: x * 2/255 - 1.
        scale=2.0 / 255.0,
        bias=[-1.0, -1.0, -1.0],
        color_layout=ct.colorlayout.RGB,
    )
    if contract == "canonical":
        wrapped: torch.nn.Module = DepthAndFov(net).eval()
        examples: tuple[torch.Tensor, ...] = (example,)
        inputs = [image]
        outputs = [ct.TensorType(name=DEPTH_OUTPUT), ct.TensorType(name=FOV_OUTPUT)]
    else:
        wrapped = Meters(net).eval()
        examples = (example, torch.full((1, 1, 1, 1), float(size)))
        inputs = [image, ct.TensorType(name=WIDTH_INPUT, shape=(1, 1, 1, 1))]
        outputs = [ct.TensorType(name=METERS_OUTPUT)]
    freeze_position_embeddings(wrapped, examples)
    with torch.no_grad():
        traced = torch.jit.trace(wrapped, examples, strict=False)
    log.info("traced %s at %dx%d; converting", folder, size, size)
    mlmodel = ct.convert(
        traced,
        inputs=inputs,
        outputs=outputs,
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.macOS13,
    )
    mlmodel = _compress(mlmodel, compression)
    mlmodel.user_defined_metadata["depthq.source"] = str(model.path)
    mlmodel.user_defined_metadata["depthq.compression"] = compression
    mlmodel.user_defined_metadata["depthq.contract"] = contract
    mlmodel.input_description[IMAGE_INPUT] = f"RGB photo resized to {size}x{size}"
    if contract == "canonical":
        mlmodel.short_description = "DepthPro: canonical inverse depth and horizontal FOV (degrees), made by depthq"
        mlmodel.output_description[DEPTH_OUTPUT] = "canonical inverse depth; meters need W / f_px"
        mlmodel.output_description[FOV_OUTPUT] = "horizontal field of view, degrees"
    else:
        mlmodel.short_description = "DepthPro: depth in meters at model resolution, made by depthq"
        mlmodel.input_description[WIDTH_INPUT] = "the photo's width in pixels (cancels out; kept for the interface)"
        mlmodel.output_description[METERS_OUTPUT] = "depth, meters"
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        mlmodel.save(str(staging / output.name))
        if output.exists():  # set the old one aside first: a worker never finds no model there
            os.replace(output, staging / "previous.mlpackage")
        os.replace(staging / output.name, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
