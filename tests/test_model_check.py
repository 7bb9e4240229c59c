"""`depthq models check` and the check that ends `depthq models convert`, at DepthPro's released geometry.

Four packages are converted from one checkpoint (released geometry, tiny widths, random weights made
plausible: positive inverse depth, a camera's FOV) and executed off macOS by depthq's MIL executor,
through the real backends' pre- and post-processing, against the torch model: float32, float16, and
float16 compressed by palettize8 and int8. At tiny widths coremltools compresses only the weights large
enough (the patch embeddings and the biggest convolutions), so the compressed packages' errors here
are smaller than at full size (bench convert measures those).

Each limit asserted below is the measured error with margin; the measurement is in its comment.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from depthq.cli import main

pytestmark = pytest.mark.skipif(sys.platform == "darwin", reason="off macOS the check runs in the MIL executor")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, released_geometry: Path) -> Path:
    """A folder with a config.yaml naming the checkpoint as model.path, for the CLI."""
    folder = tmp_path_factory.mktemp("model-check")
    (folder / "config.yaml").write_text(f"model:\n  path: {released_geometry}\n  device: cpu\n")
    return folder


def _cli(workspace: Path, *argv: str) -> tuple[int, str]:
    """Run `depthq` in-process, its output captured by hand (capsys is function-scoped; some runs are
    module fixtures) and unwrapped (rich wraps long lines)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([*argv, "--config", str(workspace / "config.yaml")])
    return rc, " ".join(out.getvalue().split())


def _check(workspace: Path, package: Path, *more: str) -> tuple[int, dict[str, Any]]:
    report = workspace / f"{package.name}.json"
    rc, _ = _cli(workspace, "models", "check", str(package), "--scenes", "1", "--json", str(report), *more)
    return rc, json.loads(report.read_text())


@pytest.fixture(scope="module")
def float32_conversion(workspace: Path) -> tuple[int, str, Path]:
    """`depthq models convert --precision float32`, with the short check that ends it."""
    package = workspace / "f32.mlpackage"
    rc, out = _cli(workspace, "models", "convert", "--precision", "float32", "--output", str(package))
    return rc, out, package


@dataclass(frozen=True)
class SetAside:
    rc: int
    out: str
    output: Path
    before: list[Path]  # what `output` held before the conversion


@pytest.fixture(scope="module")
def palettize8_set_aside(workspace: Path, float32_conversion: tuple[int, str, Path]) -> SetAside:
    """`depthq models convert --compression palettize8` over an existing package, its short check given
    limits of zero: no package meets them, so it fails as it would for a wrong conversion. (One
    conversion serves twice: the package set aside is then checked, with the real limits, below.)"""
    from worker import model_check

    output = workspace / "kept.mlpackage"
    shutil.copytree(float32_conversion[2], output)
    before = sorted(p.relative_to(output) for p in output.rglob("*"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(model_check.DEFAULT_LIMITS, "palettize8", (0.0, 0.0, 0.0))
        rc, out = _cli(workspace, "models", "convert", "--compression", "palettize8", "--output", str(output))
    return SetAside(rc, out, output, before)


def test_convert_ends_with_a_check_that_a_float32_package_passes(float32_conversion: tuple[int, str, Path]) -> None:
    rc, out, package = float32_conversion
    assert rc == 0, out
    assert package.is_dir()
    assert f"{package} (float32) against" in out  # named as it will be, not as it was staged
    assert "room" in out and "depthq's MIL executor" in out and " passed " in out


def test_a_float32_package_computes_what_torch_computes(
    workspace: Path, released_geometry: Path, float32_conversion: tuple[int, str, Path]
) -> None:
    rc, report = _check(workspace, float32_conversion[2])
    assert rc == 0, report["failures"]
    assert report["kind"] == "float32" and report["against"] == str(released_geometry)
    # Measured: median 1.2e-7, max 1.1e-5 relative; FOV equal to 1e-5 degrees.
    assert report["max"] < 1e-4
    assert report["worst_fov_error_deg"] < 1e-3
    item = report["items"][0]
    assert item["name"] == "room" and (item["width"], item["height"]) == (1536, 1536)
    assert 30 < item["fov_torch"] < 120 and not item["fixed_fov"]  # a camera's FOV: the depth used it


def test_a_failed_short_check_sets_the_new_package_aside_and_keeps_the_old_one(
    workspace: Path, palettize8_set_aside: SetAside
) -> None:
    made = palettize8_set_aside
    assert made.rc == 1
    assert "FAILED" in made.out
    assert sorted(p.relative_to(made.output) for p in made.output.rglob("*")) == made.before  # untouched
    aside = made.output.with_name(made.output.name + ".failed-check")
    assert (aside / "Manifest.json").is_file()
    assert not list(workspace.glob(".kept.mlpackage.*"))  # no staging folder left


@pytest.mark.parametrize(
    ("kind", "decoder", "median", "p95", "fov"),
    [
        # Measured: median 2.9e-4, p95 8.7e-4, FOV 0.005 deg (float16 holds 64 deg to 0.03 deg).
        ("float16", None, 2e-3, 5e-3, 0.1),
        # Measured: median 1.5e-3, p95 4.7e-3, FOV 0.07 deg.
        ("palettize8", "constexpr_lut_to_dense", 1e-2, 3e-2, 0.5),
        # Measured: median 1.5e-3, p95 6.0e-3, FOV 0.03 deg.
        ("int8", "constexpr_affine_dequantize", 1e-2, 3e-2, 0.5),
    ],
)
def test_float16_and_compressed_packages_stay_within_their_measured_error(
    workspace: Path,
    released_geometry: Path,
    released_float16: Any,
    palettize8_set_aside: SetAside,
    kind: str,
    decoder: str | None,
    median: float,
    p95: float,
    fov: float,
) -> None:
    from depthq.config import ModelConfig
    from worker.convert import convert
    from worker.mil_executor import ProgramExecutor

    if kind == "float16":  # the session's default conversion
        package = released_float16.output
    elif kind == "palettize8":  # the conversion whose zero-limit check set it aside
        package = workspace / "p8.mlpackage"
        shutil.copytree(palettize8_set_aside.output.with_name("kept.mlpackage.failed-check"), package)
    else:
        package = workspace / f"{kind}.mlpackage"
        convert(ModelConfig(path=str(released_geometry)), package, compression=kind)  # type: ignore[arg-type]
    if decoder is not None:  # the compressed weights are decoded by the executor, not left out
        assert ProgramExecutor(package).op_types()[decoder] > 0
    rc, report = _check(workspace, package)
    assert rc == 0, report["failures"]
    assert report["kind"] == kind
    assert report["median"] < median and report["p95"] < p95
    assert report["worst_fov_error_deg"] < fov
    assert report["median"] > 1e-6  # float16 shows: the executor did not run these in float32


def test_a_package_whose_resizes_lost_their_corner_alignment_fails_the_check(
    workspace: Path, float32_conversion: tuple[int, str, Path]
) -> None:
    from tests.coreml_models import flip_resize_corners

    broken = flip_resize_corners(float32_conversion[2], workspace / "broken.mlpackage")
    rc, report = _check(workspace, broken)
    assert rc == 1
    assert any("median depth error" in failure for failure in report["failures"])
    # Measured: median 1.6e-2, p95 6.7e-2, FOV off by 0.22 deg, against a median limit of 1e-4.
    assert report["median"] > 100 * report["limits"]["median"]


@pytest.mark.parametrize(
    ("flags", "changed"),
    [
        ([], {}),
        (["--max-median", "0.25"], {"median": 0.25}),
        (["--max-p95", "0.5"], {"p95": 0.5}),
        (["--max-fov-error", "2"], {"fov_deg": 2.0}),
        (["--max-median", "0", "--max-p95", "0", "--max-fov-error", "0"], {"median": 0, "p95": 0, "fov_deg": 0}),
    ],
)
def test_each_max_flag_replaces_its_own_limit_for_every_kind(flags: list[str], changed: dict[str, float]) -> None:
    """The flags reach the limits the check judges by (a limit of 0 included); the others stay the kind's."""
    from depthq.cli import build_parser
    from depthq.model_commands import _limits
    from worker.model_check import DEFAULT_LIMITS, Limits

    args = build_parser().parse_args(["models", "check", "some.mlpackage", *flags])
    for kind in DEFAULT_LIMITS:
        assert _limits(args, kind) == replace(Limits.for_kind(kind), **changed), kind


def test_a_package_that_names_no_checkpoint_needs_against(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.coreml_models import older_export

    package = older_export(workspace / "older.mlpackage")
    rc = main(["models", "check", str(package), "--config", str(workspace / "config.yaml")])
    assert rc == 2
    assert "--against" in capsys.readouterr().err


def test_photos_of_another_size_are_judged_on_the_pixels_the_package_is_given(
    workspace: Path, float32_conversion: tuple[int, str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from worker.model_check import scene

    photos = workspace / "photos"
    photos.mkdir()
    Image.fromarray(scene("street", 1536)).resize((1200, 900)).save(photos / "street.jpg", quality=92)
    (photos / "notes.txt").write_text("not a photo")
    rc, report = _check(workspace, float32_conversion[2], "--photos", str(photos))
    assert rc == 0, report["failures"]
    (item,) = report["items"]
    assert (item["name"], item["width"], item["height"]) == ("street.jpg", 1200, 900)
    # Measured: 7.5e-8 on the same 8-bit pixels; 2.3e-3 against torch given the photo's own floats.
    assert item["median"] < 1e-5
    assert item["median_vs_torch_worker"] > 100 * item["median"]
    assert "skipping" in capsys.readouterr().err  # the text file, named, and the check went on
