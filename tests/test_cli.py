from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from redis import Redis

from depthq.cli import main
from depthq.config import Config
from testkit.photos import write_jpeg


@pytest.mark.parametrize("entry", [["depthq", "status"], ["producer"], ["worker"]])
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, entry: list[str]) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("worker:\n  backend: tensorflow\n")
    result = subprocess.run(
        [sys.executable, "-m", *entry, "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "worker.backend" in result.stderr and "'torch'" in result.stderr


def test_no_redis_configured_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inbox").mkdir()
    monkeypatch.delenv("DEPTHQ_REDIS_URL", raising=False)
    assert main(["enqueue", "inbox"]) == 2
    err = capsys.readouterr().err
    assert "redis.url" in err and "DEPTHQ_REDIS_URL" in err and "depthq up" in err


def test_enqueue_folder(
    make_config: Callable[..., Config],
    redis_client: Redis,
    redis_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = make_config()
    inbox = config.producer.watch
    write_jpeg(inbox / "a.jpg")
    write_jpeg(inbox / "x" / "b.jpg", seed=1)
    (inbox / "c.txt").write_text("skip me")
    args = ["enqueue", str(inbox), "--watch", str(inbox), "--redis-url", redis_url]
    assert main(args) == 0
    assert "2 file(s): 2 enqueued" in capsys.readouterr().out
    assert main(args) == 0
    assert "2 duplicate" in capsys.readouterr().out
    outside = write_jpeg(tmp_path / "elsewhere.jpg")
    assert main(["enqueue", str(outside), "--watch", str(inbox), "--redis-url", redis_url]) == 1
    # rich wraps long lines at the terminal's width.
    assert "outside the watch root" in " ".join(capsys.readouterr().out.split())


def test_models_download_from_a_local_copy_then_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.coreml_models import meters_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "usb" / "DepthPro-CoreML"
    repo.mkdir(parents=True)
    meters_model(repo / "depthpro_pruned_quantized.mlpackage")
    assert main(["models", "download", "DepthProMetersPrunedQuantized", "--from", str(repo)]) == 0
    assert (tmp_path / "models" / "DepthProMetersPrunedQuantized.mlpackage" / "Manifest.json").is_file()
    assert main(["models", "download", "DepthProMetersPrunedQuantized"]) == 0  # present: no network needed
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    listing = " ".join(capsys.readouterr().out.split())
    assert "meters, no FOV" in listing and "depthMeters" in listing
    assert "licence" in listing and "see the model card of" in listing
    assert main(["models", "download", "DepthPro"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS")
def test_coreml_worker_off_macos_exits_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str
) -> None:
    from tests.coreml_models import meters_model

    monkeypatch.chdir(tmp_path)
    meters_model(tmp_path / "models" / "DepthPro.mlpackage")
    assert main(["work", "--backend", "coreml", "--redis-url", redis_url]) == 2
    assert "coreml needs macOS" in capsys.readouterr().err


def test_redis_unreachable_at_start_exits_75_for_a_retry(capsys: pytest.CaptureFixture[str]) -> None:
    """Unlike a config error (2, final), a Redis that does not answer may come back: service managers retry."""
    from depthq.redis_server import free_port

    assert main(["status", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"]) == 75
    assert "redis.url: cannot reach" in capsys.readouterr().err


def test_work_can_end_a_final_error_with_the_code_launchd_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["work", "--redis-url", redis_url, "--model", str(tmp_path / "none"), "--final-exit-code", "0"]
    monkeypatch.setenv("DEPTHQ_MODEL_OFFLINE", "true")
    assert main(args) == 0
    assert "model.path" in capsys.readouterr().err


def test_enqueue_refuses_a_named_file_the_watcher_would_pass_by(
    make_config: Callable[..., Config], redis_client: Redis, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config()
    inbox = config.producer.watch
    (inbox / "notes.txt").write_text("not a photo")
    hidden = write_jpeg(inbox / ".hidden.jpg")
    photo = write_jpeg(inbox / "a.jpg")
    args = [
        "enqueue",
        str(inbox / "notes.txt"),
        str(hidden),
        str(photo),
        "--watch",
        str(inbox),
        "--redis-url",
        redis_url,
    ]
    assert main(args) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "notes.txt: extension .txt, not in producer.extensions" in out
    assert "'.hidden.jpg' matches producer.ignore pattern '.*'" in out
    assert "1 file(s): 1 enqueued, 2 refused" in out
    assert redis_client.llen(f"rq:queue:{config.queue.name}") == 1


def test_model_flag_is_on_up_and_explained_wherever_it_appears() -> None:
    from depthq.cli import _overrides, build_parser

    parser = build_parser()
    args = parser.parse_args(["up", "--model", "/srv/models/DepthPro-hf"])
    assert _overrides(args)["model"] == {"path": "/srv/models/DepthPro-hf"}
    helps = []
    for name, argv in (("up", ["up"]), ("work", ["work"]), ("convert", ["models", "convert"])):
        sub = parser
        for word in argv:
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
        (flag,) = [a for a in sub._actions if "--model" in a.option_strings]
        helps.append((name, flag.help))
    assert [name for name, _ in helps] == ["up", "work", "convert"]
    assert all(help_ and "model.path" in help_ for _, help_ in helps), helps
