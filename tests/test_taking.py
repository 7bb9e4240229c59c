"""Taking jobs from the lanes without ever losing one (depthq.taking, worker.dequeue), on a real Redis.

The process-level case (a worker frozen while it waits, then killed) is in test_faults.py; here each
way back is taken on its own: a stop, a death seen by `depthq up`, a death seen by another worker's
maintenance, and a frozen worker that wakes up to find its job already another's.
"""

from __future__ import annotations

import os
import signal
import zlib
from collections.abc import Callable

import pytest
from redis import Redis
from rq.job import JobStatus

from depthq.config import Config
from depthq.contract import make_queue, short_hostname, taking_key
from depthq.taking import alive_key, expire_started, give_back_dead, give_back_process
from producer.enqueue import Enqueuer
from testkit.photos import write_jpeg
from tests.endstate import assert_end_state
from worker.backends import Backend
from worker.dequeue import TakingQueue
from worker.worker import DepthWorker, build_worker


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config(worker={"retry_backoff_s": [0]})


def _enqueue(config: Config, redis_client: Redis, *names: str, lane: str = "live") -> list[str]:
    enq = Enqueuer(config, redis_client, lane=lane)  # type: ignore[arg-type]
    photos = [write_jpeg(config.producer.watch / name, seed=zlib.crc32(name.encode())) for name in names]
    return [enq.submit(photo).job_id for photo in photos]


def _rename(worker: DepthWorker, suffix: str) -> None:
    """A second worker in this process: another name (names carry the pid), so another taking list."""
    worker.name = f"{worker.name}-{suffix}"
    worker.taking_key = taking_key(worker.depthq_queue, worker.name)
    worker.queue_class = TakingQueue.for_worker(worker.taking_key)


def _take(worker: DepthWorker) -> str:
    """What the worker's dequeue does first: one id moved from the lanes into its taking list."""
    taken = worker.queue_class.take(worker.connection, [q.key for q in worker.queues], None)
    assert taken is not None
    return taken[1]


def test_a_worker_takes_live_first_and_each_id_waits_in_its_taking_list(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    (backfill,) = _enqueue(config, redis_client, "old.jpg", lane="backfill")
    (live,) = _enqueue(config, redis_client, "new.jpg")
    worker = build_worker(config, redis_client, tiny_backend)
    assert _take(worker) == live
    assert redis_client.lrange(worker.taking_key, 0, -1) == [live.encode()]
    assert make_queue(redis_client, config).count == 0 and make_queue(redis_client, config, "backfill").count == 1
    assert _take(worker) == backfill
    worker.work(burst=True)  # finds the lanes empty and stops: what it took and never started goes back
    assert not redis_client.exists(worker.taking_key)
    assert make_queue(redis_client, config).job_ids == [live]
    assert make_queue(redis_client, config, "backfill").job_ids == [backfill]
    build_worker(config, redis_client, tiny_backend).work(burst=True)
    assert (config.output.dir / "new.jpg.json").exists() and (config.output.dir / "old.jpg.json").exists()
    assert_end_state(config, redis_client)


def test_a_stopping_worker_gives_back_what_it_took(config: Config, redis_client: Redis, tiny_backend: Backend) -> None:
    """A stop request can end the wait on the lanes just as Redis hands the worker a job."""
    first, second = _enqueue(config, redis_client, "a.jpg", "b.jpg")
    worker = build_worker(config, redis_client, tiny_backend)
    assert _take(worker) == first
    worker.register_death()
    assert not redis_client.exists(worker.taking_key)
    assert make_queue(redis_client, config).job_ids == [first, second]  # back at the head, in order


def test_depthq_up_gives_back_the_takes_of_a_worker_it_saw_die(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    (jid,) = _enqueue(config, redis_client, "a.jpg")
    worker = build_worker(config, redis_client, tiny_backend)
    _take(worker)
    host, _, pid = worker.name.rsplit(".", 2)
    assert give_back_process(redis_client, config.queue.name, host, int(pid) + 1) == []  # another process
    assert give_back_process(redis_client, config.queue.name, host, int(pid)) == [jid]
    assert make_queue(redis_client, config).job_ids == [jid]


def test_maintenance_gives_back_only_the_takes_of_workers_no_longer_alive(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    a, b = _enqueue(config, redis_client, "a.jpg", "b.jpg")
    alive, gone = (build_worker(config, redis_client, tiny_backend) for _ in range(2))
    _rename(gone, "gone")
    assert _take(alive) == a and _take(gone) == b
    alive.heartbeat()  # it lives; the other never said so (its alive key lapsed, say)
    assert redis_client.exists(alive_key(config.queue.name, alive.name))
    assert give_back_dead(redis_client, config.queue.name) == {gone.name: [b]}
    assert redis_client.lrange(alive.taking_key, 0, -1) == [a.encode()]
    assert make_queue(redis_client, config).job_ids == [b]


def test_a_worker_that_wakes_to_find_its_job_given_back_and_taken_does_not_start_it(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    (jid,) = _enqueue(config, redis_client, "a.jpg")
    frozen, other = (build_worker(config, redis_client, tiny_backend) for _ in range(2))
    _rename(other, "other")
    _take(frozen)
    give_back_process(redis_client, config.queue.name, *frozen.name.split(".")[::2])  # presumed dead
    assert _take(other) == jid
    job = make_queue(redis_client, config).fetch_job(jid)
    assert frozen.prepare_execution(job) is None  # it wakes: the job is the other's now
    assert other.prepare_execution(job) is not None
    assert not redis_client.exists(other.taking_key)
    started = make_queue(redis_client, config).fetch_job(jid)
    assert started is not None and started.get_status() == JobStatus.STARTED
    assert started.worker_name == other.name  # not the frozen one


def test_a_worker_that_wakes_to_find_its_job_given_back_but_untaken_starts_it(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    (jid,) = _enqueue(config, redis_client, "a.jpg")
    frozen = build_worker(config, redis_client, tiny_backend)
    _take(frozen)
    give_back_process(redis_client, config.queue.name, *frozen.name.split(".")[::2])
    job = make_queue(redis_client, config).fetch_job(jid)
    assert frozen.prepare_execution(job) is not None  # nobody took it meanwhile: it takes it back
    assert make_queue(redis_client, config).count == 0


def test_a_worker_killed_the_moment_it_starts_its_job_leaves_it_to_be_handed_over(
    config: Config, redis_client: Redis, redis_url: str, tiny_backend: Backend
) -> None:
    """A worker process SIGKILLed right after its job left its taking list, before it ran a line of the
    job (the chaos soak's mid-chunk kill polls for exactly that moment): the job is abandoned like one
    killed mid-prediction, handed over once `depthq up` saw the death, and done by another worker. The
    job must never be left "queued" in no lane, where rq's cleanup passes it over."""
    (jid,) = _enqueue(config, redis_client, "a.jpg")
    child = os.fork()
    if child == 0:  # the victim: its own connection, its own name (the name carries the pid)
        try:
            victim = build_worker(config, Redis.from_url(redis_url), tiny_backend)
            _take(victim)
            job = make_queue(victim.connection, config).fetch_job(jid)
            assert job is not None and victim.prepare_execution(job) is not None
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)  # only if the above failed: the parent then sees exit 1, not SIGKILL
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert make_queue(redis_client, config).count == 0 and not redis_client.keys(taking_key(config.queue.name, "*"))
    # What `depthq up` does when it sees a worker die, then any worker's maintenance hands the job on.
    host = short_hostname()
    assert give_back_process(redis_client, config.queue.name, host, child) == []  # nothing was left taken
    assert expire_started(redis_client, host, child) == [jid]
    build_worker(config, redis_client, tiny_backend).work(burst=True)
    assert (config.output.dir / "a.jpg.json").exists()
    assert_end_state(config, redis_client)
