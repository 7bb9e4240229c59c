"""`depthq models convert`: official DepthPro weights -> a Core ML mlprogram with canonical inverse depth AND FOV.

The hub's Core ML exports give meters without a field of view, so a Mac mini running them can report
no focal length and cannot use EXIF the way the reference does. This conversion keeps DepthPro's two
outputs, so the Core ML backend runs the same metric math as torch. It runs on Linux or macOS.

At DepthPro's released size some torch ops lower to Core ML in ways that grow with the input. The
converter traces a module in which each is replaced by an equivalent Core ML handles well, checks the
traced graph for any left, and checks the traced module against the original before converting:
- `F.unfold` (transformers' `split_to_patches`: kernel 384, stride 288 on the 1536 input) lowers to a
  convolution with a one-hot weight of (3*384^2) x 3 x 384^2 elements, 782 GB. Slicing and `cat`
  give the same patches (`split_patches`), as ml-depth-pro's own `split()` does.
- Dinov2's bicubic position-embedding interpolation has no Core ML op at all; the input size is
  fixed, so the embeddings are computed once and traced as constants (`freeze_position_embeddings`).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import shutil
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from depthq.config import ModelConfig
from depthq.conversion import Compression, Contract, Precision
from worker.errors import ModelUnavailableError
from worker.models import licence_of, resolve_model_dir

log = logging.getLogger(__name__)

IMAGE_INPUT = "image"
DEPTH_OUTPUT = "canonical_inverse_depth"
FOV_OUTPUT = "fov_deg"
# The hub exports' interface, for apps written against it (e.g. the DepthProSample app).
WIDTH_INPUT = "originalWidth"
METERS_OUTPUT = "depthMeters"


# Traced ops whose Core ML lowering grows with the input or kernel size, with why; a trace holding one
# is refused before coremltools spends minutes (and all the memory) on it.
EXPLODING_OPS: dict[str, str] = {
    "aten::im2col": "F.unfold lowers to a one-hot convolution weight of (C*k^2) x C x k x k elements",
    "aten::col2im": "F.fold lowers like unfold, a one-hot weight that grows with the kernel squared",
    "aten::unfold": "Tensor.unfold is lowered through gathers sized by every window of the input",
    "aten::upsample_bicubic2d": "Core ML has no bicubic resize; it fails to convert, at any size",
}
# The traced module must match the original this closely (max abs difference, float32).
PARITY_TOLERANCE = 1e-5


@dataclass
class ConvertReport:
    """What a conversion did and how long each stage took, for the CLI and `bench convert`."""

    output: Path
    input_size: int
    parity: dict[str, float] = field(default_factory=dict)
    stages_s: dict[str, float] = field(default_factory=dict)


def split_patches(pixel_values: Any, patch_size: int, overlap_ratio: float) -> Any:
    """transformers' `split_to_patches`, by slicing and `cat` instead of `F.unfold`: the same tensor.

    unfold orders windows row-major, window outer and batch inner, which is `cat(dim=0)` of the
    (B, C, k, k) windows; windows that do not fit are dropped, as unfold drops them.
    """
    import torch

    height, width = int(pixel_values.shape[-2]), int(pixel_values.shape[-1])
    if height == width == patch_size:
        return pixel_values
    stride = int(patch_size * (1 - overlap_ratio))
    windows = [
        pixel_values[:, :, y : y + patch_size, x : x + patch_size]
        for y in range(0, height - patch_size + 1, stride)
        for x in range(0, width - patch_size + 1, stride)
    ]
    return torch.cat(windows, dim=0)


@contextmanager
def sliced_patch_split() -> Iterator[None]:
    """While tracing, DepthPro's patch encoder splits by slicing (it looks the function up by name)."""
    from unittest import mock

    with mock.patch("transformers.models.depth_pro.modeling_depth_pro.split_to_patches", split_patches):
        yield


def exploding_ops(graph: Any) -> dict[str, str]:
    """The ops of a traced graph (inlined) that `EXPLODING_OPS` names, with the reason for each."""
    kinds = {node.kind() for node in graph.nodes()}
    return {kind: why for kind, why in EXPLODING_OPS.items() if kind in kinds}


def freeze_position_embeddings(model: Any, examples: tuple[Any, ...]) -> Any:
    """Hold every Dinov2 position-embedding interpolation at the traced input size.

    Dinov2 always interpolates its position embeddings while tracing, bicubically, and Core ML has no
    bicubic upsample. The input size is fixed in the export anyway, so one eager pass computes those
    tensors and the trace replays them as constants. Returns that pass's outputs: the original's.
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
        return model(*examples)


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
    verify: Callable[[Path], None] | None = None,
) -> ConvertReport:
    """Convert `model.path` (hub id or local checkpoint) to `output` (.mlpackage), atomically.

    `canonical` (the default) outputs canonical inverse depth and FOV, so workers can use EXIF focal
    lengths. `meters` reproduces the hub exports' I/O (`image`, `originalWidth` -> `depthMeters`).
    Each stage is logged as it starts and ends: at full size the whole takes minutes.

    `verify` is called with the saved package before it replaces `output` (`depthq models check`): if it
    raises, the package is kept aside as `<output>.failed-check` (a name no worker picks up) and a
    model already at `output` stays as it was.
    """
    import coremltools as ct
    import numpy as np
    import torch
    from transformers import DepthProForDepthEstimation

    from worker.backends.torch_backend import input_size_of

    if output.suffix != ".mlpackage":
        raise ModelUnavailableError(f"--output {output}: a Core ML mlprogram is saved as a folder ending in .mlpackage")
    report = ConvertReport(output=output, input_size=0)
    stage = _Stages(report)
    stage("loading the weights")
    folder = resolve_model_dir(model)
    net, info = DepthProForDepthEstimation.from_pretrained(folder, use_fov_model=True, output_loading_info=True)
    if any("fov_model" in k for k in info.get("missing_keys", [])):
        raise ModelUnavailableError(
            f"{folder} has no FOV head weights; the point of this conversion is the FOV output. "
            "Use a checkpoint with the FOV model (apple/DepthPro-hf has it)"
        )
    net = net.eval().float()
    size = report.input_size = input_size_of(net.config)

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

    # A photo-like input in [-1, 1], so the parity check below compares something other than zeros.
    example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    image = ct.ImageType(
        name=IMAGE_INPUT,
        shape=example.shape,
        # The reference's rescale to [-1, 1], done inside the model: x * 2/255 - 1.
        scale=2.0 / 255.0,
        bias=[-1.0, -1.0, -1.0],
        color_layout=ct.colorlayout.RGB,
    )
    # float32 outputs whatever the compute precision: float16 would hold a FOV near 60 deg to 0.03 deg.
    if contract == "canonical":
        wrapped: torch.nn.Module = DepthAndFov(net).eval()
        examples: tuple[torch.Tensor, ...] = (example,)
        inputs = [image]
        outputs = [ct.TensorType(name=DEPTH_OUTPUT, dtype=np.float32), ct.TensorType(name=FOV_OUTPUT, dtype=np.float32)]
    else:
        wrapped = Meters(net).eval()
        examples = (example, torch.full((1, 1, 1, 1), float(size)))
        inputs = [image, ct.TensorType(name=WIDTH_INPUT, shape=(1, 1, 1, 1))]
        outputs = [ct.TensorType(name=METERS_OUTPUT, dtype=np.float32)]
    stage(f"tracing at {size}x{size}")
    original = freeze_position_embeddings(wrapped, examples)
    with torch.no_grad(), sliced_patch_split():
        traced = torch.jit.trace(wrapped, examples, strict=False, check_trace=False)
    found = exploding_ops(traced.inlined_graph)
    if found:
        raise ModelUnavailableError(
            f"{folder}: the traced model holds ops Core ML cannot take at this size: "
            + "; ".join(f"{k} ({why})" for k, why in found.items())
            + ". This transformers version needs a replacement for them in worker/convert.py"
        )
    stage("checking the traced module against the original")
    report.parity = _parity(original, traced, examples)
    worst = max(report.parity.values())
    log.info("traced module vs original: max abs difference %s", {k: f"{v:.1e}" for k, v in report.parity.items()})
    if not worst <= PARITY_TOLERANCE:
        raise ModelUnavailableError(
            f"{folder}: the traced module differs from the original by {worst:.2e} (over {PARITY_TOLERANCE}); "
            "refusing to convert a model that is not DepthPro's"
        )
    del examples, original
    stage("converting: torch -> MIL, MIL passes")
    mlmodel = ct.convert(
        traced,
        inputs=inputs,
        outputs=outputs,
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.macOS13,
    )
    del traced
    if compression != "none":
        stage(f"compressing the weights ({compression})")
        mlmodel = _compress(mlmodel, compression)
    stage("saving")
    mlmodel.user_defined_metadata["depthq.source"] = str(model.path)
    mlmodel.user_defined_metadata["depthq.compression"] = compression
    mlmodel.user_defined_metadata["depthq.contract"] = contract
    # The weights' terms travel with the package: `depthq models list` shows them on every Mac.
    mlmodel.user_defined_metadata["depthq.licence"] = licence_of(folder)
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
        if verify is not None:
            # The check loads the checkpoint again and runs the package: free the conversion's copies first.
            del mlmodel, net, wrapped
            gc.collect()
            stage("checking the package against the checkpoint")
            try:
                verify(staging / output.name)
            except Exception:
                aside = output.with_name(output.name + ".failed-check")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(staging / output.name, aside)
                raise
        if output.exists():  # set the old one aside first: a worker never finds no model there
            os.replace(output, staging / "previous.mlpackage")
        os.replace(staging / output.name, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stage(None)
    return report


def _parity(want: Any, traced: Any, examples: tuple[Any, ...]) -> dict[str, float]:
    """Max abs difference per output between the traced module (sliced split) and the original's outputs."""
    import torch

    with torch.no_grad():
        got = traced(*examples)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    names = (DEPTH_OUTPUT, FOV_OUTPUT) if len(want) == 2 else (METERS_OUTPUT,)
    return {name: float((w - g).abs().max()) for name, w, g in zip(names, want, got, strict=True)}


class _Stages:
    """Logs each stage as it starts, and how long the one before it took, into the report."""

    def __init__(self, report: ConvertReport):
        self.report = report
        self.current: str | None = None
        self.started = time.perf_counter()

    def __call__(self, name: str | None) -> None:
        now = time.perf_counter()
        if self.current is not None:
            self.report.stages_s[self.current] = now - self.started
            log.info("%s: %.1f s", self.current, now - self.started)
        self.current, self.started = name, now
        if name is not None:
            log.info("%s ...", name)
