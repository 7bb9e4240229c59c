"""A worker's Prometheus figures: latency histograms, done and failed counts, whether the model is loaded.

Labelled by host and backend, so one dashboard compares a Mac mini's Core ML against a Linux box's
CUDA. The queue's own figures come from the shared `QueueCollector`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from rq import Queue

from depthq.metrics import QueueCollector

# Seconds. Spans a V100's 0.3 s to a Mac mini's 5 s, and queue waits of minutes behind a burst.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_LABELS = ("host", "backend")


class WorkerMetrics:
    def __init__(self, queue: Queue, host: str, backend: str, model: str):
        self.registry = CollectorRegistry()
        self.labels = (host, backend)
        self.queue_wait = Histogram(
            "depthq_queue_wait_seconds", "Enqueue to start", _LABELS, buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.inference = Histogram(
            "depthq_inference_seconds",
            "The model's forward pass",
            _LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.total = Histogram(
            "depthq_total_seconds",
            "Enqueue to outputs written",
            _LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.done = Counter("depthq_jobs_done", "Photos with outputs written", _LABELS, registry=self.registry)
        self.failed = Counter(
            "depthq_jobs_failed",
            "Failed attempts (bad photos, and errors that rq retries)",
            _LABELS,
            registry=self.registry,
        )
        self.model_loaded = Gauge(
            "depthq_model_loaded", "1 once the model is loaded and warm", [*_LABELS, "model"], registry=self.registry
        ).labels(host, backend, model)
        self.registry.register(QueueCollector(queue))
        # Zero series from the start, so a rate() over a fresh worker reads 0 rather than nothing.
        for metric in (self.queue_wait, self.inference, self.total, self.done, self.failed):
            metric.labels(*self.labels)

    def observe_done(self, timings_ms: dict[str, float]) -> None:
        self.done.labels(*self.labels).inc()
        self.queue_wait.labels(*self.labels).observe(timings_ms.get("queue_wait", 0.0) / 1000.0)
        self.total.labels(*self.labels).observe(timings_ms.get("total", 0.0) / 1000.0)
        if timings_ms.get("inference"):
            # Copies of already-computed photos never ran the model.
            self.inference.labels(*self.labels).observe(timings_ms["inference"] / 1000.0)

    def observe_failed(self) -> None:
        self.failed.labels(*self.labels).inc()
