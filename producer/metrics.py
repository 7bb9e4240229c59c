"""The watcher's Prometheus figures: what it saw and did, and whether it is watching.

Served by `depthq.metrics.serve` on `producer.metrics_port`, beside the queue's own figures.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge
from rq import Queue

from depthq.metrics import QueueCollector


class ProducerMetrics:
    """What the watcher saw and did: per-outcome file counts, whether it is watching, the queue."""

    def __init__(self, queue: Queue):
        self.registry = CollectorRegistry()
        self.files = Counter(
            "depthq_producer_files",
            "Photos the watcher handled, by outcome (enqueued, duplicate, done, refused, ...)",
            ["outcome"],
            registry=self.registry,
        )
        self.watching = Gauge(
            "depthq_producer_watching",
            "1 while the watched folder is armed, 0 while it is gone",
            registry=self.registry,
        )
        self.watches = Gauge(
            "depthq_producer_inotify_watches",
            "inotify watches held on the watched tree (Linux); fewer than its folders means some go unwatched",
            registry=self.registry,
        )
        self.rescans = Counter(
            "depthq_producer_rescans",
            "Walks of the watched folder, by cause: start, periodic (producer.rescan_s), overflow (lost events)",
            ["cause"],
            registry=self.registry,
        )
        self.registry.register(QueueCollector(queue))
