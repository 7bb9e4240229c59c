"""`depthq up`: a Redis (embedded unless one is configured), N worker processes and the watcher, on one machine.

Workers are separate processes started fresh (never forked from here), each loading its own model.
A worker that dies is restarted with back-off. Ctrl-C or SIGTERM stops the watcher, lets the workers
finish their current job (rq's warm shutdown), then stops Redis, which flushes its AOF.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil
from redis.exceptions import RedisError

from depthq import attempts, running
from depthq.config import CONFIG_ENV, EXIT_FINAL, PARENT_PIPE_ENV, Config, ensure_folder
from depthq.connection import connect, embedded_url_file, redact
from depthq.contract import short_hostname
from depthq.redis_server import OWNER_FILE, EmbeddedRedis, start_for
from depthq.taking import expire_started, give_back_process

log = logging.getLogger(__name__)

_MAX_RESTART_BACKOFF_S = 60.0
_SUPERVISE_TICK_S = 0.5


def child_env(config_file: Path | None, overrides: Mapping[str, Mapping[str, Any]], redis_url: str) -> dict[str, str]:
    """The children see the same settings: the same file, and the CLI flags passed on as env vars."""
    env = dict(os.environ)
    if config_file is not None:
        env[CONFIG_ENV] = str(config_file.resolve())
    for section, keys in overrides.items():
        for key, value in keys.items():
            if value is None:
                continue
            if isinstance(value, Path):
                value = str(value.resolve())
            env[f"DEPTHQ_{section.upper()}_{key.upper()}"] = json.dumps(value)
    env["DEPTHQ_REDIS_URL"] = redis_url
    return env


# What sizes each library's pool of CPU threads: torch and OpenBLAS (OpenMP), MKL, and OpenCV.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENCV_FOR_THREADS_NUM")


def worker_threads(workers: int, cores: int) -> int:
    """CPU threads per worker when `workers` share `cores`: each library otherwise sizes its pool to
    every core, and N workers then run N times as many threads as cores. Three torch workers on two
    cores ran at 0.22x until OMP_NUM_THREADS=1. Several workers per GPU is how a CUDA host keeps its
    GPU busy while one worker decodes; their CPU work is mostly single-threaded (decode, PNG) anyway."""
    return max(1, cores // max(1, workers))


def _cores() -> int:
    """The cores this process may run on (taskset, cgroup cpusets), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _worker_env(env: dict[str, str], config: Config, index: int) -> dict[str, str]:
    """Worker N serves /metrics on worker.metrics_port + N: processes on one host cannot share a port.

    With several workers, each gets its share of the cores (`worker_threads`), unless the operator set
    any of those thread counts in the environment already: then they are theirs to set."""
    out = dict(env)
    port = config.worker.metrics_port
    if port is not None:
        out["DEPTHQ_WORKER_METRICS_PORT"] = str(port + index)
    if config.up.workers > 1 and not any(name in out for name in THREAD_ENV):
        threads = str(worker_threads(config.up.workers, _cores()))
        out.update(dict.fromkeys(THREAD_ENV, threads))
    return out


class _RedisWatch:
    """The embedded Redis, restarted when it dies (SIGKILL, OOM killer, a crash): on the same port and
    data folder, so its AOF brings the queues back and every client reconnects by itself. The death and
    each restart are logged; a restart that fails is tried again with back-off."""

    def __init__(self, server: EmbeddedRedis | None):
        self.server = server
        self.died_at: float | None = None
        self.retry_at = 0.0
        self.backoff_s = 1.0

    def supervise(self) -> None:
        if self.server is None:
            return
        if self.died_at is None:
            why = self.server.died()
            if why is None:
                return
            self.died_at = time.monotonic()
            log.error("the embedded redis-server on %s %s; restarting it with its data", self.server.url, why)
        if time.monotonic() < self.retry_at:
            return
        try:
            self.server.restart()
        except (RuntimeError, OSError) as exc:
            self.retry_at = time.monotonic() + self.backoff_s
            log.error("the embedded redis-server did not restart (%s); trying again in %.0f s", exc, self.backoff_s)
            self.backoff_s = min(self.backoff_s * 2, _MAX_RESTART_BACKOFF_S)
            return
        gone_s = time.monotonic() - self.died_at
        log.warning("the embedded redis-server is back on %s, %.1f s after it went", self.server.url, gone_s)
        self.died_at, self.backoff_s = None, 1.0


class WorkerCannotStart(Exception):
    """A worker exited with EXIT_FINAL: the whole service stops, rather than restart it forever."""


class _Child:
    def __init__(
        self,
        index: int,
        env: dict[str, str],
        dead_after_s: float,
        on_death: Callable[[int, str], None] | None = None,
    ):
        self.index = index
        self.env = env
        self.dead_after_s = dead_after_s
        # Told the pid and why, when the worker dies: the photo it had in hand records it.
        self.on_death = on_death
        self.proc: subprocess.Popen[bytes] | None = None
        self.pipe: int | None = None
        self.stopped_since: float | None = None
        self.kill_reason: str | None = None
        self.backoff_s = 1.0
        self.restart_at = 0.0
        self.started_at = 0.0

    def start(self) -> None:
        # A pipe whose write end only this process holds: when it dies, however, the worker reads EOF
        # and stops, instead of retrying a dead Redis for ever (PR_SET_PDEATHSIG is Linux-only, and
        # unsafe to set from here once threads run).
        read_end, self.pipe = os.pipe()
        try:
            # Its own session: a terminal's Ctrl-C reaches only the supervisor, which stops things in order.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker"],
                env={**self.env, PARENT_PIPE_ENV: str(read_end)},
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=(read_end,),
            )
        finally:
            os.close(read_end)
        self.started_at = time.monotonic()
        log.info("worker %d started (pid %d)", self.index, self.proc.pid)

    def supervise(self) -> None:
        if self.proc is None:
            if time.monotonic() >= self.restart_at:
                self.start()
            return
        code = self.proc.poll()
        if code is None:
            if self._stopped_too_long():
                return  # killed: the next tick restarts it
            if time.monotonic() - self.started_at > 60:
                self.backoff_s = 1.0  # it ran long enough: the next crash starts from a short delay
            return
        if code == EXIT_FINAL:
            # It said why on stderr (ours): a config or model error. Restarting cannot fix it.
            raise WorkerCannotStart(
                f"worker {self.index} cannot start: a config or model error (its message is above); "
                "depthq up stops here. Fix it, then start depthq up again"
            )
        why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        why, self.kill_reason = self.kill_reason or why, None
        log.error("worker %d (pid %d) %s; restarting in %.0fs", self.index, self.proc.pid, why, self.backoff_s)
        if self.on_death is not None:
            self.on_death(self.proc.pid, why)
        self._close_pipe()
        self.proc = None
        self.restart_at = time.monotonic() + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, _MAX_RESTART_BACKOFF_S)

    def _stopped_too_long(self) -> bool:
        """A stopped process (SIGSTOP, a debugger) still polls as running. Its job goes to another
        worker after dead_after_s, and its result is fenced off; after that long it only takes a
        slot, so it is killed and restarted."""
        assert self.proc is not None
        try:
            stopped = psutil.Process(self.proc.pid).status() == psutil.STATUS_STOPPED
        except psutil.Error:
            return False
        if not stopped:
            self.stopped_since = None
            return False
        now = time.monotonic()
        if self.stopped_since is None:
            self.stopped_since = now
            log.warning(
                "worker %d (pid %d) is stopped (SIGSTOP?); its job goes to another worker after "
                "worker.dead_after_s, and it is restarted if still stopped then",
                self.index,
                self.proc.pid,
            )
            return False
        if now - self.stopped_since < self.dead_after_s:
            return False
        log.error(
            "worker %d (pid %d) stopped for %.0f s; killing it", self.index, self.proc.pid, now - self.stopped_since
        )
        self.proc.kill()
        self.kill_reason = f"stopped for {now - self.stopped_since:.0f} s, then killed by depthq up"
        self.stopped_since = None
        return True

    def _close_pipe(self) -> None:
        if self.pipe is not None:
            os.close(self.pipe)
            self.pipe = None

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, deadline: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker %d did not stop in time; killing it (its job will be re-queued)", self.index)
            self.proc.kill()
            self.proc.wait()
        self._close_pipe()


def install_stop_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def run_up(
    config: Config,
    config_file: Path | None,
    overrides: Mapping[str, Mapping[str, Any]],
    stop: threading.Event,
) -> int:
    # The watcher runs in this process; the workers are processes of their own (`python -m worker`).
    from producer.collector import start_collector
    from producer.watcher import build_watcher

    ensure_folder(config.producer.watch, "producer.watch")
    ensure_folder(config.output.dir, "output.dir")
    server: EmbeddedRedis | None = None
    if config.redis.url:
        url = config.redis.url
    else:
        server = start_for(config)
        url = server.url
    log.info("redis %s", redact(url))
    env = child_env(config_file, overrides, url)
    connection = connect(url, config.redis)

    def on_death(pid: int, why: str) -> None:
        try:
            jid = attempts.record_death(connection, config.queue.name, short_hostname(), pid, why)
            # What it took from the lanes and never started goes back now, not dead_after_s from now.
            given = give_back_process(connection, config.queue.name, short_hostname(), pid)
            expire_started(connection, short_hostname(), pid)
        except RedisError as exc:
            log.warning("could not record why worker pid %d died (%s)", pid, exc)
            return
        if jid is not None:
            log.error("worker pid %d died in job %s (%s); the job goes to the next worker", pid, jid, why)
        if given:
            log.warning("worker pid %d had taken %s and not started; back on their lanes", pid, given)

    children = [
        _Child(i, _worker_env(env, config, i), config.worker.dead_after_s, on_death) for i in range(config.up.workers)
    ]
    watcher_error: list[BaseException] = []
    cannot_start: list[WorkerCannotStart] = []
    try:
        # For the other depthq commands here: the settings this service makes its jobs with.
        running.record(config, config_file, url)
        for child in children:
            child.start()
        watcher = build_watcher(config, connection)
        start_collector(config, connection, stop)

        def watch() -> None:
            try:
                watcher.run(stop)
            except BaseException as exc:  # surfaced by the main thread
                watcher_error.append(exc)
                stop.set()

        thread = threading.Thread(target=watch, name="watcher", daemon=True)
        thread.start()
        redis_watch = _RedisWatch(server)
        while not stop.wait(_SUPERVISE_TICK_S):
            redis_watch.supervise()
            try:
                for child in children:
                    child.supervise()
            except WorkerCannotStart as exc:
                # Said now, before the shutdown's lines: the cause first, then "stopped".
                log.error("%s", exc)
                cannot_start.append(exc)
                stop.set()
        thread.join(timeout=10)
        if watcher_error:
            log.error("the watcher failed (%s); depthq up stops here", watcher_error[0])
    finally:
        # First: a command started from now on must not take the settings of a service that is stopping.
        running.remove(config)
        for child in children:
            child.terminate()
        # Warm shutdown: the job in hand finishes (bounded by the job timeout).
        deadline = time.monotonic() + config.queue.job_timeout_s + 30
        for child in children:
            child.wait(deadline)
        if server is not None:
            server.stop()
            embedded_url_file(config).unlink(missing_ok=True)
            (config.redis.data_dir / OWNER_FILE).unlink(missing_ok=True)
        log.info("stopped")
    if cannot_start:
        return EXIT_FINAL
    if watcher_error:
        raise watcher_error[0]
    return 0
