"""worker/worker.py: the depthq worker process around the job, in this process on a real Redis: what
it refuses to run, its retry scheduler, its log and its command channel."""

from __future__ import annotations

import logging
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis import Redis
from rq.job import JobStatus
from rq.scheduler import RQScheduler
from rq.scripts import acquire_or_refresh_lock

from depthq.config import Config
from depthq.contract import make_queue, make_queues
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


def test_a_scheduler_holding_one_lane_takes_over_the_other_when_its_holder_vanishes(
    config: Config, redis_client: Redis
) -> None:
    """Two lanes, two locks. A worker started while another held the live lane's lock took only the
    backfill's; it tried again only while it held none, so once the other vanished, retries on the
    live lane waited for good (the multi-host test's worker cut off mid-job, once in CI)."""
    live, backfill = (lane.name for lane in make_queues(redis_client, config))
    live_key = RQScheduler.get_locking_key(live)
    assert acquire_or_refresh_lock(redis_client, live_key, "vanished-worker", 3) == "acquired"
    job = make_queue(redis_client, config).enqueue_at(datetime.now(UTC), "worker.job.process", {"source": "x"})
    survivor = SchedulerThread([live, backfill], redis_client, dead_after_s=3)
    survivor.start()
    try:
        backfill_key = RQScheduler.get_locking_key(backfill)
        wait_for(lambda: redis_client.get(backfill_key) == survivor.scheduler.name.encode(), "the backfill lane's lock")
        assert redis_client.get(live_key) == b"vanished-worker"  # still the other's, for now
        wait_for(lambda: redis_client.get(live_key) == survivor.scheduler.name.encode(), "the live lane's lock", 30)
        wait_for(lambda: job.id in make_queue(redis_client, config).get_job_ids(), "the live lane's due retry", 30)
    finally:
        survivor.stop_event.set()
        survivor.join(timeout=5)
    assert redis_client.get(live_key) is None and redis_client.get(backfill_key) is None  # released


def test_routine_registry_cleaning_logs_at_debug_only(
    config: Config, redis_client: Redis, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """rq's "cleaning registries" line every ~15 s was 5,800 INFO lines a day per idle worker."""
    Enqueuer(config, redis_client).submit(write_jpeg(config.producer.watch / "a.jpg"))
    # worker.job too: the photo's line at INFO is depthq's now, rq's about it are at DEBUG.
    with caplog.at_level(logging.INFO, logger="worker.job"), caplog.at_level(logging.DEBUG, logger="rq.worker"):
        build_worker(config, redis_client, backend).work(burst=True, with_scheduler=False)
    cleaning = [r for r in caplog.records if "cleaning registries for queue" in r.getMessage()]
    assert cleaning and all(r.levelno == logging.DEBUG for r in cleaning)
    assert any(r.levelno == logging.INFO and "a.jpg" in r.getMessage() for r in caplog.records)  # the rest stays
    assert_end_state(config, redis_client)


def test_a_photo_is_one_line_at_info_and_rq_s_routine_is_debug(
    config: Config, redis_client: Redis, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """About five rq lines per photo at INFO, and each bad photo warned about twice, buried the one
    line that says something: the photo, its depth range, its timings; or the bad photo and why."""
    inbox = config.producer.watch
    (inbox / "broken.jpg").write_bytes(b"half a download")
    enqueuer = Enqueuer(config, redis_client)
    for photo in (write_jpeg(inbox / "first.jpg"), write_jpeg(inbox / "second.jpg", seed=2), inbox / "broken.jpg"):
        enqueuer.submit(photo)
    # rq sets its worker's logger to INFO on import: a log at DEBUG sets it too (`worker.run`).
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="rq.worker"):
        build_worker(config, redis_client, backend).work(burst=True, with_scheduler=False)
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]  # what a log at INFO holds

    for name in ("first.jpg", "second.jpg"):
        (line,) = [r for r in shown if name in r.getMessage()]
        assert line.levelno == logging.INFO
        assert re.fullmatch(
            rf"{name}: depth \d+\.\d\d-\d+\.\d\d m, \{{.*'total': .*\}} ms \(job \S+\)", line.getMessage()
        )
    (bad,) = [r for r in shown if "broken.jpg" in r.getMessage()]
    assert bad.levelno == logging.WARNING and bad.getMessage().startswith("broken.jpg: not an image")
    assert [r for r in shown if r.levelno >= logging.WARNING] == [bad]
    # rq's lines about each job are all still there, for a log at DEBUG.
    taken = {f": {config.queue.name}: {name} (": 1 for name in ("first.jpg", "second.jpg", "broken.jpg")}
    per_job = {**taken, "Job OK": 2, "result is kept for": 2, "Successfully completed": 2}
    for text, count in per_job.items():
        lines = [r for r in caplog.records if r.name.startswith("rq.") and text in r.getMessage()]
        assert len(lines) == count and all(r.levelno == logging.DEBUG for r in lines), (text, lines)
    assert_end_state(config, redis_client, bad=["broken.jpg"])


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
