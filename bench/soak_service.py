"""The service under soak: `depthq up` as a user runs it, its output folder on a tmpfs of its own.

`depthq up` runs as a real subprocess in its own session (as from a terminal), with the config file
the soak wrote, logging into `logs/up-<n>.log` (one file per start; its workers inherit it, so their
lines are there too). A watcher thread notices any exit the soak did not cause, records it with the
log's tail and starts the service again: at the end, each such exit is a failure.

Every process of the service carries `SOAK_ROOT=<root>` in its environment (workers and the embedded
redis-server inherit it from `depthq up`), so whatever is left behind after a stop is found by that,
or by the root in its command line, and never by a guess at names.

The output folder is a real tmpfs (`mount -t tmpfs`), so "the disk is full" is a real ENOSPC, on the
real folder, for every process at once.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry
from rq import Worker

from bench.soak_record import Timeline

# The mark every process of the service carries; not DEPTHQ_*, which depthq reads as settings.
ROOT_ENV = "SOAK_ROOT"
LOG_TAIL_LINES = 40
_POLL_S = 0.05
_WATCH_TICK_S = 0.25
# How long processes left by a stopped service get to go on their own before the soak ends them.
LEFTOVER_GRACE_S = 30.0


class ServiceError(RuntimeError):
    """`depthq up` did not start, or did not stop, as asked; the message carries its log's tail."""


def wait_until(predicate: Callable[[], object], timeout_s: float, poll_s: float = _POLL_S) -> float | None:
    """Poll until true; the seconds it took, or None at the deadline (which only bounds a failure)."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            return None
        time.sleep(poll_s)


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


class Tmpfs:
    """A tmpfs mounted on `path` (root only), filled to ENOSPC on demand, unmounted at the end."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = path
        self.size_mb = size_mb
        self.filler = path / "soak-filler.bin"

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tool = _which("mount")
        if tool is None:
            raise ServiceError("`mount` is not installed")
        result = subprocess.run(
            [tool, "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=0755", "depthq-soak", str(self.path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise ServiceError(f"mount -t tmpfs on {self.path} failed: {result.stderr.strip()}")

    @property
    def mounted(self) -> bool:
        return os.path.ismount(self.path)

    def unmount(self) -> str | None:
        """None once unmounted; else why not, after a lazy unmount so that nothing stays mounted."""
        if not self.mounted:
            return None
        tool = _which("umount") or "umount"
        result = subprocess.run([tool, str(self.path)], capture_output=True, text=True, timeout=30)
        if result.returncode == 0:
            return None
        subprocess.run([tool, "-l", str(self.path)], capture_output=True, text=True, timeout=30)
        return f"umount {self.path}: {result.stderr.strip()} (unmounted lazily instead)"

    def fill(self) -> int:
        """Write a filler file until the tmpfs has no byte left (ENOSPC); the bytes written."""
        written = 0
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for chunk in (b"\0" * 2**20, b"\0" * 4096, b"\0"):
                while True:
                    try:
                        written += os.write(fd, chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return written

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def unfill(self) -> None:
        self.filler.unlink(missing_ok=True)


@functools.cache
def tmpfs_unavailable_reason() -> str | None:
    """None where this process can mount a tmpfs; else one sentence why not (for a skip, or a failure)."""
    if not sys.platform.startswith("linux"):
        return f"a tmpfs mount is Linux-only (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"mounting a tmpfs needs root (running as uid {os.geteuid()})"
    with tempfile.TemporaryDirectory(prefix="depthq-soak-probe-") as folder:
        probe = Tmpfs(Path(folder) / "mnt", 1)
        try:
            probe.mount()
        except (ServiceError, OSError, subprocess.SubprocessError) as exc:
            return f"cannot mount a tmpfs here: {exc}"
        problem = probe.unmount()
        if problem is not None:
            return f"cannot unmount a tmpfs here: {problem}"
    return None


@dataclass
class UnexpectedExit:
    """`depthq up` ended without the soak asking it to."""

    at: float  # seconds since the soak started
    code: int
    log: Path
    tail: str


class Service:
    """`depthq up --config <root>/config.yaml`, started, stopped and watched by the soak."""

    def __init__(
        self,
        root: Path,
        config_file: Path,
        redis_data: Path,
        workers: int,
        timeline: Timeline,
        start_timeout_s: float,
        stop_timeout_s: float,
    ) -> None:
        self.root = root
        self.config_file = config_file
        self.redis_data = redis_data
        self.workers = workers
        self.timeline = timeline
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.logs = root / "logs"
        self.depthq = Path(sys.executable).with_name("depthq")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None
        self.starts = 0
        self.unexpected: list[UnexpectedExit] = []
        self.problems: list[str] = []  # what the watcher could not repair (a restart that failed)
        # Held while the soak starts or stops the service, so the watcher never takes its own stop for a crash.
        self.lock = threading.RLock()
        self._expect_exit = False
        self._watching = threading.Event()
        self._watcher: threading.Thread | None = None
        self._client: Redis | None = None
        self._client_url: str | None = None

    # ------------------------------------------------------------------ start and stop

    def start(self, why: str) -> float:
        """Start `depthq up` and wait until its Redis answers and every worker is registered; the seconds."""
        with self.lock:
            self.logs.mkdir(parents=True, exist_ok=True)
            self.starts += 1
            self.log = self.logs / f"up-{self.starts}.log"
            env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
            env[ROOT_ENV] = str(self.root)
            with self.log.open("ab") as log_file:
                self.proc = subprocess.Popen(
                    [str(self.depthq), "up", "--config", str(self.config_file)],
                    cwd=self.root,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._expect_exit = False
            self.timeline.add(f"depthq up started ({why}): pid {self.proc.pid}, log {self.log.name}")
            took = wait_until(
                lambda: self.ready() or self.proc is None or self.proc.poll() is not None, self.start_timeout_s
            )
            if self.proc.poll() is not None:
                raise ServiceError(f"depthq up exited with code {self.proc.returncode} while starting:\n{self.tail()}")
            if took is None:
                raise ServiceError(f"depthq up not ready after {self.start_timeout_s:.0f} s:\n{self.tail()}")
            self.timeline.add(
                f"depthq up ready in {took:.1f} s: redis pid {self.redis_pid()}, workers {self.worker_pids()}"
            )
            return took

    def stop(self, sig: signal.Signals, timeout_s: float | None = None) -> tuple[int | None, float]:
        """Send `sig` to `depthq up` and wait for it to exit: its exit code (None if it did not) and the seconds."""
        with self.lock:
            proc = self.proc
            if proc is None:
                return None, 0.0
            self._expect_exit = True
            t0 = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                code: int | None = proc.wait(self.stop_timeout_s if timeout_s is None else timeout_s)
            except subprocess.TimeoutExpired:
                code = None
            return code, time.monotonic() - t0

    def kill(self) -> None:
        """SIGKILL `depthq up` (and reap it); its children are left to notice on their own."""
        with self.lock:
            if self.proc is not None:
                self._expect_exit = True
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait()

    def shutdown(self) -> None:
        """Whatever state it is in, stop it: SIGTERM, then SIGKILL, then anything left behind. For cleanup."""
        self.stop_watching()
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                code, _ = self.stop(signal.SIGTERM, timeout_s=30)
                if code is None:
                    self.kill()
            self.end_leftovers(grace_s=10)

    # ------------------------------------------------------------------ the watcher

    def watch(self) -> None:
        """From now on, an exit the soak did not cause is recorded and the service started again."""
        self._watching.set()
        self._watcher = threading.Thread(target=self._watch, name="soak-up-watcher", daemon=True)
        self._watcher.start()

    def stop_watching(self) -> None:
        self._watching.clear()
        if self._watcher is not None:
            self._watcher.join(timeout=self.start_timeout_s + LEFTOVER_GRACE_S + 10)

    def _watch(self) -> None:
        while self._watching.is_set():
            time.sleep(_WATCH_TICK_S)
            with self.lock:
                if not self._watching.is_set() or self.proc is None or self._expect_exit:
                    continue
                code = self.proc.poll()
                if code is None:
                    continue
                assert self.log is not None
                exit_ = UnexpectedExit(self.timeline.now(), code, self.log, self.tail())
                self.unexpected.append(exit_)
                self.timeline.add(f"UNEXPECTED: depthq up exited by itself with code {code}; restarting it")
                self.end_leftovers()
                try:
                    self.start("after its unexpected exit")
                except ServiceError as exc:
                    self.problems.append(f"restart after an unexpected exit failed: {exc}")
                    self.timeline.add("restart after an unexpected exit failed")

    # ------------------------------------------------------------------ looking at it

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self.log is None or not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def _children(self) -> list[psutil.Process]:
        if not self.alive():
            return []
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return []

    def worker_pids(self) -> list[int]:
        """The worker processes of the running `depthq up` (`python -m worker`), stopped ones included."""
        pids = []
        for child in self._children():
            with contextlib.suppress(psutil.Error):
                cmdline = child.cmdline()
                if "-m" in cmdline and "worker" in cmdline and child.status() != psutil.STATUS_ZOMBIE:
                    pids.append(child.pid)
        return sorted(pids)

    def redis_url(self) -> str | None:
        try:
            return (self.redis_data / "redis.url").read_text().strip() or None
        except OSError:
            return None

    def redis(self) -> Redis | None:
        """A client of the embedded Redis now advertised in redis.url (None if none is), failing fast."""
        url = self.redis_url()
        if url is None:
            return None
        if url != self._client_url or self._client is None:
            if self._client is not None:
                self._client.close()
            self._client = Redis.from_url(
                url, socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0), health_check_interval=0
            )
            self._client_url = url
        return self._client

    def redis_answers(self) -> bool:
        client = self.redis()
        try:
            return bool(client is not None and client.ping())
        except RedisError:
            return False

    def redis_pid(self) -> int | None:
        """The embedded redis-server's pid, as it says itself (INFO server), else as `depthq up`'s child."""
        client = self.redis()
        with contextlib.suppress(RedisError, KeyError, ValueError):
            if client is not None:
                return int(client.info("server")["process_id"])
        for child in self._children():
            with contextlib.suppress(psutil.Error):
                if "redis-server" in child.name():
                    return child.pid
        return None

    def registered(self) -> list[Worker]:
        """rq workers on the embedded Redis that are live workers of this `depthq up` (not stale records)."""
        client = self.redis()
        if client is None:
            return []
        pids = set(self.worker_pids())
        try:
            return [w for w in Worker.all(connection=client) if w.pid in pids]
        except RedisError:
            return []

    def ready(self) -> bool:
        """Its own Redis answers (the owner file names this `depthq up`) and every worker is registered."""
        if not self.alive():
            return False
        assert self.proc is not None
        try:
            owner = int((self.redis_data / "redis.owner").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return False
        return owner == self.proc.pid and self.redis_answers() and len(self.registered()) >= self.workers

    def leftovers(self) -> list[psutil.Process]:
        """Live processes that belong to this soak's service: its mark in their environment, or its root
        in their command line. Not this process, nor its ancestors, nor the running `depthq up`'s tree."""
        mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        if self.alive():
            assert self.proc is not None
            mine |= {self.proc.pid, *(c.pid for c in self._children())}
        root = str(self.root)
        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            if proc.pid in mine or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            try:
                if any(root in part for part in proc.info["cmdline"] or ()) or proc.environ().get(ROOT_ENV) == root:
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def end_leftovers(self, grace_s: float = LEFTOVER_GRACE_S) -> list[str]:
        """Wait up to `grace_s` for a stopped service's processes to go; SIGKILL the rest. Those killed."""
        if wait_until(lambda: not self.leftovers(), grace_s, poll_s=0.2) is not None:
            return []
        killed = []
        for proc in self.leftovers():
            with contextlib.suppress(psutil.Error):
                killed.append(describe(proc))
                proc.kill()
        wait_until(lambda: not self.leftovers(), 10, poll_s=0.2)
        if killed:
            self.timeline.add(f"killed what the service left behind after {grace_s:.0f} s: {'; '.join(killed)}")
        return killed


def describe(proc: psutil.Process) -> str:
    """`pid 123 (redis-server /tmp/.../redis-data ...)`: enough to tell which process it was."""
    try:
        return f"pid {proc.pid} ({' '.join(proc.cmdline())[:160]})"
    except psutil.Error:
        return f"pid {proc.pid}"
