"""worker.coreml_spec: every spelling of the published DepthPro exports read from the spec, and a refusal
that shows the spec's whole I/O when it cannot be read as DepthPro.

The exports disagree: the hub cards say `image` + `originalWidth` -> `depthMeters`, the Swift sample's
pruned model takes `pixel_values` + `original_widths` (Float16) -> `depth_meters`, and the seed app's
NID model returns `normalized_inverse_depth` as a OneComponent16Half image. The models below are built
with those exact names, types and shapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from depthq.config import ModelConfig
from tests.coreml_models import (
    SIZE,
    extra_input_export,
    pruned_qlinear_export,
    seed_nid_export,
    unnamed_export,
)
from worker.backends.coreml_backend import METERS_WARNING, CoreMLBackend
from worker.coreml_spec import CoreMLContract, read_contract
from worker.errors import ModelUnavailableError


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("coreml-spellings")


def test_the_pruned_swift_sample_spelling_is_meters_with_a_float16_width_fed_float32(folder: Path) -> None:
    path = pruned_qlinear_export(folder / "DepthPro_pruned10_Qlinear.mlpackage")
    assert read_contract(path) == CoreMLContract(
        kind="meters",
        image_input="pixel_values",
        input_is_image=False,
        input_size=SIZE,
        depth_output="depth_meters",
        fov_output=None,
        width_input="original_widths",
    )
    backend = CoreMLBackend(ModelConfig(coreml_path=path))
    assert backend.warnings == (METERS_WARNING,)
    feed = backend.inputs_for(np.zeros((30, 70, 3), dtype=np.uint8))
    assert feed["pixel_values"].shape == (1, 3, SIZE, SIZE) and feed["pixel_values"].dtype == np.float32
    # Its width input is declared Float16, yet fed float32: coremltools would turn a float16 array into
    # a float32 copy only Core ML holds, which Core ML may free on its own queue without the GIL.
    assert feed["original_widths"].dtype == np.float32 and float(feed["original_widths"].item()) == 70.0


def test_the_seed_apps_image_output_is_normalized_and_refused(folder: Path) -> None:
    path = seed_nid_export(folder / "seed-nid.mlpackage")
    contract = read_contract(path)
    assert (contract.kind, contract.image_input, contract.depth_output) == (
        "normalized_inverse_depth",
        "pixel_values",
        "normalized_inverse_depth",
    )
    assert not contract.metric
    with pytest.raises(ModelUnavailableError, match="normalized inverse depth"):
        CoreMLBackend(ModelConfig(coreml_path=path))


def test_outputs_without_meaningful_names_are_read_from_their_shapes(folder: Path) -> None:
    contract = read_contract(unnamed_export(folder / "unnamed.mlpackage"))
    assert (contract.kind, contract.depth_output, contract.fov_output) == ("canonical", "var_1031", "var_1032")


@pytest.mark.parametrize(
    ("build", "why", "listed"),
    [
        (
            lambda p: unnamed_export(p, with_scalar=False),
            "no output is named as depth",
            ["image: image RGB [1x3x32x32]", "var_1031: multiarray float32 [1x32x32]"],
        ),
        (
            extra_input_export,
            "an input depthq cannot feed",
            ["mask: multiarray float32 [1x2]", "depthMeters: multiarray float32 [1x1x32x32]"],
        ),
    ],
)
def test_an_unreadable_spec_is_refused_with_its_whole_io(folder: Path, build, why: str, listed: list[str]) -> None:
    path = build(folder / f"refused-{why.split()[1]}.mlpackage")
    with pytest.raises(ModelUnavailableError) as raised:
        read_contract(path)
    message = str(raised.value)
    assert str(path) in message and why in message and "depthq models convert" in message
    for feature in listed:
        assert feature in message
