"""Faults caused for real: worker processes killed and stopped mid-job, hostile jobs pushed into Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import PickleSerializer

from depthq.config import Config
from depthq.contract import SERIALIZER, make_queue
from producer.enqueue import Enqueuer
from tests.photos import write_jpeg
from tests.waiting import wait_for
from worker.backends import Backend
from worker.worker import build_worker

DEAD_AFTER_S = 10


def big_photo(path: Path) -> Path:
    """48 MP: a few seconds of real decoding and writing, long enough to kill a worker mid-job."""
    small = np.random.default_rng(0).integers(0, 255, (750, 1000, 3), dtype=np.uint8)
    Image.fromarray(small).resize((8000, 6000), Image.BILINEAR).save(path, quality=90)
    return path


@pytest.fixture
def spawn_worker(
    config: Config, tmp_path: Path, tiny_model: Path, redis_url: str
) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
    env.update(
        DEPTHQ_REDIS_URL=redis_url,
        DEPTHQ_PRODUCER_WATCH=str(config.producer.watch),
        DEPTHQ_OUTPUT_DIR=str(config.output.dir),
        DEPTHQ_MODEL_PATH=str(tiny_model),
        DEPTHQ_MODEL_DEVICE="cpu",
        DEPTHQ_WORKER_DEAD_AFTER_S=str(DEAD_AFTER_S),
        DEPTHQ_WORKER_RETRY_BACKOFF_S="[0]",
    )

    def spawn() -> subprocess.Popen[bytes]:
        log = (tmp_path / f"worker{len(procs)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config(worker={"dead_after_s": DEAD_AFTER_S, "retry_backoff_s": [0]})


def _started_by(redis_client: Redis, jid: str) -> str | None:
    job = Job.fetch(jid, connection=redis_client, serializer=SERIALIZER)
    return job.worker_name if job.get_status() == JobStatus.STARTED else None


def test_worker_killed_mid_job_is_recovered_by_another(
    config: Config, redis_client: Redis, spawn_worker, record_property: Callable[[str, object], None]
) -> None:
    photo = big_photo(config.producer.watch / "big.jpg")
    victim = spawn_worker()
    wait_for(lambda: bool(redis_client.keys("rq:worker:*")), "the first worker", 60)
    jid = Enqueuer(config, redis_client).submit(photo).job_id
    wait_for(lambda: _started_by(redis_client, jid) is not None, "the job to start", 60)
    rescuer = spawn_worker()
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    victim.wait()
    sidecar = config.output.dir / "big.jpg.json"
    wait_for(sidecar.exists, "the job to be completed by the other worker", 120)
    recovery_s = time.monotonic() - killed_at
    record_property("recovery_after_sigkill_s", round(recovery_s, 1))
    meta = json.loads(sidecar.read_text())
    assert meta["worker"]["name"].endswith(f".{rescuer.pid}")
    outputs = sorted(p.name for p in config.output.dir.iterdir())
    assert outputs == ["big.jpg.depth.npy", "big.jpg.json", "big.jpg.preview.png"]  # one set, no temp files
    assert np.load(config.output.dir / "big.jpg.depth.npy").shape == (6000, 8000)
    assert Job.fetch(jid, connection=redis_client, serializer=SERIALIZER).get_status() == JobStatus.FINISHED


def test_sigterm_mid_job_finishes_the_job_then_exits(config: Config, redis_client: Redis, spawn_worker) -> None:
    photo = big_photo(config.producer.watch / "big.jpg")
    worker = spawn_worker()
    wait_for(lambda: bool(redis_client.keys("rq:worker:*")), "the worker", 60)
    jid = Enqueuer(config, redis_client).submit(photo).job_id
    wait_for(lambda: _started_by(redis_client, jid) is not None, "the job to start", 60)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=120) == 0
    assert (config.output.dir / "big.jpg.json").exists()  # warm shutdown: the job in hand completed
    assert Job.fetch(jid, connection=redis_client, serializer=SERIALIZER).get_status() == JobStatus.FINISHED


def test_pickled_job_pushed_by_hand_is_refused_unrun(
    config: Config, redis_client: Redis, tmp_path: Path, tiny_model: Path
) -> None:
    from depthq.config import load_config
    from worker.worker import load_backend

    backend: Backend = load_backend(load_config(environ={}, overrides={"model": {"path": str(tiny_model)}}))[0]
    marker = tmp_path / "pwned"
    hostile = Queue(config.queue.name, connection=redis_client, serializer=PickleSerializer)
    job = hostile.enqueue(Path.touch, marker)
    good = write_jpeg(config.producer.watch / "after.jpg")
    Enqueuer(config, redis_client).submit(good)
    build_worker(config, redis_client, backend).work(burst=True)
    assert not marker.exists()
    assert (config.output.dir / "after.jpg.json").exists()  # the worker kept serving
    assert job.id in make_queue(redis_client, config).failed_job_registry.get_job_ids()
    assert "DeserializationError" in (job.latest_result().exc_string or "")
