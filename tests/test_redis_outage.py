"""Redis SIGKILLed and restarted on the same data in the middle of a stream of photos: every photo is
done exactly once, and the producer and workers ride it out by themselves."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from redis import Redis

from depthq.config import Config, load_config
from depthq.redis_server import EmbeddedRedis, free_port
from testkit.photos import write_jpeg
from testkit.waiting import wait_for
from tests.endstate import settle

PHOTOS = 200


def _config(url: str, inbox: Path, out: Path) -> Config:
    """What the processes run with, for the end-state check: the queue's name and the output folder."""
    return load_config(
        environ={}, overrides={"redis": {"url": url}, "producer": {"watch": str(inbox)}, "output": {"dir": str(out)}}
    )


def test_redis_killed_and_restarted_mid_stream(
    tmp_path: Path, tiny_model: Path, record_property: Callable[[str, object], None]
) -> None:
    data, inbox, out = tmp_path / "redis-data", tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    port = free_port()
    redis = EmbeddedRedis(data, port=port)
    redis.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
    env.update(
        DEPTHQ_REDIS_URL=redis.url,
        DEPTHQ_PRODUCER_WATCH=str(inbox),
        DEPTHQ_PRODUCER_SETTLE_MS="100",
        DEPTHQ_PRODUCER_RESCAN_S="5",
        DEPTHQ_OUTPUT_DIR=str(out),
        DEPTHQ_MODEL_PATH=str(tiny_model),
        DEPTHQ_MODEL_DEVICE="cpu",
        DEPTHQ_WORKER_DEAD_AFTER_S="10",
        DEPTHQ_WORKER_RETRY_BACKOFF_S="[1]",
    )
    config = _config(redis.url, inbox, out)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    for name, module in (("producer", "producer"), ("worker-a", "worker"), ("worker-b", "worker")):
        log = (tmp_path / f"{name}.log").open("wb")
        procs.append((name, subprocess.Popen([sys.executable, "-m", module], env=env, stdout=log, stderr=log)))
    try:
        wait_for(
            lambda: all("Listening on" in (tmp_path / f"{w}.log").read_text() for w in ("worker-a", "worker-b")),
            "both workers",
            120,
        )
        done = lambda: len(list(out.glob("*.json")))  # noqa: E731
        half = PHOTOS // 2
        for i in range(half):
            write_jpeg(inbox / f"{i:03d}.jpg", width=48, height=32, seed=i)
        wait_for(lambda: done() >= 20, "the stream to be under way", 120)
        redis.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        redis.process.wait()  # type: ignore[union-attr]
        assert done() < PHOTOS  # mid-stream: photos are queued, and more are coming
        for i in range(half, PHOTOS):  # they keep arriving while Redis is down
            write_jpeg(inbox / f"{i:03d}.jpg", width=48, height=32, seed=i)
        time.sleep(1)  # an outage of some length: the time Redis takes to come back is the point
        redis.start()  # same port, same append-only file
        wait_for(lambda: done() == PHOTOS, f"{PHOTOS} results (have {done()})", 240)
        with Redis.from_url(redis.url) as client:
            settle(config, client, log=tmp_path)  # while all still run: nothing left once the outage is over
    finally:
        for _, proc in procs:
            proc.send_signal(signal.SIGTERM)
        for name, proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                if name.startswith("worker"):
                    proc.send_signal(signal.SIGUSR1)  # its threads' stacks, into its log, to see where it is stuck
                    time.sleep(1)
                proc.kill()
        redis.stop()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name, _ in procs}
    computed = Counter(re.findall(r"worker\.job: (\d{3}\.jpg): depth", logs["worker-a"] + logs["worker-b"]))
    assert set(computed) == {f"{i:03d}.jpg" for i in range(PHOTOS)}
    twice = {name: n for name, n in computed.items() if n > 1}
    assert not twice, f"computed more than once: {twice}"
    assert not list(out.glob(".*.tmp"))
    # Every process noticed the outage, said so, and came back without a restart.
    assert all(proc.returncode == 0 for _, proc in procs), {n: p.returncode for n, p in procs}
    for name, text in logs.items():
        assert "redis unavailable" in text or "could not connect to Redis" in text, f"{name} never noticed"
    record_property("computed_per_worker", {n: logs[n].count(": depth ") for n in ("worker-a", "worker-b")})


pytestmark = pytest.mark.timeout(600)


def test_redis_at_maxmemory_is_waited_out_by_producer_and_workers(tmp_path: Path, tiny_model: Path) -> None:
    """noeviction at maxmemory: every write is refused. Nobody dies or reloads a model, each says so
    once and once more when it clears, and `depthq status` says why nothing moves."""
    from depthq.ops.status import gather

    data, inbox, out = tmp_path / "redis-data", tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    redis = EmbeddedRedis(data)
    redis.start()
    client = Redis.from_url(redis.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
    env.update(
        DEPTHQ_REDIS_URL=redis.url,
        DEPTHQ_PRODUCER_WATCH=str(inbox),
        DEPTHQ_PRODUCER_SETTLE_MS="100",
        DEPTHQ_OUTPUT_DIR=str(out),
        DEPTHQ_MODEL_PATH=str(tiny_model),
        DEPTHQ_MODEL_DEVICE="cpu",
        DEPTHQ_WORKER_DEAD_AFTER_S="10",
    )
    config = _config(redis.url, inbox, out)
    procs = {}
    for name in ("producer", "worker"):
        log = (tmp_path / f"{name}.log").open("wb")
        procs[name] = subprocess.Popen([sys.executable, "-m", name], env=env, stdout=log, stderr=log)
    logs = lambda: {n: (tmp_path / f"{n}.log").read_text() for n in procs}  # noqa: E731
    try:
        wait_for(lambda: "Listening on" in logs()["worker"] and "watching" in logs()["producer"], "both", 120)
        # Far past the limit: Redis leaves its AOF buffers out of the check, so a limit near used_memory
        # lets writes through again a moment later.
        client.set("ballast", b"\0" * (4 << 20))
        client.config_set("maxmemory", 1 << 20)
        for i in range(5):
            write_jpeg(inbox / f"{i}.jpg", seed=i)
        wait_for(lambda: all("Redis is full" in text for text in logs().values()), "both to notice Redis is full", 60)
        (alert,) = gather(client, config).alerts
        assert alert.startswith("Redis full:") and "noeviction" in alert
        time.sleep(5)  # some length of outage: many refusals, one line each, nobody gone
        assert all(proc.poll() is None for proc in procs.values()), logs()
        client.config_set("maxmemory", 0)
        wait_for(lambda: len(list(out.glob("*.jpg.json"))) == 5, f"the five photos (logs: {tmp_path})", 120)
        assert gather(client, config).alerts == [] and gather(client, config).taken == 0
        for name, text in logs().items():
            assert text.count("Redis is full") == 1, (name, text)
            assert text.count("Redis takes writes again") == 1, (name, text)
        assert logs()["worker"].count(" ready in ") == 1  # never restarted, never reloaded its model
        settle(config, client, log=tmp_path)
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        client.close()
        redis.stop()
