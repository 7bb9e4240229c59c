"""`depthq up` as a user runs it: a real subprocess with its own redis-server, photos dropped into the folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq import Queue, Worker

from depthq.config import Config, load_config
from depthq.redis_server import free_port
from testkit.photos import write_jpeg
from testkit.tiny_model import expected_depth
from testkit.waiting import wait_for
from tests.endstate import settle

pillow_heif.register_heif_opener()  # to write the HEIC test photo


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    root: Path
    inbox: Path
    out: Path
    log: Path
    redis: Redis
    producer_metrics: int
    worker_metrics: int
    config: Config
    bad: set[str] = field(default_factory=set)  # the bad inputs dropped so far: their jobs fail, as they should

    def settle(self) -> None:
        """How each test ends: the service settled, still up, nothing failed but the bad inputs."""
        settle(self.config, self.redis, bad=self.bad, service=self.proc, log=self.log)

    def sidecar(self, rel: str) -> dict:
        path = self.out / (rel + ".json")
        wait_for(path.exists, f"{path} (log: {self.log})")
        return json.loads(path.read_text())

    def depth(self, rel: str) -> np.ndarray:
        self.sidecar(rel)  # written last: once it is there, the whole set is
        return np.load(self.out / (rel + ".depth.npy"))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("up")
    inbox, out = root / "inbox", root / "depth-out"
    producer_metrics, worker_metrics = free_port(), free_port()
    (root / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "redis": {"data_dir": str(root / "redis-data")},
                "producer": {"settle_ms": 300, "rescan_s": 3600, "metrics_port": producer_metrics},
                "worker": {"metrics_port": worker_metrics},
                "model": {"path": str(tiny_model), "device": "cpu"},
            }
        )
    )
    inbox.mkdir()
    write_jpeg(inbox / "before-start.jpg", width=50, height=40, seed=99)
    log = root / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
    depthq = Path(sys.executable).with_name("depthq")
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [str(depthq), "up", "--watch", "inbox", "--output", "depth-out"],
            cwd=root,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal would give it
        )
    url_file = root / "redis-data" / "redis.url"
    wait_for(lambda: url_file.exists() or proc.poll() is not None, "the embedded redis")
    assert proc.poll() is None, log.read_text()
    redis = Redis.from_url(url_file.read_text().strip())
    wait_for(lambda: len(Worker.all(connection=redis)) == 1, f"a registered worker (log: {log})")
    config = load_config(
        root / "config.yaml", overrides={"producer": {"watch": str(inbox)}, "output": {"dir": str(out)}}, environ={}
    )
    yield Service(proc, root, inbox, out, log, redis, producer_metrics, worker_metrics, config)
    if proc.poll() is None:  # a test failed before the shutdown test: still stop it all cleanly
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_photo_present_before_start_is_processed(service: Service) -> None:
    meta = service.sidecar("before-start.jpg")
    np.testing.assert_allclose(service.depth("before-start.jpg"), expected_depth(50, 40), rtol=1e-5)
    assert meta["focal_length_source"] == "model"
    service.settle()


def test_worker_name_shows_host_backend_and_pid(service: Service) -> None:
    (worker,) = Worker.all(connection=service.redis)
    host, backend, pid = worker.name.rsplit(".", 2)
    assert backend == "torch" and pid.isdigit() and host
    service.settle()


def test_dropped_photos_of_every_kind(service: Service) -> None:
    inbox = service.inbox
    write_jpeg(inbox / "exif.jpg", width=90, height=60, focal_35mm=26, seed=1)
    write_jpeg(inbox / "rotated.jpg", width=64, height=48, orientation=6, seed=2)
    heic = Image.fromarray(np.full((40, 56, 3), 120, np.uint8))
    heic.save(inbox / "IMG_1.HEIC", format="HEIF")
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (30, 40, 4), dtype=np.uint8), "RGBA").save(
        inbox / "alpha.png"
    )
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (30, 20), dtype=np.uint8), "L").save(inbox / "grey.png")
    nested = inbox / "2026" / "trip" / "day 1"
    nested.mkdir(parents=True)
    write_jpeg(nested / "deep.jpg", width=40, height=40, seed=5)
    odd_name = unicodedata.normalize("NFC", "my photo é ü 日本.jpg")
    write_jpeg(inbox / odd_name, width=48, height=32, seed=6)

    meta = service.sidecar("exif.jpg")
    assert meta["focal_length_source"] == "exif"
    np.testing.assert_allclose(service.depth("exif.jpg"), expected_depth(90, 60, 26), rtol=1e-5)

    meta = service.sidecar("rotated.jpg")  # orientation 6: stored 64x48, seen upright as 48x64
    assert (meta["width"], meta["height"]) == (48, 64)
    assert service.depth("rotated.jpg").shape == (64, 48)
    np.testing.assert_allclose(service.depth("rotated.jpg"), expected_depth(48, 64), rtol=1e-5)

    assert service.sidecar("IMG_1.HEIC")["width"] == 56
    assert (service.out / "IMG_1.HEIC.preview.png").exists()
    assert service.depth("IMG_1.HEIC").shape == (40, 56)
    assert service.depth("alpha.png").shape == (30, 40)
    assert service.depth("grey.png").shape == (30, 20)
    assert service.sidecar("2026/trip/day 1/deep.jpg")["source"] == "2026/trip/day 1/deep.jpg"
    assert service.sidecar(odd_name)["source"] == odd_name
    service.settle()


def test_slow_writer_is_enqueued_once_after_it_finishes(service: Service, tmp_path: Path) -> None:
    data = write_jpeg(tmp_path / "slow.jpg", width=120, height=90, seed=7).read_bytes()
    target = service.inbox / "slow.jpg"
    chunks = [data[i : i + len(data) // 10 + 1] for i in range(0, len(data), len(data) // 10 + 1)]
    with target.open("wb") as f:  # like a network copy: one open file, growing for a while
        for chunk in chunks:
            f.write(chunk)
            f.flush()
            time.sleep(0.25)  # the writer's pace; the producer must wait it out
    meta = service.sidecar("slow.jpg")
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert not (service.out / "slow.jpg.error.json").exists()
    service.settle()


def test_part_file_renamed_into_place(service: Service) -> None:
    part = write_jpeg(service.inbox / "download.jpg.part", width=30, height=30, seed=8)
    part.rename(service.inbox / "download.jpg")
    assert service.sidecar("download.jpg")["source"] == "download.jpg"
    assert not (service.out / "download.jpg.part.json").exists()
    service.settle()


def test_duplicate_copy_is_computed_once(service: Service) -> None:
    original = write_jpeg(service.inbox / "orig.jpg", width=33, height=22, seed=9)
    shutil.copyfile(original, service.inbox / "orig copy.jpg")
    a, b = service.sidecar("orig.jpg"), service.sidecar("orig copy.jpg")
    # Whichever way the copy was seen (an alias of the pending job, or a copy of the stored result),
    # one of the two was computed and the other copied from it.
    computed = [m for m in (a, b) if "copied_from" not in m]
    copied = [m for m in (a, b) if "copied_from" in m]
    assert len(computed) == 1 and len(copied) == 1
    assert copied[0]["copied_from"] == computed[0]["source"]
    assert copied[0]["timings_ms"]["inference"] == 0.0 or copied[0]["job_id"] == computed[0]["job_id"]
    np.testing.assert_array_equal(service.depth("orig.jpg"), service.depth("orig copy.jpg"))
    service.settle()


def test_corrupt_file_gets_an_error_and_the_worker_keeps_serving(service: Service) -> None:
    service.bad.add("corrupt.jpg")
    (service.inbox / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    error_file = service.out / "corrupt.jpg.error.json"
    wait_for(error_file.exists, "corrupt.jpg.error.json")
    error = json.loads(error_file.read_text())
    assert error["error"]["type"] == "bad_input" and "corrupt.jpg" in error["error"]["message"]
    write_jpeg(service.inbox / "after-corrupt.jpg", seed=10)
    assert service.sidecar("after-corrupt.jpg")["source"] == "after-corrupt.jpg"
    assert service.proc.poll() is None
    service.settle()


def test_twenty_photos_drop_to_json(service: Service, record_property: Callable[[str, object], None]) -> None:
    dropped: dict[str, float] = {}
    for i in range(20):
        name = f"batch/{i:02d}.jpg"
        write_jpeg(service.inbox / name, width=64, height=48, seed=100 + i)
        dropped[name] = time.time()
    latencies = []
    for name, t in dropped.items():
        service.sidecar(name)
        latencies.append((service.out / (name + ".json")).stat().st_mtime - t)
    record_property("drop_to_json_s", {"max": max(latencies), "median": float(np.median(latencies))})
    assert len(latencies) == 20
    service.settle()


def _scrape(port: int) -> dict[str, float]:
    """Every sample on a /metrics page, keyed like `name{label="value",...}`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_status_and_metrics_of_the_running_service(service: Service) -> None:
    """`depthq status` (finding the embedded Redis itself) and both /metrics pages, once the worker is idle."""
    for i in range(3):
        write_jpeg(service.inbox / "status" / f"{i}.jpg", width=48, height=32, seed=300 + i)
    service.bad.add("status/broken.jpg")
    (service.inbox / "status" / "broken.jpg").write_bytes(b"not a photo")
    for i in range(3):
        service.sidecar(f"status/{i}.jpg")
    wait_for((service.out / "status" / "broken.jpg.error.json").exists, "the broken photo's error file")
    queue = Queue("depthq", connection=service.redis)

    def idle() -> bool:
        workers = Worker.all(connection=service.redis)
        return queue.count == 0 and queue.started_job_registry.count == 0 and workers[0].get_state() == "idle"

    wait_for(idle, "an idle worker and an empty queue")
    depthq = Path(sys.executable).with_name("depthq")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
    run = subprocess.run([str(depthq), "status", "--json"], cwd=service.root, env=env, capture_output=True, check=True)
    status = json.loads(run.stdout)
    (worker,) = status["workers"]
    assert worker["backend"] == "torch" and worker["device"] == "cpu" and worker["state"] == "idle"
    last_hour = status["windows"][1]
    assert last_hour["minutes"] == 60 and last_hour["done"] >= 3 and last_hour["total_p95_s"] > 0
    assert status["queued"] == 0 and status["failed"] >= 1  # the broken photo
    table = subprocess.run(
        [str(depthq), "status"], cwd=service.root, env={**env, "COLUMNS": "120"}, capture_output=True, check=True
    ).stdout.decode()
    assert "throughput and latency" in table and "torch" in table
    if os.environ.get("TEST_ARTIFACTS"):
        artifacts = Path(os.environ["TEST_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        (artifacts / "status.txt").write_text(table)

    host = worker["host"]
    w = _scrape(service.worker_metrics)
    labels = f'backend="torch",host="{host}"'
    assert w[f"depthq_jobs_done_total{{{labels}}}"] == last_hour["done"]
    assert w[f"depthq_total_seconds_count{{{labels}}}"] == last_hour["done"]
    assert w[f"depthq_jobs_failed_total{{{labels}}}"] >= 1
    assert w[f'depthq_model_loaded{{{labels},model="{worker["model"]}"}}'] == 1
    assert w['depthq_queue_depth{queue="depthq"}'] == 0
    p = _scrape(service.producer_metrics)
    assert p['depthq_producer_files_total{outcome="enqueued"}'] >= 4
    assert p["depthq_producer_watching{}"] == 1
    assert p['depthq_queue_depth{queue="depthq"}'] == 0
    service.settle()


def test_a_worker_that_dies_is_restarted(service: Service) -> None:
    (old,) = Worker.all(connection=service.redis)
    os.kill(old.pid, signal.SIGKILL)
    wait_for(
        lambda: any(w.name != old.name for w in Worker.all(connection=service.redis)),
        f"a restarted worker (log: {service.log})",
    )
    write_jpeg(service.inbox / "after-restart.jpg", seed=11)
    assert service.sidecar("after-restart.jpg")["worker"]["name"] != old.name
    service.settle()


def test_ctrl_c_stops_everything_cleanly(service: Service) -> None:
    service.settle()  # before the stop: its Redis goes with it
    os.killpg(service.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    assert service.proc.wait(timeout=60) == 0, service.log.read_text()
    assert not (service.root / "redis-data" / "redis.url").exists()
    log = service.log.read_text()
    assert "warm shut down requested" in log
    assert "Traceback" not in log, log
    assert (service.root / "redis-data" / "appendonlydir").is_dir() or list((service.root / "redis-data").glob("*.aof"))
