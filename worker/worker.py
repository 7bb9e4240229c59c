"""The depthq worker: an rq SimpleWorker (no fork per job) that loads its backend once, warms it up, then serves.

rq's forking worker crashes on macOS once Objective-C or Core ML is loaded, and a fork per job would
reload the model anyway. So jobs run in this process, and nothing forks after the model is loaded:
even rq's scheduler (for retry back-off) runs here as a thread instead of its usual forked process.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

import numpy as np
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from rq import SimpleWorker
from rq.exceptions import DeserializationError, StopRequested
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.scheduler import RQScheduler
from rq.scripts import acquire_or_refresh_lock
from rq.worker import WorkerStatus

from depthq import attempts
from depthq.config import EXIT_RETRY, PARENT_PIPE_ENV, Config
from depthq.connection import connect, redact, resolve_url
from depthq.contract import (
    JOB_FUNCTION,
    SERIALIZER,
    WORKER_FIELDS,
    make_queue,
    make_queues,
    short_hostname,
    taking_key,
)
from depthq.metrics import serve
from depthq.outage import Outage
from depthq.taking import alive_key, give_back, give_back_dead
from worker import job as job_module
from worker.access import check_folder_access
from worker.backends import Backend, create_backend
from worker.dequeue import TakingQueue
from worker.errors import EnvironmentUnavailableError, ExpectedError, RefusedJobError
from worker.metrics import WorkerMetrics
from worker.store import HandedOverError, OutputStore
from worker.transport import RedisTransport, SharedTransport

log = logging.getLogger(__name__)

# rq's own timeout (SIGALRM) gets this long to end a job stuck in Python before the heartbeat thread
# ends the whole process; the thread looks every dead_after_s / 3.
HARD_LIMIT_GRACE_S = 5


class _RoutineAtDebug(logging.LoggerAdapter):
    """rq says at INFO what happens every time: each registry clean-up (about every 15 s per worker,
    5,800 lines a day of nothing happening), and four lines per job (taken, "Job OK", how long its
    result is kept, completed in) around depthq's one line per photo (worker.job: the photo, its depth
    range, its timings). Those, and the command channel's subscription, go to DEBUG. They are
    matched by rq's format strings (rq 3.0's worker/base.py), so what else rq says at INFO stays;
    nothing above INFO passes through here, so failures and warnings stay as they are."""

    ROUTINE = frozenset(
        {
            "Worker %s: cleaning registries for queue: %s",
            "Worker %s: cleaning group registries",
            # A job taken ("queue: description (id)"), and the same format for its "Job OK".
            "Worker %s: %s: %s (%s)",
            "Worker %s: %s: %s",  # a job taken, where rq leaves out its description
            "Worker %s: job %s result is kept for %s seconds",
            "Worker %s: job %s result discarded immediately",
            "Worker %s: job %s result will never expire, clean up result key manually",
            "Successfully completed %s job in %ss on worker %s",
            "Successfully completed job %s in %ss on worker %s",
            # The command channel's plumbing, at each start and stop. (rq's "started", "*** Listening on"
            # and "done, quitting" stay: once per worker, they say when it took and stopped taking jobs.)
            "Worker %s: subscribing to channel %s",
            "Worker %s: unsubscribing from channel %s",
        }
    )

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if isinstance(msg, str) and msg in self.ROUTINE:
            self.debug(msg, *args, **kwargs)
        else:
            super().info(msg, *args, **kwargs)


class DepthJob(Job):
    """Refuses, unrun, any job that names a function other than depthq's, and hands depthq's the
    worker's `Runtime` before the payload, as arq hands `ctx`: the job module keeps no state."""

    # Set by the worker that runs the job (`DepthWorker.execute_job`).
    runtime: job_module.Runtime | None = None

    def perform(self) -> Any:
        if self.func_name != JOB_FUNCTION:
            raise RefusedJobError(f"job {self.id} names {self.func_name!r}; depthq workers run only {JOB_FUNCTION}")
        if self.runtime is None:
            raise RuntimeError(f"job {self.id}: {JOB_FUNCTION} runs only inside a depthq worker (depthq work)")
        return super().perform()

    def _execute(self) -> Any:
        # rq's perform() makes this the current job (get_current_job) around this call.
        return self.func(self.runtime, *self.args, **self.kwargs)


# How long rq's command-channel thread may block: also how long it takes to stop.
_COMMAND_POLL_S = 1.0


class DepthWorker(SimpleWorker):
    """rq's in-process worker, plus heartbeats while a job runs.

    SimpleWorker heartbeats only when a job starts, with a TTL of the job timeout plus a minute, so a
    killed worker's job would look alive for 11 minutes. Here a thread renews a short TTL
    (`worker.dead_after_s`) while the job runs; once it lapses, any worker's maintenance pass hands
    the job to the next worker.
    """

    job_class = DepthJob

    def __init__(
        self,
        *args: Any,
        dead_after_s: int = 30,
        job_timeout_s: int = 600,
        retry_backoff_s: list[int] | None = None,
        backend: Backend | None = None,
        **kwargs: Any,
    ):
        # worker_ttl bounds the idle BLPOP (ttl - 15 s), hence how often idle workers run maintenance.
        super().__init__(*args, worker_ttl=dead_after_s, maintenance_interval=dead_after_s // 2, **kwargs)
        self.dead_after_s = dead_after_s
        self.job_timeout_s = job_timeout_s
        self.retry_backoff_s = retry_backoff_s or [10]
        self.backend = backend
        # What every job is handed (`DepthJob`); `build_worker` makes it once the worker exists.
        self.runtime: job_module.Runtime | None = None
        self.redis_full = Outage()
        self.log = _RoutineAtDebug(self.log, {})
        # Redis keys are named by the live lane's name (`queue.name`), as everywhere in depthq.
        self.depthq_queue = self.queues[0].name
        self.taking_key = taking_key(self.depthq_queue, self.name)
        self.queue_class = TakingQueue.for_worker(self.taking_key)
        # The job in hand, its execution, and when it started (monotonic): what `predicting` extends.
        self._in_hand: tuple[Job, Execution, float] | None = None
        # While a prediction holds the GIL: the monotonic time until which others must leave its job alone.
        self._held_until: float | None = None
        # A stop was asked for (SIGTERM, SIGINT, rq's shutdown command): the exit is then 0. rq itself
        # records it only for a busy worker; an idle one just raises StopRequested.
        self.stop_asked = False

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_asked = True
        super().request_stop(signum, frame)

    def subscribe(self) -> None:
        """rq's command channel (kill a job, shut down from the dashboard), polled each second.

        rq polls it every 60 s, and since redis-py 8 the thread's `stop()` waits for that poll to end:
        an idle worker asked to stop took up to a minute to go, past a test's and a service manager's
        patience. A poll a second costs one select() a second.
        """
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=_COMMAND_POLL_S, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def _through_full_redis(self, call: Callable[[], Any]) -> Any:
        """Run rq's own bookkeeping, waiting out a Redis at maxmemory (noeviction) instead of dying.

        rq lets OutOfMemoryError end the worker, and a restarted worker reloads its model only to
        meet the same refusal. Here the worker waits with back-off, saying so once, and once more
        when Redis takes writes again; a stop request still ends the wait.
        """
        delay = 1.0
        while True:
            try:
                result = call()
            except OutOfMemoryError as exc:
                if self.redis_full.begins():
                    self.log.error(
                        "Redis is full (%s): waiting until it takes writes again; raise its maxmemory or "
                        "free memory there (results waiting for a collector, old failed jobs)",
                        exc,
                    )
                if self.stop_asked:
                    raise StopRequested() from None
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            if self.redis_full.ends():
                self.log.warning("Redis takes writes again")
            return result

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """rq's heartbeat, plus the key that says this worker lives (`depthq.taking`)."""
        if pipeline is not None:  # part of a caller's transaction: that caller meets the refusal
            ttl = self._held_ttl()
            pipeline.set(alive_key(self.depthq_queue, self.name), 1, ex=max(self.dead_after_s, ttl))
            return super().heartbeat(max(timeout, ttl + 60) if timeout and ttl else timeout, pipeline)

        def beat() -> None:
            with self.connection.pipeline() as pipe:
                self.heartbeat(timeout, pipe)
                pipe.execute()

        return self._through_full_redis(beat)

    def run_maintenance_tasks(self) -> None:
        self._through_full_redis(super().run_maintenance_tasks)
        self._through_full_redis(self._give_back_for_the_dead)

    def _give_back_for_the_dead(self) -> None:
        for worker, jids in give_back_dead(self.connection, self.depthq_queue).items():
            self.log.warning(
                "worker %s is gone; %d job(s) it had taken go back to their lanes: %s", worker, len(jids), jids
            )

    def register_death(self) -> None:
        """Stopping: what this worker took and never started goes back first (a stop request can end a
        wait on the lanes just as Redis hands it a job)."""
        try:
            given = give_back(self.connection, self.depthq_queue, self.name)
            self.connection.delete(alive_key(self.depthq_queue, self.name))
        except RedisError as exc:
            self.log.warning("could not give back the jobs taken but not started (%s); another worker will", exc)
        else:
            if given:
                self.log.info("gave back %d job(s) taken but not started: %s", len(given), given)
        super().register_death()

    def prepare_execution(self, job: Job) -> Execution | None:
        """rq's, with the job's id leaving the taking list in the same transaction that records the job as
        started: never in neither. None when the job is no longer this worker's to start: it was given
        back while this worker was stopped, and another worker took it meanwhile.

        "Started" means both of rq's records: the execution in the started registry, and the job's status.
        rq itself sets the status a round trip later (`prepare_job_execution`), and its abandoned-job
        cleanup passes over a registry entry whose job is not STARTED; a worker killed between the two
        left its job "queued" in no lane, never to run (the chaos soak's mid-chunk kill found one)."""
        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.taking_key)
                    held = pipe.lpos(self.taking_key, job.id) is not None
                    if not held and not self.connection.lrem(
                        Queue.redis_queue_namespace_prefix + job.origin, 1, job.id
                    ):
                        self.log.warning(
                            "job %s was given back while this worker was stopped, and is another's now", job.id
                        )
                        return None
                    pipe.multi()
                    execution = Execution.create(job, self.get_heartbeat_ttl(job), pipeline=pipe, worker_name=self.name)
                    job.prepare_for_execution(self.name, pipeline=pipe)
                    self.set_state(WorkerStatus.BUSY, pipeline=pipe)
                    pipe.lrem(self.taking_key, 1, job.id)
                    pipe.execute()
                except WatchError:
                    continue
                self.executions[execution.id] = execution
                return execution

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        return self._through_full_redis(
            lambda: super(DepthWorker, self).dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        )

    def serialize(self) -> dict:
        """rq's worker record plus what `depthq status` shows per worker: backend, device and model."""
        record = super().serialize()
        if self.backend is not None:
            record.update(
                {
                    WORKER_FIELDS["backend"]: self.backend.name,
                    WORKER_FIELDS["device"]: self.backend.device,
                    WORKER_FIELDS["model"]: self.backend.model_name,
                }
            )
        return record

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return max(self.dead_after_s, self._held_ttl())

    def _held_ttl(self) -> int:
        """Seconds left of a GIL-holding prediction's hold (0 when none is under way)."""
        if self._held_until is None:
            return 0
        return max(0, math.ceil(self._held_until - time.monotonic()))

    def _hard_limit_s(self, job: Job) -> float:
        """How long a job may run before the heartbeat thread ends this process (it records why)."""
        return (job.timeout or self.job_timeout_s) + HARD_LIMIT_GRACE_S

    def _watchdog_s(self, job: Job) -> float:
        """When the GIL-free watchdog ends this process: after the heartbeat thread had its chance."""
        return self._hard_limit_s(job) + self.dead_after_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        if execution is None:
            self.set_state(WorkerStatus.IDLE)
            return
        if isinstance(job, DepthJob):
            job.runtime = self.runtime
        self._in_hand = (job, execution, time.monotonic())
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat_while, args=(job, execution, stop), daemon=True)
        beat.start()
        watchdog = _arm_watchdog(self._watchdog_s(job))
        try:
            self.perform_job(job, queue, execution)
        finally:
            if watchdog:
                faulthandler.cancel_dump_traceback_later()
            self._in_hand = None
            stop.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    @contextlib.contextmanager
    def predicting(self) -> Iterator[None]:
        """Around `backend.predict`: a backend that holds the GIL through it (coremltools does, for every
        prediction) stops the heartbeat thread, and a prediction longer than dead_after_s (a first
        Neural Engine compile, cpu_only, memory pressure) would let another worker take the job while
        this one still computes it. So, first, one heartbeat from here that tells the others how long
        this prediction may take: until the watchdog (`_arm_watchdog`, which needs no GIL) has ended
        this process for sure, plus dead_after_s. The cost: a worker killed in such a prediction has
        its job handed over at that time, not dead_after_s after its death, unless `depthq up` saw the
        death (it hands the job over at once). A backend that releases the GIL (torch) needs none of it."""
        in_hand = self._in_hand
        if in_hand is None or not getattr(self.backend, "holds_gil", False):
            yield
            return
        job, execution, started = in_hand
        self._held_until = started + self._watchdog_s(job) + self.dead_after_s
        try:
            self._beat_now(job, execution)
            yield
        finally:
            self._held_until = None
            self._beat_now(job, execution)

    def _beat_now(self, job: Job, execution: Execution) -> None:
        try:
            self.maintain_heartbeats(job, execution)
        except RedisError as exc:
            self.log.warning("heartbeat for job %s failed (%s); the heartbeat thread retries", job.id, exc)

    def _heartbeat_while(self, job: Job, execution: Execution, stop: threading.Event) -> None:
        """Beat while the job runs, and end the process once it runs past its time limit.

        rq's job timeout is a SIGALRM handler: it cannot run while the main thread is stuck in native
        code (a deadlock in Core ML or a decoder releases the GIL and never returns). This thread still
        runs then, so it enforces the limit from outside: it records why, stops beating and kills the
        process. `depthq up` (or launchd, systemd) starts a fresh worker; the job goes to the next one
        after dead_after_s, and the attempt counts as one the worker died in (depthq.attempts).
        """
        limit_s = self._hard_limit_s(job)
        started = time.monotonic()
        while not stop.wait(self.dead_after_s / 3):
            running_s = time.monotonic() - started
            if running_s > limit_s:
                self._end_stuck_process(job, running_s)
            try:
                self.maintain_heartbeats(job, execution)
            except RedisError as exc:
                self.log.warning("heartbeat for job %s failed (%s); retrying", job.id, exc)

    def _end_stuck_process(self, job: Job, running_s: float) -> None:
        why = (
            f"{attempts.TIMED_OUT} after {running_s:.0f} s (queue.job_timeout_s {job.timeout or self.job_timeout_s}), "
            "stuck where no in-thread timeout reaches"
        )
        self.log.error("job %s (%s): %s; ending this worker process", job.id, job.description, why)
        with contextlib.suppress(RedisError):
            attempts.record_death(self.connection, self.queue_names()[0], short_hostname(), os.getpid(), why)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)

    def _finalize_failure(self, job: Job, queue: Queue, execution: Execution, exc_info: Any) -> None:
        """A job handed to another worker while this one was out of reach is that worker's now: no
        status, retry or failure count from here, only this worker's own execution is removed.
        (rq's private hook, pinned with rq < 4: its public ones would mark the job failed.)"""
        if isinstance(exc_info[1], HandedOverError):
            self.log.warning("%s", exc_info[1])
            with self.connection.pipeline() as pipe:
                execution.delete(job=job, pipeline=pipe)
                pipe.execute()
            return
        if isinstance(exc_info[1], EnvironmentUnavailableError):
            self._postpone(job, queue, execution)
            return
        super()._finalize_failure(job, queue, execution, exc_info)

    def _postpone(self, job: Job, queue: Queue, execution: Execution) -> None:
        """Put a job whose outputs found no room back, later, spending none of its retries: the
        worker.retry_backoff_s steps, the last repeating, for as long as the folder refuses writes."""
        waits = self.retry_backoff_s
        tries = int(job.meta.get("environment_retries", 0))
        delay = waits[min(tries, len(waits) - 1)]
        job.meta["environment_retries"] = tries + 1
        self.handle_execution_ended(job, queue, job.failure_callback_timeout)
        with self.connection.pipeline() as pipe:
            job.save_meta()
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
            job.set_status(JobStatus.SCHEDULED, pipeline=pipe)
            queue.schedule_job(job, datetime.now(UTC) + timedelta(seconds=delay), pipeline=pipe)
            pipe.execute()
        self.log.info(
            "job %s (%s): put back for %d s, until the output folder takes writes", job.id, job.description, delay
        )

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """A bad photo stays bad: no retries (rq reads retries_left right after this), and one log line.

        `process` has logged that line already, naming the photo: only a refusal is logged here, as it
        comes before any photo (a foreign function, a job that is not JSON, a payload outside the
        contract). Anything unexpected gets rq's error line with the traceback."""
        exc = exc_info[1]
        if isinstance(exc, DeserializationError):
            # rq decodes the job before running it: a pickled or foreign job fails here, unrun.
            exc = RefusedJobError(f"job {job.id} is not JSON (pickled or foreign); depthq workers refuse it unrun")
        if isinstance(exc, ExpectedError):
            job.retries_left = 0
            if isinstance(exc, RefusedJobError):
                self.log.warning("job %s refused: %s", job.id, exc)
            return
        super().handle_exception(job, *exc_info)


def _arm_watchdog(after_s: float) -> bool:
    """End this process after `after_s` unless disarmed: the last resort for a job stuck where no
    Python thread can run (native code holding the GIL: coremltools' bindings never release it, so a
    hang in Core ML would stop the heartbeat thread and its time limit too). faulthandler's watchdog
    is a C thread: it writes every thread's stack to stderr, where the stuck call shows, and exits
    with status 1; `depthq up` (or launchd, systemd) starts a fresh worker. False where stderr is no
    file (a test capturing it): there the heartbeat thread's limit is all there is."""
    stream = sys.__stderr__
    try:
        faulthandler.dump_traceback_later(after_s, exit=True, file=stream if stream is not None else sys.stderr)
    except (io.UnsupportedOperation, AttributeError, ValueError, RuntimeError):
        return False
    return True


def worker_name(backend: str) -> str:
    """<host>.<backend>.<pid>, so rq-dashboard shows which machine does what."""
    return f"{short_hostname()}.{backend}.{os.getpid()}"


class SchedulerThread(threading.Thread):
    """rq's scheduler loop (it moves retries whose back-off has elapsed back to the queue), as a thread.

    Every worker runs one; rq's per-queue lock lets only one of them act at a time. rq's lock lives
    61 s and a worker without it tries again only every 120 s, so a worker that vanished holding it
    (killed, unplugged) held up every retry, the re-run of its own abandoned job included, for up to
    two minutes (measured: 119 s). Here the lock lives `dead_after_s`, like a worker's heartbeat,
    and a worker tries every tick for each lock it lacks, so retries resume within `dead_after_s` + 1 s.
    """

    def __init__(self, queue_names: list[str], connection: Redis, dead_after_s: int, interval: int = 1):
        super().__init__(name="rq-scheduler", daemon=True)
        self.scheduler = RQScheduler(queue_names, connection=connection, interval=interval, serializer=SERIALIZER)
        self.connection = connection
        self.lock_ttl_s = dead_after_s
        self.stop_event = threading.Event()

    def run(self) -> None:
        s = self.scheduler
        while not self.stop_event.wait(s.interval):
            try:
                # Every tick, not only while holding none: a worker holding one lane's lock must still
                # take the other's once its holder vanishes, or that lane's retries wait for good.
                # (rq's acquire_locks refreshes the locks held and takes those free.)
                s.acquire_locks()
                if s.acquired_locks:
                    s.heartbeat()
                    for name in s.acquired_locks:  # refreshes only a lock this scheduler still holds
                        acquire_or_refresh_lock(self.connection, s.get_locking_key(name), s.name, self.lock_ttl_s)
                    s.enqueue_scheduled_jobs()
            except RedisError as exc:
                log.warning("scheduler: redis unavailable (%s); retrying", exc)
        with contextlib.suppress(RedisError):
            s.release_locks()


def load_backend(config: Config, backend: Backend | None = None) -> tuple[Backend, dict[str, float]]:
    """Load, then one warm-up inference, so the first real job is not the slow one."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    backend = backend or create_backend(config)
    backend.load()
    timings["load_s"] = time.perf_counter() - t0
    if config.worker.warmup:
        t1 = time.perf_counter()
        backend.predict(np.zeros((backend.input_size, backend.input_size, 3), dtype=np.uint8))
        timings["warmup_s"] = time.perf_counter() - t1
    return backend, timings


def build_worker(
    config: Config, connection: Redis, backend: Backend, metrics: WorkerMetrics | None = None
) -> DepthWorker:
    name = worker_name(backend.name)
    worker = DepthWorker(
        make_queues(connection, config),  # live first: a fresh drop goes ahead of a backfill
        name=name,
        connection=connection,
        serializer=SERIALIZER,
        dead_after_s=config.worker.dead_after_s,
        job_timeout_s=config.queue.job_timeout_s,
        retry_backoff_s=config.worker.retry_backoff_s,
        default_result_ttl=config.queue.result_ttl_s,
        backend=backend,
    )
    worker.runtime = job_module.Runtime(
        predicting=worker.predicting,
        config=config,
        backend=backend,
        transports={
            "shared": SharedTransport(config, OutputStore(config.output.dir), connection, name),
            "redis": RedisTransport(config, connection, name),
        },
        host=short_hostname(),
        worker_name=name,
        connection=connection,
        metrics=metrics,
    )
    return worker


# While stopping because `depthq up` is gone, how often the worker looks whether its Redis went too.
_PARENT_GONE_POLL_S = 0.25


def stop_with_parent(fd: int, grace_s: float, redis_url: str | None = None) -> threading.Thread:
    """`depthq up` passes a pipe whose write end only it holds: EOF means it died (even SIGKILLed).
    Then stop as on SIGTERM (the photo in hand first), and for good after `grace_s`; at once if its
    Redis is gone too (the embedded one dies with `depthq up`): nothing of the photo in hand could be
    recorded then, and the job is taken up again when the service comes back."""

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 1):
                pass
        log.warning("depthq up, which started this worker, is gone; stopping")
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if redis_url is not None and not _answers(redis_url):
                log.error("its Redis is gone too; nothing of the job in hand can be recorded: exiting now")
                break
            time.sleep(_PARENT_GONE_POLL_S)
        else:
            log.error("still running %.0f s after depthq up went; exiting now", grace_s)
        logging.shutdown()
        os._exit(1)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def _answers(url: str) -> bool:
    """Whether a Redis answers at `url` within a second (no retries: this is the retry)."""
    probe = Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        probe.ping()
    except (RedisConnectionError, RedisTimeoutError):
        return False
    except RedisError:
        return True  # it answered, if only to ask for a password
    finally:
        probe.close()
    return True


def run(config: Config, burst: bool = False, backend: Backend | None = None) -> int:
    """`depthq work`. `backend` replaces the configured one (the benchmarks' stand-in model)."""
    if PARENT_PIPE_ENV in os.environ:
        grace_s = config.queue.job_timeout_s + HARD_LIMIT_GRACE_S
        stop_with_parent(int(os.environ[PARENT_PIPE_ENV]), grace_s, resolve_url(config))
    # `kill -USR1 <pid>` writes every thread's stack to the log: where a stuck worker is stuck. (Not
    # where stderr is no file, as when a test captures it.)
    with contextlib.suppress(io.UnsupportedOperation, AttributeError, ValueError):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    check_folder_access(config)  # before minutes of loading a model it could never use here
    url = resolve_url(config)
    connection = connect(url, config.redis)
    t0 = time.perf_counter()
    backend = backend or create_backend(config)
    metrics = None
    if config.worker.metrics_port is not None:
        # Served before the model loads, so a slow first load (a Core ML compile) shows as model_loaded 0.
        metrics = WorkerMetrics(make_queue(connection, config), short_hostname(), backend.name, backend.model_name)
        serve(metrics.registry, config.worker.metrics_port, "worker.metrics_port", config.worker.metrics_bind)
    backend, timings = load_backend(config, backend)
    if metrics is not None:
        metrics.model_loaded.set(1)
    worker = build_worker(config, connection, backend, metrics)
    log.info(
        "worker %s ready in %.2fs (load %.2fs, warm-up %.2fs), redis %s, queue %s",
        worker.name,
        time.perf_counter() - t0,
        timings["load_s"],
        timings.get("warmup_s", 0.0),
        redact(url),
        config.queue.name,
    )
    scheduler = SchedulerThread([q.name for q in worker.queues], connection, config.worker.dead_after_s)
    scheduler.start()
    try:
        worker.work(burst=burst, with_scheduler=False, logging_level=logging.getLogger().level)
    finally:
        scheduler.stop_event.set()
        scheduler.join(timeout=5)
    return exit_code(worker, burst)


def exit_code(worker: DepthWorker, burst: bool) -> int:
    """0 only for a stop someone asked for (a signal, rq's shutdown command) or a burst run's end.

    rq's `work()` catches whatever escapes its loop, logs "found an unhandled exception, quitting" and
    returns as if asked to stop. A 0 then would leave the worker down for good under launchd, whose
    KeepAlive {SuccessfulExit: false} restarts only a failed exit; EX_TEMPFAIL (75) is restarted
    there, under systemd and by `depthq up`."""
    if burst or worker.stop_asked:
        return 0
    log.error(
        "worker %s stopped with no stop asked for (the error above); exiting %d so its service manager starts it again",
        worker.name,
        EXIT_RETRY,
    )
    return EXIT_RETRY
