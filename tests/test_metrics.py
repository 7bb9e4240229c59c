"""The /metrics plumbing that the end-to-end test does not reach: ports per worker, outages, taken ports."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from depthq.config import Config, ConfigError
from depthq.contract import make_queue
from depthq.metrics import QueueCollector, serve
from depthq.redis_server import free_port
from depthq.supervisor import _worker_env


def test_each_worker_of_depthq_up_gets_its_own_port(make_config: Callable[..., Config]) -> None:
    config = make_config(worker={"metrics_port": 9200})
    ports = [_worker_env({}, config, i)["DEPTHQ_WORKER_METRICS_PORT"] for i in range(3)]
    assert ports == ["9200", "9201", "9202"]
    assert "DEPTHQ_WORKER_METRICS_PORT" not in _worker_env({}, make_config(), 1)


def test_queue_figures_go_missing_while_redis_is_down_and_the_page_still_answers(
    make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    down = Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    registry = CollectorRegistry()
    registry.register(QueueCollector(make_queue(down, make_config())))
    assert b"depthq_queue_depth" not in generate_latest(registry)
    assert "queue figures unavailable" in caplog.text


def test_a_taken_port_is_named(make_config: Callable[..., Config]) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"worker.metrics_port: cannot listen on 127.0.0.1:{port}"):
            serve(CollectorRegistry(), port, "worker.metrics_port")


def test_metrics_listen_on_loopback_unless_the_config_says_otherwise(make_config: Callable[..., Config]) -> None:
    config = make_config()
    assert (config.producer.metrics_bind, config.worker.metrics_bind) == ("127.0.0.1", "127.0.0.1")
    for bind in (config.worker.metrics_bind, "0.0.0.0"):
        server = serve(CollectorRegistry(), free_port(), "worker.metrics_port", bind)
        try:
            assert server.server_address[0] == bind
        finally:
            server.shutdown()
            server.server_close()
