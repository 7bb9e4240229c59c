"""What every job a worker runs is handed: the worker's `Runtime` (loaded backend, transports, settings),
and the small helpers each kind of job (a photo's, a clip's chunk or assemble) reports its progress with.

Built once per worker process and passed to every job, as arq hands `ctx`: no job module keeps state.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job

from depthq.config import Config
from depthq.outage import Outage
from worker.backends.base import Backend
from worker.metrics import WorkerMetrics
from worker.transport import Transport

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    config: Config
    backend: Backend
    # By payload.transport: "shared" and "redis".
    transports: dict[str, Transport]
    host: str
    worker_name: str
    connection: Redis
    metrics: WorkerMetrics | None = None
    # Wraps each prediction: the worker's `DepthWorker.predicting` (a heartbeat that outlasts a
    # prediction holding the GIL); nothing outside a worker.
    predicting: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
    # Whether this worker's last write to the output folder failed: the outage and its end are said once each.
    output_failing: Outage = field(default_factory=Outage)


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def _utc(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def stage(rt: Runtime, job: Job | None, stage: str, timings: dict[str, float] | None = None) -> None:
    """Say in job.meta what a running job is doing, so rq-dashboard's job page explains a slow one."""
    if job is None:
        return
    job.meta.update(stage=stage, host=rt.host, worker=rt.worker_name, backend=rt.backend.name)
    if timings is not None:
        job.meta["timings_ms"] = timings
    try:
        job.save_meta()
    except RedisError as exc:
        # Progress is a courtesy: it must not cost the photo. The job's own end needs Redis anyway.
        log.warning("job %s: could not record stage %r (%s)", job.id, stage, exc)


def queue_wait_s(job: Job | None) -> float:
    started = _utc(job.started_at) if job else None
    enqueued = _utc(job.enqueued_at) if job else None
    return max((started - enqueued).total_seconds(), 0.0) if started and enqueued else 0.0
