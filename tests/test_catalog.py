"""The Core ML model catalog: download (from a local copy of a hub repo, or a faked hub) and listing.

No test reaches the network: `huggingface_hub.snapshot_download` is replaced for every test, by a
function that fails the test unless the test installs a fake hub of its own. The packages are real
(tiny, built by coremltools), so listing reads real specs.
"""

from __future__ import annotations

import fnmatch
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest

from tests.coreml_models import meters_model, normalized_model
from worker.catalog import (
    CATALOG,
    STAGING_PREFIX,
    download,
    entry_for_folder,
    format_size,
    get_entry,
    known_names,
    list_models,
)
from worker.errors import ModelUnavailableError

SIZE = 8
SEED_REPO = "KeighBee/DepthPro-CoreML"
METERS_SEED = "depthpro_pruned_quantized.mlpackage"
NID_SEED = "depthpro_pruned_quantized_inverse_depth_normalized.mlpackage"


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny meters export and one normalized-inverse-depth export, built once."""
    folder = tmp_path_factory.mktemp("packages")
    return {
        "meters": meters_model(folder / "meters.mlpackage", size=SIZE),
        "nid": normalized_model(folder / "nid.mlpackage", size=SIZE),
    }


@pytest.fixture
def seed_repo(tmp_path: Path, packages: dict[str, Path]) -> Path:
    """A folder laid out like KeighBee/DepthPro-CoreML was when the sample app's README was written."""
    repo = tmp_path / "DepthPro-CoreML"
    repo.mkdir()
    shutil.copytree(packages["meters"], repo / METERS_SEED)
    shutil.copytree(packages["nid"], repo / NID_SEED)
    (repo / "README.md").write_text("# not a model\n")
    (repo / ".gitattributes").write_text("*.bin filter=lfs\n")
    return repo


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any hub call a test did not ask for is a failure, not a silent download."""

    def refuse(*args: Any, **kwargs: Any) -> str:
        pytest.fail(f"unexpected hub call: snapshot_download({args}, {kwargs})")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _no_staging(models: Path) -> bool:
    return not any(p.name.startswith(STAGING_PREFIX) for p in models.iterdir())


# --- the catalog itself ----------------------------------------------------------------------------------


def test_catalog_names_folders_and_patterns_are_consistent() -> None:
    names = known_names()
    assert len(names) == len(set(names))
    for entry in CATALOG:
        assert entry.local_name == f"{entry.name}.mlpackage"
        assert entry.sources, entry.name
        assert entry.kind in ("meters", "normalized_inverse_depth")
        for source in entry.sources:
            assert source.folder.endswith(".mlpackage")
            inside = [f"{source.folder}/Manifest.json", f"{source.folder}/Data/com.apple.CoreML/weights/weight.bin"]
            assert list(huggingface_hub.utils.filter_repo_objects(inside, allow_patterns=source.allow_patterns))
            # A source never drags in a sibling package from the same repo (DepthPro vs DepthProPruned...).
            others = {s.folder for e in CATALOG for s in e.sources} - {source.folder}
            stray = [f"{o}/Manifest.json" for o in others]
            assert not list(huggingface_hub.utils.filter_repo_objects(stray, allow_patterns=source.allow_patterns))


def test_only_meters_models_are_metric() -> None:
    metric = {e.name for e in CATALOG if e.metric}
    assert metric == {"DepthPro", "DepthProPruned10QuantizedLinear", "DepthProMetersPrunedQuantized"}
    assert get_entry("DepthProNIDPrunedQuantized").kind == "normalized_inverse_depth"


def test_sample_app_names_try_the_seed_repo_first_then_the_live_ones() -> None:
    meters = get_entry("DepthProMetersPrunedQuantized")
    assert (meters.sources[0].repo_id, meters.sources[0].folder) == (SEED_REPO, METERS_SEED)
    assert [s.folder for s in meters.sources[1:]] == ["DepthProPruned10QuantizedLinear.mlpackage"] * 2
    nid = get_entry("DepthProNIDPrunedQuantized")
    assert (nid.sources[0].repo_id, nid.sources[0].folder) == (SEED_REPO, NID_SEED)


def test_names_forgive_case_and_a_pasted_folder_name() -> None:
    assert get_entry("depthpro").name == "DepthPro"
    assert get_entry("DepthProPruned10QuantizedLinear.mlpackage/").name == "DepthProPruned10QuantizedLinear"


def test_unknown_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError) as err:
        download("DepthProTurbo", tmp_path / "models", progress=False)
    msg = str(err.value)
    assert "'DepthProTurbo'" in msg
    assert all(name in msg for name in known_names())
    assert not (tmp_path / "models").exists()


def test_hand_copied_repo_folder_is_still_recognised() -> None:
    assert entry_for_folder("DepthProMetersPrunedQuantized.mlpackage").name == "DepthProMetersPrunedQuantized"
    assert entry_for_folder("DepthProNormalizedInverseDepth.mlpackage").name == "DepthProNormalizedInverseDepth"
    assert entry_for_folder("Mine.mlpackage") is None


# --- download from a local copy of a repo ------------------------------------------------------------------


def test_from_dir_copies_only_the_package_under_our_name(
    tmp_path: Path, seed_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local copy needs no network, offline or not
    models = tmp_path / "models"
    got = download("DepthProMetersPrunedQuantized", models, from_dir=seed_repo, progress=True)
    assert got == models / "DepthProMetersPrunedQuantized.mlpackage"
    assert _files(got) == _files(seed_repo / METERS_SEED)
    assert sorted(p.name for p in models.iterdir()) == ["DepthProMetersPrunedQuantized.mlpackage"]  # no README
    # This tiny model's weights folder is empty; like git and the hub, the copy drops it, so it is re-made.
    assert (got / "Data" / "com.apple.CoreML" / "weights").is_dir()


def test_second_call_returns_the_model_without_its_source(tmp_path: Path, seed_repo: Path) -> None:
    models = tmp_path / "models"
    first = download("DepthProNIDPrunedQuantized", models, from_dir=seed_repo, progress=False)
    shutil.rmtree(seed_repo)
    again = download("DepthProNIDPrunedQuantized", models, from_dir=seed_repo, offline=True, progress=False)
    assert again == first
    # Nor does it touch the hub (the autouse fixture fails on any call).
    assert download("DepthProNIDPrunedQuantized", models, progress=False) == first


def test_from_dir_also_takes_a_copied_models_folder(tmp_path: Path, seed_repo: Path) -> None:
    other_host = tmp_path / "other" / "models"
    download("DepthProMetersPrunedQuantized", other_host, from_dir=seed_repo, progress=False)
    got = download("DepthProMetersPrunedQuantized", tmp_path / "models", from_dir=other_host, progress=False)
    assert (got / "Manifest.json").is_file()


def test_from_dir_without_the_model_names_every_folder_looked_for(tmp_path: Path, seed_repo: Path) -> None:
    models = tmp_path / "models"
    with pytest.raises(ModelUnavailableError) as err:
        download("DepthPro", models, from_dir=seed_repo, progress=False)
    msg = str(err.value)
    assert str(seed_repo / "DepthPro.mlpackage") in msg
    assert str(seed_repo / "DepthPro.mlpackage") + ": not there" in msg
    assert "depthq models download DepthPro" in msg
    assert not (models / "DepthPro.mlpackage").exists()
    assert _no_staging(models)


def test_missing_from_dir_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match=r"--from .*nowhere: no such folder"):
        download("DepthPro", tmp_path / "models", from_dir=tmp_path / "nowhere", progress=False)


def test_git_lfs_pointers_are_refused_and_nothing_is_left(tmp_path: Path, seed_repo: Path) -> None:
    weights = seed_repo / METERS_SEED / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1100000000\n")
    models = tmp_path / "models"
    with pytest.raises(ModelUnavailableError, match="git lfs pull"):
        download("DepthProMetersPrunedQuantized", models, from_dir=seed_repo, progress=False)
    assert list(models.iterdir()) == []


def test_incomplete_copy_is_refused(tmp_path: Path, seed_repo: Path) -> None:
    (seed_repo / METERS_SEED / "Data" / "com.apple.CoreML" / "model.mlmodel").unlink()
    models = tmp_path / "models"
    with pytest.raises(ModelUnavailableError, match=r"model\.mlmodel is missing"):
        download("DepthProMetersPrunedQuantized", models, from_dir=seed_repo, progress=False)
    assert list(models.iterdir()) == []


def test_an_interrupted_copy_in_place_is_replaced(tmp_path: Path, seed_repo: Path) -> None:
    models = tmp_path / "models"
    half = models / "DepthProMetersPrunedQuantized.mlpackage"
    (half / "Data").mkdir(parents=True)
    (half / "Data" / "partial").write_bytes(b"x")
    got = download("DepthProMetersPrunedQuantized", models, from_dir=seed_repo, progress=False)
    assert _files(got) == _files(seed_repo / METERS_SEED)
    assert _no_staging(models)


# --- offline --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["argument", "HF_HUB_OFFLINE"])
def test_offline_with_nothing_here_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = tmp_path / "models"
    with pytest.raises(ModelUnavailableError) as err:
        download("DepthProPruned10QuantizedLinear", models, offline=how == "argument", progress=False)
    msg = str(err.value)
    assert "DepthProPruned10QuantizedLinear" in msg
    assert str(models / "DepthProPruned10QuantizedLinear.mlpackage") in msg
    assert "depthq models download DepthProPruned10QuantizedLinear" in msg
    assert "--from" in msg
    assert ("HF_HUB_OFFLINE" in msg) == (how == "HF_HUB_OFFLINE")
    assert not models.exists()


# --- download from the hub (faked) --------------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, Path | Exception]], list[dict[str, Any]]]:
    """Install a hub of local folders; returns the list the calls are recorded in, in order."""

    def install(repos: dict[str, Path | Exception]) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = []

        def snapshot_download(repo_id: str, *, allow_patterns: list[str], local_dir: Path, **kw: Any) -> str:
            calls.append({"repo_id": repo_id, "allow_patterns": allow_patterns, "local_dir": Path(local_dir), **kw})
            repo = repos[repo_id]
            if isinstance(repo, Exception):
                raise repo
            for rel in sorted(_files(repo)):
                if any(fnmatch.fnmatchcase(rel, p) for p in allow_patterns):
                    out = Path(local_dir) / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(repo / rel, out)
            return str(local_dir)

        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        return calls

    return install


def _repo(root: Path, packages: dict[str, Path], layout: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    (root / "README.md").write_text("readme\n")
    for folder, which in layout.items():
        shutil.copytree(packages[which], root / folder)
    return root


def test_hub_sources_are_tried_in_order_until_one_delivers(
    tmp_path: Path, packages: dict[str, Path], fake_hub: Callable[..., list[dict[str, Any]]]
) -> None:
    live = _repo(
        tmp_path / "kb",
        packages,
        {"DepthPro.mlpackage": "nid", "DepthProPruned10QuantizedLinear.mlpackage": "meters"},
    )
    calls = fake_hub(
        {
            SEED_REPO: _repo(tmp_path / "seed", packages, {}),  # empty now: matches nothing
            "coreml-projects/DepthPro-coreml-pruned-10-quantized-linear": OSError("connection refused"),
            "KeighBee/coreml-DepthPro": live,
        }
    )
    models = tmp_path / "models"
    got = download("DepthProMetersPrunedQuantized", models, progress=False)

    assert [c["repo_id"] for c in calls] == [
        SEED_REPO,
        "coreml-projects/DepthPro-coreml-pruned-10-quantized-linear",
        "KeighBee/coreml-DepthPro",
    ]
    assert calls[0]["allow_patterns"] == [f"{METERS_SEED}/*"]
    assert calls[2]["allow_patterns"] == ["DepthProPruned10QuantizedLinear.mlpackage/*"]
    for call in calls:  # staged inside models/, so the final move is one rename
        assert call["local_dir"].parent.parent == models
        assert call["local_dir"].parent.name.startswith(STAGING_PREFIX)
    assert got == models / "DepthProMetersPrunedQuantized.mlpackage"
    assert _files(got) == _files(live / "DepthProPruned10QuantizedLinear.mlpackage")
    assert sorted(p.name for p in models.iterdir()) == ["DepthProMetersPrunedQuantized.mlpackage"]


def test_hub_failure_everywhere_reports_each_source_and_cleans_up(
    tmp_path: Path, packages: dict[str, Path], fake_hub: Callable[..., list[dict[str, Any]]]
) -> None:
    entry = get_entry("DepthPro")
    calls = fake_hub({s.repo_id: OSError(f"{s.repo_id} unreachable") for s in entry.sources})
    models = tmp_path / "models"
    with pytest.raises(ModelUnavailableError) as err:
        download("DepthPro", models, progress=False)
    msg = str(err.value)
    assert [c["repo_id"] for c in calls] == [s.repo_id for s in entry.sources]
    for source in entry.sources:
        assert f"{source.repo_id}/DepthPro.mlpackage: OSError: {source.repo_id} unreachable" in msg
    assert "could not get Core ML model DepthPro" in msg
    assert list(models.iterdir()) == []


# --- listing -------------------------------------------------------------------------------------------------


def test_list_models_reads_io_from_the_specs(tmp_path: Path, seed_repo: Path) -> None:
    models = tmp_path / "models"
    download("DepthProMetersPrunedQuantized", models, from_dir=seed_repo, progress=False)
    download("DepthProNIDPrunedQuantized", models, from_dir=seed_repo, progress=False)
    shutil.copytree(seed_repo / METERS_SEED, models / "sub" / "Mine.mlpackage")
    (models / "Broken.mlpackage").mkdir()
    (models / "Compiled.mlmodelc").mkdir()
    (models / "Compiled.mlmodelc" / "coremldata.bin").write_bytes(b"\0" * 10)
    (models / ".compiled" / "x.mlmodelc").mkdir(parents=True)  # the backend's cache: hidden, not listed
    (models / "apple__DepthPro-hf").mkdir()  # the torch checkpoint folder: not Core ML

    infos = {i.name: i for i in list_models(models)}
    assert sorted(infos) == [
        "Broken",
        "Compiled",
        "DepthProMetersPrunedQuantized",
        "DepthProNIDPrunedQuantized",
        "Mine",
    ]

    meters = infos["DepthProMetersPrunedQuantized"]
    assert meters.format == "mlpackage"
    assert meters.entry is get_entry("DepthProMetersPrunedQuantized")
    assert meters.metric is True
    assert meters.io_error is None
    assert meters.size_bytes == sum(p.stat().st_size for p in meters.path.rglob("*") if p.is_file())
    assert [(f.name, f.type, f.shape) for f in meters.inputs] == [
        ("image", "image RGB", (1, 3, SIZE, SIZE)),
        ("originalWidth", "multiarray float32", (1, 1, 1, 1)),
    ]
    assert [(f.name, f.shape) for f in meters.outputs] == [("depthMeters", (1, 1, SIZE, SIZE))]
    assert str(meters.outputs[0]) == f"depthMeters: multiarray float32 [1x1x{SIZE}x{SIZE}]"

    nid = infos["DepthProNIDPrunedQuantized"]
    assert nid.metric is False
    assert [f.name for f in nid.outputs] == ["normalizedInverseDepth"]

    mine = infos["Mine"]
    assert mine.entry is None and mine.metric is None
    assert [f.name for f in mine.outputs] == ["depthMeters"]

    assert infos["Broken"].io_error.startswith("unreadable: ")
    assert infos["Broken"].inputs is None
    assert infos["Compiled"].format == "mlmodelc"
    assert infos["Compiled"].io_error.startswith("unknown: ")
    assert infos["Compiled"].size_bytes == 10


def test_list_models_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    assert list_models(tmp_path / "nothing") == []


@pytest.mark.parametrize(
    ("size", "shown"),
    [(0, "0 B"), (617, "617 B"), (745_000_000, "745 MB"), (1_100_000_000, "1.1 GB"), (1_901_556_288, "1.9 GB")],
)
def test_format_size_reads_like_the_hub(size: int, shown: str) -> None:
    assert format_size(size) == shown
