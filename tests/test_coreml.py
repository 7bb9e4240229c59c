"""The Core ML backend and converter. Contract, conversion and inputs are checked on any OS; prediction
needs macOS, so those tests are marked `macos` and skipped elsewhere (never faked)."""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from depthq.config import Config, ModelConfig, load_config
from testkit.tiny_model import TINY_INPUT_SIZE, build_tiny_model, expected_depth
from tests.coreml_models import SIZE, canonical_without_fov, meters_model, normalized_model, older_export
from worker.backends import choose_backend
from worker.backends.coreml_backend import (
    METERS_WARNING,
    NO_FOV_WARNING,
    CoreMLBackend,
    compiled_cache_path,
    find_coreml_model,
)
from worker.coreml_spec import read_contract
from worker.depth import metric_depth
from worker.errors import BackendUnavailableError, ModelUnavailableError
from worker.preprocess import model_input


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    from worker.convert import convert

    return convert(ModelConfig(path=str(tiny_model)), tmp_path_factory.mktemp("coreml") / "Tiny.mlpackage").output


@pytest.fixture(scope="module")
def converted_meters(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    from worker.convert import convert

    folder = tmp_path_factory.mktemp("coreml-meters")
    return convert(ModelConfig(path=str(tiny_model)), folder / "TinyMeters.mlpackage", contract="meters").output


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exports")
    return {
        "meters": meters_model(folder / "DepthPro.mlpackage"),
        "normalized": normalized_model(folder / "DepthProNormalizedInverseDepth.mlpackage"),
        "older": older_export(folder / "Old.mlpackage"),
        "no_fov": canonical_without_fov(folder / "NoFov.mlpackage"),
    }


def test_converted_model_outputs_canonical_inverse_depth_and_fov(converted: Path) -> None:
    c = read_contract(converted)
    assert c.kind == "canonical"
    assert (c.image_input, c.input_is_image, c.input_size) == ("image", True, TINY_INPUT_SIZE)
    assert (c.depth_output, c.fov_output, c.width_input) == ("canonical_inverse_depth", "fov_deg", None)


def test_meters_conversion_has_the_hub_exports_interface(converted_meters: Path) -> None:
    c = read_contract(converted_meters)
    assert (c.kind, c.image_input, c.input_is_image, c.input_size) == ("meters", "image", True, TINY_INPUT_SIZE)
    assert (c.depth_output, c.fov_output, c.width_input) == ("depthMeters", None, "originalWidth")


def test_converted_model_records_where_it_came_from(converted: Path, tiny_model: Path) -> None:
    import coremltools as ct

    meta = ct.models.MLModel(str(converted), skip_model_load=True).user_defined_metadata
    assert meta["depthq.source"] == str(tiny_model)
    assert meta["depthq.compression"] == "none"


def test_palettized_conversion_keeps_the_contract(tmp_path: Path, tiny_model: Path, converted: Path) -> None:
    from worker.convert import convert

    small = convert(ModelConfig(path=str(tiny_model)), tmp_path / "Tiny4.mlpackage", compression="palettize4").output
    assert read_contract(small) == read_contract(converted)
    size = sum(f.stat().st_size for f in small.rglob("*") if f.is_file())
    full = sum(f.stat().st_size for f in converted.rglob("*") if f.is_file())
    assert size < full


def test_checkpoint_without_fov_is_refused_for_conversion(tmp_path: Path) -> None:
    from worker.convert import convert

    nofov = build_tiny_model(tmp_path / "nofov", with_fov=False)
    with pytest.raises(ModelUnavailableError, match="no FOV head"):
        convert(ModelConfig(path=str(nofov)), tmp_path / "x.mlpackage")
    assert not (tmp_path / "x.mlpackage").exists()


def test_meters_export_contract_and_warning(exports: dict[str, Path]) -> None:
    backend = CoreMLBackend(ModelConfig(coreml_path=exports["meters"]))
    c = backend.contract
    assert (c.kind, c.image_input, c.input_is_image, c.input_size) == ("meters", "image", True, SIZE)
    assert (c.depth_output, c.fov_output, c.width_input) == ("depthMeters", None, "originalWidth")
    assert backend.warnings == (METERS_WARNING,)
    assert backend.model_name == "DepthPro"


def test_older_export_is_canonical_inverse_depth_and_fov(exports: dict[str, Path]) -> None:
    # ml-depth-pro's export scripts name DepthPro's raw outputs depth_meters and view_angle: the
    # "depth" is canonical inverse depth, still to be scaled with the FOV.
    backend = CoreMLBackend(ModelConfig(coreml_path=exports["older"]))
    c = backend.contract
    assert (c.kind, c.image_input, c.input_is_image) == ("canonical", "pixel_values", False)
    assert (c.depth_output, c.fov_output) == ("depth_meters", "view_angle")
    assert backend.warnings == ()
    pred = backend.prediction_from({"depth_meters": np.full((1, SIZE, SIZE), 0.25), "view_angle": np.array([60.0])})
    md = metric_depth(pred.inverse_depth, 4000, 3000, pred.fov_deg)
    np.testing.assert_allclose(md.depth, expected_depth(4000, 3000), rtol=1e-5)


def test_normalized_inverse_depth_is_refused_for_metric_output(exports: dict[str, Path]) -> None:
    assert read_contract(exports["normalized"]).kind == "normalized_inverse_depth"
    with pytest.raises(ModelUnavailableError, match=r"normalized inverse depth.*never meters"):
        CoreMLBackend(ModelConfig(coreml_path=exports["normalized"]))


def test_inputs_follow_the_contract(exports: dict[str, Path]) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)
    image_feed = CoreMLBackend(ModelConfig(coreml_path=exports["meters"])).inputs_for(rgb)
    assert isinstance(image_feed["image"], Image.Image) and image_feed["image"].size == (SIZE, SIZE)
    assert image_feed["originalWidth"].shape == (1, 1, 1, 1) and float(image_feed["originalWidth"][0, 0, 0, 0]) == 70
    array_feed = CoreMLBackend(ModelConfig(coreml_path=exports["older"])).inputs_for(rgb)
    np.testing.assert_array_equal(array_feed["pixel_values"], model_input(rgb, SIZE)[None])


def test_meters_output_is_used_as_given(exports: dict[str, Path]) -> None:
    backend = CoreMLBackend(ModelConfig(coreml_path=exports["meters"]))
    pred = backend.prediction_from({"depthMeters": np.full((1, 1, SIZE, SIZE), 2.5, np.float16)})
    assert pred.already_metric and pred.fov_deg is None
    md = metric_depth(pred.inverse_depth, 90, 60, pred.fov_deg, None, already_metric=pred.already_metric)
    np.testing.assert_allclose(md.depth, 2.5, rtol=1e-6)
    assert md.depth.shape == (60, 90)
    assert (md.focal_length_px, md.focal_length_source, md.fov_deg) == (None, None, None)
    with_exif = metric_depth(pred.inverse_depth, 90, 60, None, 26.0, already_metric=True)
    np.testing.assert_allclose(with_exif.depth, 2.5, rtol=1e-6)  # EXIF is reported, not applied twice
    assert with_exif.focal_length_source == "exif"


def test_canonical_output_gets_the_full_metric_math(converted: Path) -> None:
    backend = CoreMLBackend(ModelConfig(coreml_path=converted))
    cid = np.full((1, TINY_INPUT_SIZE, TINY_INPUT_SIZE), 0.25, np.float16)
    pred = backend.prediction_from({"canonical_inverse_depth": cid, "fov_deg": np.array([60.0], np.float16)})
    md = metric_depth(pred.inverse_depth, 80, 60, pred.fov_deg)
    np.testing.assert_allclose(md.depth, expected_depth(80, 60), rtol=1e-5)


def test_canonical_without_fov_is_usable_with_a_warning(exports: dict[str, Path]) -> None:
    backend = CoreMLBackend(ModelConfig(coreml_path=exports["no_fov"]))
    assert backend.contract.kind == "canonical" and backend.contract.fov_output is None
    assert backend.warnings == (NO_FOV_WARNING,)


def test_best_model_present_is_found(tmp_path: Path, exports: dict[str, Path], converted: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    cfg = ModelConfig(cache_dir=models)
    assert find_coreml_model(cfg) is None
    shutil.copytree(exports["normalized"], models / "A-NID.mlpackage")
    assert find_coreml_model(cfg) is None  # never picked for metric output
    shutil.copytree(exports["meters"], models / "B-meters.mlpackage")
    assert find_coreml_model(cfg) == models / "B-meters.mlpackage"
    shutil.copytree(converted, models / "C-converted.mlpackage")
    assert find_coreml_model(cfg) == models / "C-converted.mlpackage"  # FOV beats meters-only
    shutil.rmtree(models / "B-meters.mlpackage")
    shutil.copytree(exports["no_fov"], models / "A-canonical-no-fov.mlpackage")
    assert find_coreml_model(cfg) == models / "C-converted.mlpackage"  # never auto-picks a model without FOV


def _config(tmp_path: Path, **model: object) -> Config:
    return load_config(environ={}, overrides={"model": {"cache_dir": str(tmp_path), **model}})


def test_auto_backend(tmp_path: Path, exports: dict[str, Path]) -> None:
    cfg = _config(tmp_path)
    assert choose_backend(cfg, system="linux", machine="x86_64") == "torch"
    assert choose_backend(cfg, system="darwin", machine="arm64") == "torch"  # no Core ML model present
    with_model = _config(tmp_path, coreml_path=str(exports["meters"]))
    assert choose_backend(with_model, system="darwin", machine="arm64") == "coreml"
    assert choose_backend(with_model, system="darwin", machine="x86_64") == "torch"
    assert choose_backend(with_model, system="linux", machine="aarch64") == "torch"
    forced = load_config(environ={}, overrides={"worker": {"backend": "torch"}, "model": {"coreml_path": "x"}})
    assert choose_backend(forced, system="darwin", machine="arm64") == "torch"


def test_compiled_copy_survives_workers_compiling_at_once(tmp_path: Path) -> None:
    compiled_by_core_ml = tmp_path / "tmp-compiled.mlmodelc"
    (compiled_by_core_ml / "weights").mkdir(parents=True)
    (compiled_by_core_ml / "weights" / "weight.bin").write_bytes(b"w" * 100)
    target = tmp_path / ".compiled" / "M-abc.mlmodelc"
    stale = tmp_path / ".compiled" / ".staging-old"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))  # left by a crash long ago
    CoreMLBackend._keep_compiled(compiled_by_core_ml, target)
    CoreMLBackend._keep_compiled(compiled_by_core_ml, target)  # a second worker, finishing later
    assert (target / "weights" / "weight.bin").read_bytes() == b"w" * 100
    assert sorted(p.name for p in target.parent.iterdir()) == ["M-abc.mlmodelc"]


def test_compiled_cache_key_follows_the_package_content(tmp_path: Path, exports: dict[str, Path]) -> None:
    pkg = tmp_path / "M.mlpackage"
    shutil.copytree(exports["meters"], pkg)
    first = compiled_cache_path(pkg, tmp_path / ".compiled")
    assert first == compiled_cache_path(pkg, tmp_path / ".compiled")
    assert first.parent == tmp_path / ".compiled" and first.name.startswith("M-") and first.suffix == ".mlmodelc"
    manifest = pkg / "Manifest.json"
    manifest.write_text(manifest.read_text() + " ")
    assert compiled_cache_path(pkg, tmp_path / ".compiled") != first


def test_missing_model_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="depthq models convert"):
        CoreMLBackend(ModelConfig(cache_dir=tmp_path))
    with pytest.raises(ModelUnavailableError, match="compiled"):
        CoreMLBackend(ModelConfig(coreml_path=tmp_path / "x.mlmodelc"))


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the backend loads; see the macos tests")
def test_loading_for_prediction_off_macos_names_the_fix(converted: Path) -> None:
    backend = CoreMLBackend(ModelConfig(coreml_path=converted))
    with pytest.raises(BackendUnavailableError, match=r"worker\.backend: torch"):
        backend.load()


@pytest.mark.macos
def test_converted_model_predicts_like_torch_on_macos(converted: Path, tmp_path: Path) -> None:
    backend = CoreMLBackend(ModelConfig(coreml_path=converted, cache_dir=tmp_path, compute_units="cpu_only"))
    backend.load()
    rgb = np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    pred = backend.predict(rgb)
    assert pred.fov_deg == pytest.approx(60.0, rel=1e-2)
    md = metric_depth(pred.inverse_depth, 80, 60, pred.fov_deg)
    np.testing.assert_allclose(md.depth, expected_depth(80, 60), rtol=1e-2)  # float16 model
    assert list((tmp_path / ".compiled").glob("Tiny-*.mlmodelc"))


@pytest.mark.macos
def test_core_ml_sees_what_torch_sees_on_macos(tmp_path: Path) -> None:
    """Random weights, so preprocessing (ImageType scale/bias, channel order, resize) shows in the output."""
    from worker.backends.torch_backend import TorchBackend
    from worker.convert import convert

    weights = build_tiny_model(tmp_path / "random", constant_head=False)
    package = convert(ModelConfig(path=str(weights)), tmp_path / "Random.mlpackage", precision="float32").output
    rgb = np.random.default_rng(3).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    torch_backend = TorchBackend(ModelConfig(path=str(weights), device="cpu"))
    torch_backend.load()
    core_ml = CoreMLBackend(ModelConfig(coreml_path=package, cache_dir=tmp_path, compute_units="cpu_only"))
    core_ml.load()
    expected, got = torch_backend.predict(rgb), core_ml.predict(rgb)
    np.testing.assert_allclose(got.inverse_depth, expected.inverse_depth, rtol=1e-2, atol=1e-3)
    assert got.fov_deg == pytest.approx(expected.fov_deg, rel=1e-2)


@pytest.mark.macos
def test_second_load_uses_the_compiled_cache_on_macos(converted: Path, tmp_path: Path) -> None:
    cfg = ModelConfig(coreml_path=converted, cache_dir=tmp_path, compute_units="cpu_only")
    CoreMLBackend(cfg).load()
    (compiled,) = (tmp_path / ".compiled").glob("*.mlmodelc")
    stamp = compiled.stat().st_mtime_ns
    again = CoreMLBackend(cfg)
    again.load()
    assert compiled.stat().st_mtime_ns == stamp
    assert type(again._model).__name__ == "CompiledMLModel"


@pytest.mark.macos
def test_converted_meters_model_predicts_the_closed_form_on_macos(converted_meters: Path, tmp_path: Path) -> None:
    backend = CoreMLBackend(ModelConfig(coreml_path=converted_meters, cache_dir=tmp_path, compute_units="cpu_only"))
    backend.load()
    pred = backend.predict(np.random.default_rng(2).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    md = metric_depth(pred.inverse_depth, 80, 60, pred.fov_deg, already_metric=pred.already_metric)
    np.testing.assert_allclose(md.depth, expected_depth(80, 60), rtol=1e-2)  # width cancels out


@pytest.mark.macos
def test_meters_export_predicts_on_macos(exports: dict[str, Path], tmp_path: Path) -> None:
    backend = CoreMLBackend(ModelConfig(coreml_path=exports["meters"], cache_dir=tmp_path, compute_units="cpu_only"))
    backend.load()
    pred = backend.predict(np.full((20, 30, 3), 128, np.uint8))
    assert pred.already_metric and pred.inverse_depth.shape == (SIZE, SIZE)


# --- what a Mac would hit (issue 22): the feed's lifetime, load failures told apart, the compiled reload ----


class _Predictor:
    """Stands where Core ML's predictor sits (there is none off macOS): it records what it was handed
    and answers the meters contract, so the backend's own code around it runs for real."""

    def __init__(self) -> None:
        self.fed: list[weakref.ref[np.ndarray]] = []

    def predict(self, feed: dict[str, object]) -> dict[str, np.ndarray]:
        self.fed += [weakref.ref(v) for v in feed.values() if isinstance(v, np.ndarray)]
        return {"depthMeters": np.full((1, 1, SIZE, SIZE), 2.0, np.float16)}


def test_the_feed_outlives_its_prediction_until_the_next_one(exports: dict[str, Path]) -> None:
    """Core ML may release a numpy input later, on its own queue, without the GIL: the backend keeps
    the last feed referenced until the next prediction, and hands it float32, so coremltools makes
    no temporary copy that Core ML alone would hold."""
    backend = CoreMLBackend(ModelConfig(coreml_path=exports["meters"]))
    backend._model = predictor = _Predictor()
    backend.predict(np.full((20, 30, 3), 128, np.uint8))
    (width,) = predictor.fed
    gc.collect()
    assert width() is not None and width().dtype == np.float32 and width().flags.c_contiguous
    backend.predict(np.full((20, 40, 3), 128, np.uint8))
    gc.collect()
    assert width() is None  # released once the next feed replaced it
    assert float(predictor.fed[1]()[0, 0, 0, 0]) == 40.0
    array_feed = CoreMLBackend(ModelConfig(coreml_path=exports["older"])).inputs_for(np.zeros((8, 8, 3), np.uint8))
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in array_feed.values())


def test_load_failures_are_told_apart_and_never_read_none(tmp_path: Path) -> None:
    from worker.backends.coreml_backend import load_failure
    from worker.errors import BackendNotReadyError

    model, roomy = tmp_path / "DepthPro.mlpackage", 10**12
    passing = [
        'Error Domain=com.apple.CoreML Code=0 "Failed to connect to the compiler service"',
        "compile failed: No space left on device",
        "XPC connection interrupted",
        None,
    ]
    for reason in passing:
        error = load_failure(model, reason, roomy, 10**9)
        assert isinstance(error, BackendNotReadyError), reason
        assert str(model) in str(error) and not str(error).rstrip().endswith("None")
    final = load_failure(model, "Error reading protobuf spec. validator error: bad model", roomy, 10**9)
    assert isinstance(final, BackendUnavailableError) and "models download" in str(final)
    full = load_failure(model, "Error reading protobuf spec", 10**9, 10**9)  # 1 GB free for a 2 GB compile
    assert isinstance(full, BackendNotReadyError) and "free space there" in str(full)


def test_a_load_worth_retrying_exits_75_and_a_final_one_the_final_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`depthq work`'s exit codes, through its real entry point: a model that never loads ends with
    --final-exit-code (0 under launchd: no restart), one that may load later with 75 (restarted)."""
    from depthq import cli
    from worker import worker
    from worker.errors import BackendNotReadyError

    codes = []
    for error in (BackendNotReadyError("compiler service gone"), BackendUnavailableError("needs macOS")):

        def run(config: Config, burst: bool = False, error: Exception = error) -> int:
            raise error

        monkeypatch.setattr(worker, "run", run)
        codes.append(cli.cmd_work(load_config(environ={}), argparse.Namespace(burst=False, final_exit_code=0)))
    assert codes == [75, 0]


@pytest.mark.macos
def test_after_the_first_compile_the_worker_serves_the_kept_copy_on_macos(
    converted: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first compile's copy in $TMPDIR is deleted only by the MLModel's destructor: the backend
    reloads the kept copy and drops the MLModel, so that copy is gone at once."""
    caplog.set_level("INFO")
    backend = CoreMLBackend(ModelConfig(coreml_path=converted, cache_dir=tmp_path, compute_units="cpu_only"))
    backend.load()
    assert type(backend._model).__name__ == "CompiledMLModel"
    (line,) = [r.getMessage() for r in caplog.records if "the first compile's" in r.getMessage()]
    first_copy = Path(line.split("the first compile's ")[1].split(" is gone")[0])
    assert not first_copy.exists(), first_copy
    assert backend.predict(np.zeros((8, 8, 3), np.uint8)).inverse_depth.shape == (TINY_INPUT_SIZE, TINY_INPUT_SIZE)
