"""worker/worker.py: the depthq worker process around the job, in this process on a real Redis: what
it refuses to run, its retry scheduler, its log and its command channel."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis import Redis
from rq.job import JobStatus
from rq.scheduler import RQScheduler
from rq.scripts import acquire_or_refresh_lock

from depthq.config import Config
from depthq.contract import make_queue
from producer.enqueue import Enqueuer
from testkit.photos import write_jpeg
from testkit.waiting import wait_for
from tests.endstate import assert_end_state
from worker.backends import Backend
from worker.worker import SchedulerThread, build_worker


def test_foreign_function_is_refused_unrun(
    config: Config, redis_client: Redis, run_worker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    queue = make_queue(redis_client, config)
    job = queue.enqueue("pathlib.Path.touch", str(marker))
    with caplog.at_level(logging.WARNING):
        run_worker()
    assert not marker.exists()
    # Said once, by the worker: no photo's code ran to say it.
    (refused,) = [r for r in caplog.records if job.id in r.getMessage()]
    assert refused.levelno == logging.WARNING and "pathlib.Path.touch" in refused.getMessage()
    job.refresh()
    assert job.get_status() == JobStatus.FAILED
    assert "RefusedJobError" in (job.latest_result().exc_string or "")
    assert_end_state(config, redis_client, bad=[job.id])  # its argument is no payload: known by its id


def test_the_retry_scheduler_takes_over_the_lock_of_a_vanished_worker(config: Config, redis_client: Redis) -> None:
    """A worker that vanished holding rq's scheduler lock must not hold up retries for minutes."""
    # Ends with its job queued on purpose: the point is that the scheduler put it back; no worker runs.
    key = RQScheduler.get_locking_key(config.queue.name)
    # What a killed worker's scheduler leaves: its lock, with the TTL it last set (dead_after_s).
    assert acquire_or_refresh_lock(redis_client, key, "vanished-worker", 2) == "acquired"
    queue = make_queue(redis_client, config)
    job = queue.enqueue_at(datetime.now(UTC), "worker.job.process", {"source": "x"})
    survivor = SchedulerThread([config.queue.name], redis_client, dead_after_s=2)
    survivor.start()
    try:
        wait_for(lambda: job.id in queue.get_job_ids(), "the survivor to enqueue the due retry", timeout=30)
        assert redis_client.get(key) == survivor.scheduler.name.encode()
        # Its own lock lapses as fast, should it vanish too (rq's heartbeat sets 61 s an instant before).
        wait_for(lambda: 0 < redis_client.ttl(key) <= 2, "the survivor's lock to live dead_after_s", timeout=10)
    finally:
        survivor.stop_event.set()
        survivor.join(timeout=5)
    assert redis_client.get(key) is None  # released on a clean stop


def test_routine_registry_cleaning_logs_at_debug_only(
    config: Config, redis_client: Redis, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """rq's "cleaning registries" line every ~15 s was 5,800 INFO lines a day per idle worker."""
    Enqueuer(config, redis_client).submit(write_jpeg(config.producer.watch / "a.jpg"))
    with caplog.at_level(logging.DEBUG, logger="rq.worker"):
        build_worker(config, redis_client, backend).work(burst=True, with_scheduler=False)
    cleaning = [r for r in caplog.records if "cleaning registries for queue" in r.getMessage()]
    assert cleaning and all(r.levelno == logging.DEBUG for r in cleaning)
    assert any(r.levelno == logging.INFO and "a.jpg" in r.getMessage() for r in caplog.records)  # the rest stays
    assert_end_state(config, redis_client)


def test_an_idle_worker_lets_go_of_its_command_channel_promptly(
    config: Config, redis_client: Redis, backend: Backend
) -> None:
    """rq's command thread blocked up to 60 s per poll, and redis-py 8's stop() waits for the poll: an
    idle worker asked to stop hung for up to a minute in its teardown. Now the poll is a second."""
    worker = build_worker(config, redis_client, backend)
    worker.subscribe()
    channel = worker.pubsub_channel_name
    wait_for(lambda: dict(redis_client.pubsub_numsub(channel)).get(channel.encode()) == 1, "the subscription")
    started = time.monotonic()
    worker.unsubscribe()
    took = time.monotonic() - started
    assert not worker.pubsub_thread.is_alive()
    assert took < 10, f"unsubscribing took {took:.1f} s"  # bounded by the poll (1 s), not rq's 60 s
    assert dict(redis_client.pubsub_numsub(channel)).get(channel.encode()) == 0
