"""`depthq doctor` against a real Redis and real folders: healthy, then broken one way at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis import Redis
from rq import Worker

from depthq.cli import main
from depthq.config import Config
from depthq.contract import make_queue
from depthq.redis_server import free_port


@pytest.fixture
def config_file(make_config: Callable[..., Config], write_config_file: Callable[..., Path], tiny_model: Path) -> Path:
    return write_config_file(make_config(), "doctor.yaml", model={"path": str(tiny_model), "device": "cpu"})


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, list[str]]]:
    code = main(["doctor", *args])
    lines: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines():
        state, _, rest = line.partition("  ")
        name = rest.split()[0] if rest.split() else ""
        lines.setdefault(name, []).append(f"{state.strip()} {rest.strip()}")
    return code, lines


def test_a_healthy_machine(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = doctor(capsys, "--config", str(config_file))
    assert code == 0, lines
    assert lines["config"] == [f"ok config    {config_file} + DEPTHQ_* variables + flags"]
    assert lines["redis"][0].startswith("ok redis") and "Redis " in lines["redis"][0]
    assert "AOF on" in lines["redis"][-1]
    assert all(line.startswith("ok") for line in lines["folders"])
    assert lines["backend"] == ["ok backend   torch (linux)"]
    (present, loaded) = lines["model"]
    assert present.startswith("ok model") and "licence: not stated in the checkpoint" in present
    assert "loaded on cpu" in loaded and "one warm-up prediction at 128x128 took" in loaded
    assert lines["clock"][0].startswith("ok clock") and lines["workers"][0].startswith("ok workers")
    (video,) = lines["video"]
    assert video.startswith("ok video") and "PyAV" in video and "H.264 previews" in video


def test_a_missing_model_fails_with_the_download_line(
    config_file: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, lines = doctor(capsys, "--config", str(config_file), "--model", "apple/DepthPro-hf")
    assert code == 1
    (model,) = lines["model"]
    assert model.startswith("FAIL model") and "hf download apple/DepthPro-hf --local-dir" in model
    assert lines["redis"][0].startswith("ok")  # the other checks still ran


def test_redis_that_would_drop_jobs_fails(
    config_file: Path, redis_client: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        code, lines = doctor(capsys, "--config", str(config_file), "--no-model")
    finally:
        redis_client.config_set("maxmemory-policy", "noeviction")
    assert code == 1
    assert any(line.startswith("FAIL redis") and "maxmemory-policy is allkeys-lru" in line for line in lines["redis"])


def test_unreachable_redis_and_unwritable_output_fail_and_the_rest_still_runs(
    config_file: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, lines = doctor(
        capsys,
        "--config",
        str(config_file),
        "--no-model",
        "--redis-url",
        f"redis://127.0.0.1:{free_port()}/0",
        "--output",
        str(blocker / "out"),
    )
    assert code == 1
    assert lines["redis"][0].startswith("FAIL redis") and "cannot reach" in lines["redis"][0]
    assert any(line.startswith("FAIL folders") and "is not writable" in line for line in lines["folders"])
    assert "clock" not in lines  # it needs Redis


@pytest.fixture
def foreign_worker(redis_client: Redis, make_config: Callable[..., Config]) -> Iterator[Worker]:
    worker = Worker([make_queue(redis_client, make_config())], connection=redis_client, name="plain-rq-worker")
    worker.register_birth()
    yield worker
    worker.register_death()


def test_a_worker_that_is_not_depthqs_fails(
    config_file: Path, foreign_worker: Worker, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = doctor(capsys, "--config", str(config_file), "--no-model")
    assert code == 1
    (workers,) = lines["workers"]
    assert workers.startswith("FAIL workers") and "plain-rq-worker" in workers


def test_a_warning_cannot_be_made_without_its_fix() -> None:
    from depthq.doctor import Check

    with pytest.raises(ValueError, match="has no fix"):
        Check("redis", "warn", "something will bite")
    assert Check("redis", "warn", "it will bite", "do this").line() == "warn  redis     it will bite; do this"


def test_an_external_redis_without_a_limit_or_aof_is_warned_of_with_the_fix(
    config_file: Path, redis_client: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """redis.url names it: depthq cannot set its limits, so doctor says how (the test's server has none)."""
    assert redis_client.config_get("maxmemory")["maxmemory"] == "0"
    redis_client.config_set("appendonly", "no")
    try:
        code, lines = doctor(capsys, "--config", str(config_file), "--no-model")
    finally:
        redis_client.config_set("appendonly", "yes")
    assert code == 0
    warned = [line for line in lines["redis"] if line.startswith("warn")]
    assert len(warned) == 2, lines
    assert "no maxmemory" in warned[0] and "`redis-cli CONFIG SET maxmemory 2gb`" in warned[0]
    assert "AOF is off" in warned[1] and "`redis-cli CONFIG SET appendonly yes`" in warned[1]


def test_little_free_space_is_warned_of_with_the_fix(
    make_config: Callable[..., Config],
    write_config_file: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.disk import small_disk

    with small_disk(tmp_path / "small", "4m") as small:
        config_file = write_config_file(make_config(output={"dir": str(small / "out")}), "small.yaml")
        _, lines = doctor(capsys, "--config", str(config_file), "--no-model")
    (low,) = [line for line in lines["folders"] if "output.dir" in line]
    assert low.startswith("warn folders") and "GiB free; free space there, or point output.dir" in low
