from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from depthq.config import ModelConfig
from testkit.tiny_model import TINY_INPUT_SIZE, build_tiny_model
from worker.backends.torch_backend import TorchBackend, input_size_of
from worker.errors import ModelUnavailableError
from worker.models import local_dir_for, resolve_model_dir


def test_local_folder_is_used_as_is(tiny_model: Path) -> None:
    assert resolve_model_dir(ModelConfig(path=str(tiny_model))) == tiny_model


def test_hub_id_already_downloaded_needs_no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target = local_dir_for("apple/DepthPro-hf", tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert resolve_model_dir(ModelConfig(path="apple/DepthPro-hf", cache_dir=tmp_path)) == target


@pytest.mark.parametrize("offline_setting", [True, False])
def test_offline_without_a_copy_says_how_to_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_setting: bool
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no machine here reaches the hub; make that explicit
    cfg = ModelConfig(path="apple/DepthPro-hf", cache_dir=tmp_path, offline=offline_setting)
    with pytest.raises(ModelUnavailableError) as err:
        resolve_model_dir(cfg)
    msg = str(err.value)
    assert f"hf download apple/DepthPro-hf --local-dir {tmp_path / 'apple__DepthPro-hf'}" in msg
    # What is missing and why, short, then the three ways to point at a copy, flag first.
    why = "model.offline is on" if offline_setting else "HF_HUB_OFFLINE is set"
    assert msg.startswith(f"model.path: apple/DepthPro-hf is not in {tmp_path / 'apple__DepthPro-hf'} ({why}")
    assert msg.index("`depthq up --model DIR`") < msg.index("DEPTHQ_MODEL_PATH=DIR") < msg.index("hf download")
    assert "internet connection" not in msg and "HF_HUB_OFFLINE=0" not in msg


def test_nonsense_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="neither a local folder nor a hub id"):
        resolve_model_dir(ModelConfig(path=str(tmp_path / "missing"), cache_dir=tmp_path))


def test_torch_backend_reads_input_size_and_fov_from_the_model(tiny_model: Path) -> None:
    backend = TorchBackend(ModelConfig(path=str(tiny_model), device="cpu"))
    backend.load()
    assert backend.input_size == TINY_INPUT_SIZE == input_size_of(backend._model.config)
    assert backend.device == "cpu"
    pred = backend.predict(np.zeros((30, 50, 3), np.uint8))
    assert pred.inverse_depth.shape == (TINY_INPUT_SIZE, TINY_INPUT_SIZE)
    assert pred.inverse_depth.dtype == np.float32
    np.testing.assert_allclose(pred.inverse_depth, 0.25, rtol=1e-6)
    assert pred.fov_deg == pytest.approx(60.0)


def test_checkpoint_without_fov_head_gives_no_fov(tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path / "nofov", with_fov=False)
    backend = TorchBackend(ModelConfig(path=str(folder), device="cpu"))
    backend.load()
    assert backend.predict(np.zeros((8, 8, 3), np.uint8)).fov_deg is None


def test_real_depthpro_config_gives_1536() -> None:
    from transformers import DepthProConfig

    assert input_size_of(DepthProConfig()) == 1536


def test_the_licence_is_read_from_the_checkpoints_model_card(tmp_path: Path) -> None:
    from worker.models import licence_of

    (tmp_path / "README.md").write_text("---\nlibrary_name: transformers\nlicense: apple-amlr\n---\n# DepthPro\n")
    assert licence_of(tmp_path) == "apple-amlr"
    (tmp_path / "README.md").write_text("# no front matter\nlicense: ignored outside it\n")
    assert licence_of(tmp_path).startswith("not stated")
