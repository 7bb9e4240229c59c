"""A depthq deployment across hosts made of network namespaces (testkit/netns.py), for the multi-host
tests and the scale-out benchmark.

Host "a" runs Redis, the producer and the collector (`depthq watch`, transport redis). Every other
host runs workers in its own folder, with "a"'s folders hidden from it: the photos reach them, and the
results leave them, only through Redis at "a"'s address. The observer (the test itself) reads Redis
through a unix socket in "a"'s folder and the outputs from "a"'s disk, so it sends nothing over the
test network either.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import yaml
from redis import Redis
from redis.exceptions import RedisError

from depthq.redis_server import find_server_binary
from testkit.netns import Network
from testkit.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
REDIS_PORT = 6390


class Cluster:
    def __init__(self, net: Network, root: Path, model: Path):
        self.net = net
        self.root = root
        self.model = model
        self.a = root / "a"
        self.inbox = self.a / "inbox"
        self.out = self.a / "out"
        self.inbox.mkdir(parents=True)
        self.out.mkdir()
        self.socket = self.a / "redis.sock"
        self.redis_url = f"redis://{net.address('a')}:{REDIS_PORT}/0"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stopped: set[str] = set()
        self._logs: list[IO[bytes]] = []

    def client(self) -> Redis:
        """The observer's view of Redis, through "a"'s unix socket (no traffic on the test network)."""
        return Redis(unix_socket_path=str(self.socket))

    def _spawn(
        self,
        name: str,
        host: str,
        argv: Sequence[str],
        cwd: Path,
        config: dict[str, Any],
        extra_env: dict[str, str] | None = None,
    ) -> None:
        config_file = cwd / f"{name}.yaml"
        config_file.write_text(yaml.safe_dump(config))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")},
            "DEPTHQ_CONFIG": str(config_file),
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            **(extra_env or {}),
        }
        log = (cwd / f"{name}.log").open("wb")
        self._logs.append(log)
        hide = [] if host == "a" else [self.a]
        self.procs[name] = self.net.popen(
            host, list(argv), env=env, cwd=cwd, hide=hide, stdout=log, stderr=subprocess.STDOUT
        )

    def log(self, name: str) -> str:
        for path in self.root.glob(f"*/{name}.log"):
            return path.read_text(errors="replace")
        return ""

    def start_redis(self) -> None:
        argv = [
            str(find_server_binary(None)),
            "--bind", self.net.address("a"),
            "--port", str(REDIS_PORT),
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--protected-mode", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.a),
        ]  # fmt: skip
        self._spawn("redis", "a", argv, self.a, {})
        wait_for(lambda: self.socket.exists() and self._ping(), "redis on host a", timeout=30)

    def _ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except RedisError:
            return False

    def start_producer(self, name: str = "producer", video: dict[str, Any] | None = None, **transport: Any) -> None:
        config = {
            "redis": {"url": self.redis_url},
            "producer": {"watch": str(self.inbox), "settle_ms": 100, "rescan_s": 30},
            "output": {"dir": str(self.out)},
            "model": {"path": str(self.model)},
            "transport": {"mode": "redis", **transport},
            "video": video or {},
        }
        self._spawn(name, "a", [sys.executable, "-m", "depthq.cli", "watch"], self.a, config)

    def host_folder(self, host: str) -> Path:
        folder = self.root / host
        folder.mkdir(exist_ok=True)
        return folder

    def start_worker(
        self, host: str, index: int = 0, argv: Sequence[str] | None = None, env: dict[str, str] | None = None
    ) -> str:
        """A `depthq work` on `host` with the tiny model copied into the host's own folder."""
        folder = self.host_folder(host)
        model = folder / "model"
        if not model.exists():
            shutil.copytree(self.model, model)
        name = f"worker-{host}{index}"
        config = {
            "redis": {"url": self.redis_url},
            "producer": {"watch": str(folder / "no-inbox-here")},
            "output": {"dir": str(folder / "no-output-here")},
            "model": {"path": str(model), "device": "cpu", "offline": True},
            "worker": {"dead_after_s": 10, "retry_backoff_s": [1]},
        }
        self._spawn(name, host, argv or [sys.executable, "-m", "worker"], folder, config, env)
        return name

    def wait(self, predicate: Callable[[], object], what: str, timeout: float = 120.0) -> float:
        """`wait_for`, failing at once, with its log, if one of the cluster's processes has died."""

        def check() -> object:
            for name, proc in self.procs.items():
                if proc.poll() is not None and name not in self.stopped:
                    raise AssertionError(
                        f"{name} exited ({proc.returncode}) while waiting for {what}:\n{self.log(name)[-4000:]}"
                    )
            return predicate()

        try:
            return wait_for(check, what, timeout)
        except AssertionError as exc:
            tails = "\n".join(f"--- {name}:\n{self.log(name)[-1500:]}" for name in self.procs)
            raise AssertionError(f"{exc}\n{tails}") from None

    def workers_ready(self, count: int) -> bool:
        return len(self.client().smembers("rq:workers:depthq")) >= count

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.get(name)
        if sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT):
            self.stopped.add(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)

    def wait_exit(self, name: str, timeout: float = 60.0) -> int:
        """Wait for `name` to end; if it does not, its threads' stacks (SIGUSR1, the worker's
        faulthandler) and its log go into the failure, which says where it is stuck."""
        proc = self.procs[name]
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=3)
            tail = self.log(name)[-6000:]
            raise AssertionError(f"{name} still running {timeout:.0f} s after it was stopped:\n{tail}") from None

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait(timeout=30)
        for log in self._logs:
            log.close()


@contextmanager
def cluster(root: Path, model: Path, hosts: Sequence[str] = ("a", "b", "c")) -> Iterator[Cluster]:
    with Network(list(hosts)) as net:
        c = Cluster(net, root, model)
        try:
            yield c
        finally:
            c.close()
