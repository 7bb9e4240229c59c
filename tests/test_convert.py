"""worker/convert.py at DepthPro's released geometry: 1536 input, 384-px patches, 16-px ViT patches.

Tiny *widths* keep it to seconds, but the geometry is the real one, so whatever grows with the input
(the patch split that once lowered to a 782 GB weight) grows here too and fails in CI, not on a Mac.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers.models.depth_pro import modeling_depth_pro

from depthq.config import ModelConfig
from testkit.tiny_model import RELEASED_INPUT_SIZE, released_geometry_config
from worker.convert import DEPTH_OUTPUT, FOV_OUTPUT, PARITY_TOLERANCE, ConvertReport, exploding_ops
from worker.convert import split_patches as sliced_split
from worker.coreml_spec import feature_info, read_contract, read_spec
from worker.preprocess import model_input

SIDE = RELEASED_INPUT_SIZE


@pytest.fixture(scope="module")
def weights(released_geometry: Path) -> Path:
    return released_geometry


@pytest.fixture(scope="module")
def converted(released_float16: ConvertReport) -> ConvertReport:
    return released_float16


def test_the_released_geometry_is_what_the_model_asks_for() -> None:
    from worker.backends.torch_backend import input_size_of

    config = released_geometry_config()
    assert input_size_of(config) == SIDE
    assert config.image_model_config.patch_size == 16 and config.image_model_config.image_size == 384


@pytest.mark.parametrize(("ratio", "overlap"), [(0.25, 0.0), (0.5, 0.5), (1.0, 0.25)])
def test_the_sliced_split_gives_the_same_patches_as_unfold(ratio: float, overlap: float) -> None:
    side = int(SIDE * ratio)
    pixels = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(side))
    want = modeling_depth_pro.split_to_patches(pixels, patch_size=384, overlap_ratio=overlap)
    got = sliced_split(pixels, patch_size=384, overlap_ratio=overlap)
    assert torch.equal(got, want)
    # 1 + 3x3 + 5x5 patches per photo at the released overlaps, as ml-depth-pro's split() makes them.
    assert got.shape[0] == 2 * {384: 1, 768: 9, 1536: 25}[side]


def test_a_trace_with_unfold_is_caught_before_converting() -> None:
    """The check the converter runs on its trace: the original split shows up as im2col, named with why."""

    class Split(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return modeling_depth_pro.split_to_patches(x, patch_size=384, overlap_ratio=0.25)

    with torch.no_grad():
        traced = torch.jit.trace(Split(), torch.zeros(1, 3, SIDE, SIDE))
    assert set(exploding_ops(traced.inlined_graph)) == {"aten::im2col"}
    assert "one-hot" in exploding_ops(traced.inlined_graph)["aten::im2col"]


def _first_ops(package: Path, count: int) -> list[tuple[str, Any]]:
    """(op type, constant operand) of the program's first ops: the ImageType's scale and bias live there."""
    spec = read_spec(package)
    function = spec.mlProgram.functions["main"]
    block = function.block_specializations[function.opset]
    consts = {}
    ops = []
    for op in block.operations:
        if op.type == "const":
            tensor = op.attributes["val"].immediateValue.tensor
            consts[op.outputs[0].name] = np.array(tensor.floats.values, dtype=np.float32)
            continue
        y = op.inputs["y"].arguments[0].name if "y" in op.inputs else None
        ops.append((op.type, consts.get(y)))
        if len(ops) == count:
            break
    return ops


def test_the_released_geometry_converts_with_the_expected_spec(converted: ConvertReport) -> None:
    package = converted.output
    assert converted.input_size == SIDE
    assert set(converted.parity) == {DEPTH_OUTPUT, FOV_OUTPUT}
    assert max(converted.parity.values()) <= PARITY_TOLERANCE
    assert list(converted.stages_s) == [
        "loading the weights",
        f"tracing at {SIDE}x{SIDE}",
        "checking the traced module against the original",
        "converting: torch -> MIL, MIL passes",
        "saving",
    ]

    spec = read_spec(package)
    inputs = [str(feature_info(f)) for f in spec.description.input]
    outputs = [str(feature_info(f)) for f in spec.description.output]
    assert inputs == [f"image: image RGB [1x3x{SIDE}x{SIDE}]"]
    assert outputs == [
        f"canonical_inverse_depth: multiarray float32 [1x{SIDE}x{SIDE}]",
        "fov_deg: multiarray float32 [1]",
    ]
    contract = read_contract(package)
    assert (contract.kind, contract.input_size, contract.fov_output) == ("canonical", SIDE, "fov_deg")
    assert contract.metadata["depthq.licence"] == "apple-amlr"  # the checkpoint's terms travel with it

    # The program starts with the ImageType's x * scale + bias; it must be the torch path's preprocessing.
    (mul, scale), (add, bias) = _first_ops(package, 2)
    assert (mul, add) == ("mul", "add")
    rgb = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    in_core_ml = rgb.astype(np.float32).transpose(2, 0, 1) * scale.reshape(-1, 1, 1) + bias.reshape(-1, 1, 1)
    np.testing.assert_allclose(in_core_ml, model_input(rgb, SIDE), atol=1e-6)

    # Nothing grew with the input: the weights are the tiny widths' (about 88 k parameters).
    weights = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
    assert weights < 2_000_000, f"{package} is {weights} bytes; an op's lowering grew with the input"


# --- on a Mac: what Core ML predicts from it ----------------------------------------------------------------


@pytest.mark.macos
def test_released_geometry_predicts_like_torch_on_macos(
    converted: ConvertReport, weights: Path, tmp_path: Path
) -> None:
    from worker.backends.coreml_backend import CoreMLBackend
    from worker.backends.torch_backend import TorchBackend

    rgb = np.random.default_rng(4).integers(0, 255, (2268, 3024, 3), dtype=np.uint8)
    torch_backend = TorchBackend(ModelConfig(path=str(weights), device="cpu"))
    torch_backend.load()
    core_ml = CoreMLBackend(ModelConfig(coreml_path=converted.output, cache_dir=tmp_path, compute_units="cpu_only"))
    core_ml.load()
    expected, got = torch_backend.predict(rgb), core_ml.predict(rgb)
    assert got.inverse_depth.shape == expected.inverse_depth.shape == (SIDE, SIDE)
    assert got.fov_deg is not None and got.fov_deg == pytest.approx(expected.fov_deg, rel=1e-2)
    np.testing.assert_allclose(got.inverse_depth, expected.inverse_depth, rtol=1e-2, atol=1e-3)  # float16


@pytest.mark.macos
def test_released_geometry_second_load_reuses_the_compiled_model_on_macos(
    converted: ConvertReport, tmp_path: Path
) -> None:
    from worker.backends.coreml_backend import CoreMLBackend

    config = ModelConfig(coreml_path=converted.output, cache_dir=tmp_path, compute_units="cpu_only")
    CoreMLBackend(config).load()
    (compiled,) = (tmp_path / ".compiled").glob("*.mlmodelc")
    stamp = compiled.stat().st_mtime_ns
    again = CoreMLBackend(config)
    again.load()
    assert compiled.stat().st_mtime_ns == stamp
    assert type(again._model).__name__ == "CompiledMLModel"
