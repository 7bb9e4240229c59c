"""Prometheus `/metrics`, the part the watcher and the workers share: the server and the queue's figures.

Each process keeps its own registry rather than the library's global one: tests run several workers
in one process, and a worker's numbers must not leak into another's. Queue figures are read from
Redis when Prometheus scrapes, so they are true at scrape time whichever process serves them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from rq import Queue

from depthq.config import ConfigError
from depthq.contract import lane_queue_name

log = logging.getLogger(__name__)


class QueueCollector(Collector):
    """Queue depth and failed jobs of both lanes (live, and the backfill beside it), read from Redis at
    scrape time."""

    def __init__(self, queue: Queue):
        backfill = Queue(
            lane_queue_name(queue.name, "backfill"), connection=queue.connection, serializer=queue.serializer
        )
        self.queues = [queue, backfill]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("depthq_queue_depth", "Jobs waiting in the queue", labels=["queue"])
        failed = GaugeMetricFamily("depthq_failed_jobs", "Jobs in the failed registry", labels=["queue"])
        try:
            for queue in self.queues:
                depth.add_metric([queue.name], queue.count)
                failed.add_metric([queue.name], queue.failed_job_registry.count)
        except RedisError as exc:
            # An outage shows as missing series (and the process's own figures stay scrapeable).
            log.warning("metrics: queue figures unavailable (%s)", exc)
            return
        yield depth
        yield failed


def serve(registry: CollectorRegistry, port: int, key: str, bind: str = "127.0.0.1") -> Any:
    """Start the /metrics server on a daemon thread; a taken port stops start-up naming the setting.

    `bind` is loopback unless the config says otherwise (`*.metrics_bind`): the figures carry no
    secrets, but an open port on every interface is a surprise on a laptop or a shared host."""
    try:
        server, _thread = start_http_server(port, addr=bind, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"{key}: cannot listen on {bind}:{port} ({exc.strerror}); pick a free port or another metrics_bind"
        ) from None
    log.info("metrics on http://%s:%d/metrics", bind, port)
    return server
