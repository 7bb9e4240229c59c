"""`depthq models convert`: official DepthPro weights -> a Core ML mlprogram with canonical inverse depth AND FOV.

The hub's Core ML exports give meters without a field of view, so a Mac mini running them can report
no focal length and cannot use EXIF the way the reference does. This conversion keeps DepthPro's two
outputs, so the Core ML backend runs the same metric math as torch. It runs on Linux or macOS.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any, Literal

from producer.config import ModelConfig
from worker.backends.torch_backend import input_size_of
from worker.errors import ModelUnavailableError
from worker.models import resolve_model_dir

log = logging.getLogger(__name__)

Compression = Literal["none", "int8", "palettize8", "palettize6", "palettize4"]
COMPRESSIONS: tuple[str, ...] = ("none", "int8", "palettize8", "palettize6", "palettize4")

IMAGE_INPUT = "image"
DEPTH_OUTPUT = "canonical_inverse_depth"
FOV_OUTPUT = "fov_deg"


def freeze_position_embeddings(model: Any, example: Any) -> None:
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
        model(example)


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
    precision: Literal["float16", "float32"] = "float16",
) -> Path:
    """Convert `model.path` (hub id or local checkpoint) to `output` (.mlpackage), atomically."""
    import coremltools as ct
    import torch
    from transformers import DepthProForDepthEstimation

    if output.suffix != ".mlpackage":
        raise ValueError(f"{output}: the Core ML output must end in .mlpackage")
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

    wrapped = DepthAndFov(net).eval()
    example = torch.zeros(1, 3, size, size)
    freeze_position_embeddings(wrapped, example)
    with torch.no_grad():
        traced = torch.jit.trace(wrapped, example, strict=False)
    log.info("traced %s at %dx%d; converting", folder, size, size)
    mlmodel = ct.convert(
        traced,
        # The image input does the reference's rescale to [-1, 1] inside the model: x * 2/255 - 1.
        inputs=[
            ct.ImageType(
                name=IMAGE_INPUT,
                shape=example.shape,
                scale=2.0 / 255.0,
                bias=[-1.0, -1.0, -1.0],
                color_layout=ct.colorlayout.RGB,
            )
        ],
        outputs=[ct.TensorType(name=DEPTH_OUTPUT), ct.TensorType(name=FOV_OUTPUT)],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.macOS13,
    )
    mlmodel = _compress(mlmodel, compression)
    mlmodel.short_description = "DepthPro: canonical inverse depth and horizontal FOV (degrees), made by depthq"
    mlmodel.user_defined_metadata["depthq.source"] = str(model.path)
    mlmodel.user_defined_metadata["depthq.compression"] = compression
    mlmodel.input_description[IMAGE_INPUT] = f"RGB photo resized to {size}x{size}"
    mlmodel.output_description[DEPTH_OUTPUT] = "canonical inverse depth; meters need W / f_px"
    mlmodel.output_description[FOV_OUTPUT] = "horizontal field of view, degrees"
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        mlmodel.save(str(staging / output.name))
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging / output.name, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
