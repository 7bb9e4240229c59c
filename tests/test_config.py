from __future__ import annotations

from pathlib import Path

import pytest

from depthq.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_yaml_is_valid_and_matches_the_defaults() -> None:
    assert load_config(ROOT / "config.yaml", environ={}) == Config()


def test_every_key_in_config_yaml_has_a_comment() -> None:
    lines = (ROOT / "config.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  ") and ":" in line and not line.strip().startswith("#"):
            assert lines[i - 1].strip().startswith("#"), f"config.yaml key without a comment: {line.strip()}"


def test_env_overrides_file_and_flags_override_env(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("producer:\n  settle_ms: 100\n  watch: from-file\n")
    env = {"DEPTHQ_PRODUCER_SETTLE_MS": "250", "DEPTHQ_PRODUCER_WATCH": "from-env", "DEPTHQ_OUTPUT_FORMATS": "[tiff]"}
    cfg = load_config(cfg_file, overrides={"producer": {"watch": "from-flag"}}, environ=env)
    assert cfg.producer.settle_ms == 250
    assert cfg.producer.watch == Path("from-flag")
    assert cfg.output.formats == ["tiff"]


def test_redis_url_from_env() -> None:
    assert load_config(environ={"DEPTHQ_REDIS_URL": "redis://h:1/0"}).redis.url == "redis://h:1/0"


def test_bad_value_names_key_and_allowed_values(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model:\n  device: gpu\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, environ={})
    msg = str(err.value)
    assert "model.device" in msg
    for allowed in ("auto", "cuda", "mps", "cpu"):
        assert allowed in msg
    assert "'gpu'" in msg


def test_unknown_key_is_refused_by_name(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("producer:\n  setle_ms: 5\n")
    with pytest.raises(ConfigError, match=r"producer\.setle_ms: unknown key"):
        load_config(cfg_file, environ={})


def test_unknown_env_section_is_refused() -> None:
    with pytest.raises(ConfigError, match="DEPTHQ_WATCHER_PATH"):
        load_config(environ={"DEPTHQ_WATCHER_PATH": "x"})


def test_negative_number_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"producer\.settle_ms"):
        load_config(environ={"DEPTHQ_PRODUCER_SETTLE_MS": "-5"})


def test_missing_explicit_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_log_level_and_config_variables_are_not_taken_for_settings() -> None:
    """DEPTHQ_LOG_LEVEL belongs to logging (launchd and systemd set it): it must not stop depthq at start."""
    environ = {"DEPTHQ_LOG_LEVEL": "DEBUG", "DEPTHQ_WORKER_RETRIES": "1"}
    assert load_config(environ=environ).worker.retries == 1


# --- settings that used to crash instead of naming the key ---------------------------------------------


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--redis-url", "localhost:6379"], "redis.url"),
        (["--redis-url", "http://localhost:6379/0"], "redis.url"),
        (["--redis-url", "redis://localhost:6379/zero"], "redis.url"),
    ],
)
def test_a_redis_url_that_is_not_one_names_the_key(
    args: list[str], key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from depthq.cli import main

    assert main(["status", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("depthq: ") and key in err and "redis://host:6379/0" in err


def test_a_database_the_server_does_not_have_names_the_key(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from depthq.cli import main

    assert main(["status", "--redis-url", redis_url.rsplit("/", 1)[0] + "/99"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "redis.url" in err and "0-15" in err


def test_a_negative_retry_back_off_is_refused_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("worker:\n  retry_backoff_s: [-5]\n")
    with pytest.raises(ConfigError, match=r"worker\.retry_backoff_s\.0: Input should be greater than or equal to 0"):
        load_config(bad, environ={})


@pytest.mark.parametrize(
    ("watch", "output", "named"),
    [
        ("photos", "photos", "output.dir and producer.watch are the same folder"),
        ("out/photos", "out", "producer.watch (.*) is inside output.dir"),
    ],
)
def test_outputs_that_would_come_back_in_as_photos_are_refused(
    watch: str, output: str, named: str, tmp_path: Path
) -> None:
    overrides = {"producer": {"watch": str(tmp_path / watch)}, "output": {"dir": str(tmp_path / output)}}
    with pytest.raises(ConfigError, match=named):
        load_config(environ={}, overrides=overrides)


def test_an_output_folder_inside_the_watch_folder_is_allowed(tmp_path: Path) -> None:
    overrides = {"producer": {"watch": str(tmp_path)}, "output": {"dir": str(tmp_path / "depth")}}
    assert load_config(environ={}, overrides=overrides).output.dir == tmp_path / "depth"


def test_up_with_a_watch_folder_that_is_a_file_names_the_key(tmp_path: Path, redis_url: str) -> None:
    import subprocess
    import sys

    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "depthq", "up", "--watch", str(photo), "--output", str(tmp_path / "out")],
        env={"PATH": "/usr/bin:/bin", "DEPTHQ_REDIS_URL": redis_url},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"depthq: producer.watch: {photo} exists and is not a folder; point producer.watch at a folder"
    )
