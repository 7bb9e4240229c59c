"""`depthq up`'s supervisor, run for real: what it does when its workers cannot start, crash or stop.

Each test starts the real command in its own process group, with its own embedded redis-server.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from PIL import Image
from redis import Redis
from redis.exceptions import RedisError

from testkit.photos import write_jpeg
from testkit.waiting import wait_for

DEPTHQ = Path(sys.executable).with_name("depthq")


def start_up(
    root: Path, config: dict, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    (root / "inbox").mkdir(exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"redis": {"data_dir": str(root / "redis-data")}, **config}))
    log = root / f"up{len(list(root.glob('up*.log')))}.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}, **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(DEPTHQ), "up", "--watch", "inbox", "--output", "depth-out", *args],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log


def test_a_worker_that_can_never_start_stops_depthq_up_with_its_message(tmp_path: Path) -> None:
    """model.path naming no folder, offline: the worker exits 2, and up stops rather than loop forever."""
    config = {"model": {"path": str(tmp_path / "no-such-model"), "offline": True, "device": "cpu"}}
    proc, log = start_up(tmp_path, config)
    try:
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 2, text
    assert text.count("started (pid") == 1, text  # never restarted
    assert "model.path" in text and "cannot start: a config or model error" in text
    assert not (tmp_path / "redis-data" / "redis.url").exists()  # its Redis was stopped too


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no network"])
def test_the_first_start_offline_says_how_to_point_at_a_model(tmp_path: Path, offline: str) -> None:
    """No network, no model here: stderr names the flag, the variable and the key, in depthq's words
    (not the hub library's advice), says so before "stopped", and up exits with the final code."""
    from depthq.redis_server import free_port

    (tmp_path / "inbox").mkdir()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"redis": {"data_dir": str(tmp_path / "redis-data")}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEPTHQ_", "HF_"))}
    if offline == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    else:  # a hub that refuses the connection: what a machine without network gets
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty hub cache too
    result = subprocess.run(
        [str(DEPTHQ), "up", "--watch", "inbox", "--output", "depth-out"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    err = result.stderr
    assert result.returncode == 2, err  # EXIT_FINAL: a worker that can never start
    assert "`depthq up --model DIR`" in err and "DEPTHQ_MODEL_PATH=DIR" in err and "model.path" in err, err
    assert ("HF_HUB_OFFLINE is set" if offline == "HF_HUB_OFFLINE" else "the download failed: no network") in err
    for theirs in ("internet connection", "HF_HUB_OFFLINE=0", "outgoing traffic", "snapshot folder"):
        assert theirs not in err, err
    cause, stopped = err.index("cannot start: a config or model error"), err.index("depthq.supervisor: stopped")
    assert err.index("model.path: apple/DepthPro-hf is not in") < cause < stopped, err


# --- photos that kill their worker --------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
FAULTS = {"PYTHONPATH": f"{REPO / 'tests' / 'faults'}{os.pathsep}{REPO}"}


def solid_png(path: Path, colour: str) -> Path:
    from PIL import Image

    from tests.faulty_backend import SOLID

    Image.new("RGB", (64, 48), SOLID[colour]).save(path)
    return path


def worker_pids(log: Path) -> list[int]:
    return [int(m) for m in re.findall(r"worker \d+ started \(pid (\d+)\)", log.read_text())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_photos_that_crash_or_hang_their_worker_end_as_error_files(tmp_path: Path, tiny_model: Path) -> None:
    """A photo that segfaults its worker, and one that deadlocks it inside C: after worker.retries
    deaths each gets an error file naming why, the others are done meanwhile, depthq up never exits,
    and a restart sends neither again."""
    config = {
        "model": {"path": str(tiny_model), "device": "cpu"},
        "worker": {"retries": 2, "retry_backoff_s": [0], "dead_after_s": 10},
        "queue": {"job_timeout_s": 5},
        "producer": {"settle_ms": 200, "rescan_s": 3600},
        "up": {"workers": 2},
    }
    proc, log = start_up(tmp_path, config, env=FAULTS)
    inbox, out = tmp_path / "inbox", tmp_path / "depth-out"
    try:
        dropped = time.monotonic()
        solid_png(inbox / "segv.png", "red")
        solid_png(inbox / "hang.png", "blue")
        for i in range(3):
            write_jpeg(inbox / f"ok{i}.jpg", seed=i)
        outcomes = {}
        for name, kind in (("segv.png", "error"), ("hang.png", "error"), *((f"ok{i}.jpg", "json") for i in range(3))):
            path = out / (name + (".error.json" if kind == "error" else ".json"))
            wait_for(lambda p=path: p.exists() or proc.poll() is not None, f"{path} (log: {log})", timeout=300)
            assert proc.poll() is None, log.read_text()
            outcomes[name] = time.monotonic() - dropped
        segv = json.loads((out / "segv.png.error.json").read_text())["error"]
        hang = json.loads((out / "hang.png.error.json").read_text())["error"]
        assert segv["type"] == "worker_crashed"
        assert "died in 2 attempts" in segv["message"] and segv["message"].count("killed by SIGSEGV") == 2
        assert hang["type"] == "timed_out"
        assert "queue.job_timeout_s (5 s) in 2 attempts" in hang["message"] and "timed out after" in hang["message"]
        print(f"fault to error file: SIGSEGV {outcomes['segv.png']:.1f} s, C deadlock {outcomes['hang.png']:.1f} s")
        assert proc.poll() is None
        # Two workers, restarted after each of the four deaths. The last restart may follow the last
        # error file: a dead worker's job is handed over at once, and its restart waits its back-off.
        wait_for(lambda: len(worker_pids(log)) >= 2 + 4, f"a worker restarted after each death ({log})", 60)
        first_pids = worker_pids(log)
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()
    assert not any(alive(pid) for pid in first_pids)

    # Started again, it sends neither photo again: they are recorded, and unchanged.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.error.json")}
    proc, log = start_up(tmp_path, config, env=FAULTS)
    try:
        write_jpeg(inbox / "after-restart.jpg", seed=9)
        wait_for(lambda: (out / "after-restart.jpg.json").exists(), f"the photo dropped after the restart ({log})")
        assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.error.json")} == stamps
        assert "segv.png" not in log.read_text() and "hang.png" not in log.read_text()
    finally:
        assert stop(proc) == 0


# --- depthq up killed -----------------------------------------------------------------------------------


def _ready(proc: subprocess.Popen[bytes], log: Path, root: Path, workers: int) -> Redis:
    """The Redis of this depthq up once its workers are ready (from its own log: the data folder may
    hold a killed run's files, and Redis its worker records)."""
    wait_for(
        lambda: log.read_text().count(" ready in ") == workers or proc.poll() is not None,
        f"{workers} ready worker(s) (log: {log})",
        timeout=180,
    )
    assert proc.poll() is None, log.read_text()
    return Redis.from_url((root / "redis-data" / "redis.url").read_text().strip())


def test_depthq_up_sigkilled_leaves_no_process_and_the_next_one_starts_with_nothing_lost(
    tmp_path: Path, tiny_model: Path
) -> None:
    config = {"model": {"path": str(tiny_model), "device": "cpu"}, "up": {"workers": 2}}
    proc, log = start_up(tmp_path, config)
    redis = _ready(proc, log, tmp_path, 2)
    redis_pid = int(redis.info("server")["process_id"])
    redis.set("kept", "across the kill")
    pids = [redis_pid, *worker_pids(log)]
    proc.kill()
    proc.wait()
    killed = time.monotonic()
    wait_for(lambda: not any(alive(pid) for pid in pids), "its Redis and workers to go", timeout=120)
    print(f"depthq up SIGKILLed: its Redis and 2 workers gone {time.monotonic() - killed:.1f} s later")

    proc, log = start_up(tmp_path, config)
    try:
        redis = _ready(proc, log, tmp_path, 2)
        assert redis.get("kept") == b"across the kill"  # the AOF was flushed as Redis went
    finally:
        assert stop(proc) == 0


def test_a_redis_left_by_a_dead_depthq_up_is_taken_over_and_a_live_ones_refused(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Where the kernel does not stop it (macOS), the Redis of a SIGKILLed depthq up lives on.

    The new depthq up runs a real model: one that cannot load ends it (exit 2), and its Redis with
    it, at once since the offline message skips the hub, before the test could read the orphan's data."""
    from depthq.redis_server import EmbeddedRedis

    data = tmp_path / "redis-data"
    orphan = EmbeddedRedis(data)
    orphan.start()
    try:
        (data / "redis.url").write_text(orphan.url + "\n")
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        (data / "redis.owner").write_text(f"{gone.pid}\n")
        Redis.from_url(orphan.url).set("kept", "by the orphan")

        config = {"model": {"path": str(tiny_model), "device": "cpu"}, "up": {"workers": 1}}
        proc, log = start_up(tmp_path, config)
        redis = None
        try:
            wait_for(lambda: orphan.process.poll() is not None or proc.poll() is not None, f"the takeover ({log})")
            assert orphan.process.returncode == 0  # SHUTDOWN: a clean exit, its AOF flushed
            wait_for(lambda: "redis-server" in log.read_text() and (data / "redis.url").exists(), "a new Redis")
            redis = Redis.from_url((data / "redis.url").read_text().strip())
            wait_for(lambda: redis.get("kept") == b"by the orphan", f"the orphan's data in the new Redis ({log})")
            assert "left by a depthq up that is gone" in log.read_text()

            second, second_log = start_up(tmp_path, {"up": {"workers": 1}})
            assert second.wait(timeout=120) == 2
            assert "another depthq up already runs a Redis" in second_log.read_text()
        finally:
            proc.kill()
            proc.wait()
    finally:
        orphan.stop()


def test_a_stopped_worker_is_noticed_then_replaced(tmp_path: Path, tiny_model: Path) -> None:
    """poll() says a SIGSTOPped process runs; the supervisor looks at its state instead."""
    config = {"model": {"path": str(tiny_model), "device": "cpu"}, "worker": {"dead_after_s": 10}}
    proc, log = start_up(tmp_path, config)
    try:
        _ready(proc, log, tmp_path, 1)
        (stopped,) = worker_pids(log)
        os.kill(stopped, signal.SIGSTOP)
        wait_for(lambda: f"(pid {stopped}) is stopped" in log.read_text(), f"the supervisor to notice ({log})")
        wait_for(lambda: len(worker_pids(log)) == 2, f"a replacement worker ({log})", timeout=120)
        assert not alive(stopped)
        assert f"worker 0 (pid {stopped}) stopped for" in log.read_text()
        wait_for(lambda: log.read_text().count(" ready in ") == 2, f"the replacement to be ready ({log})")
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0


# --- its Redis killed ---------------------------------------------------------------------------------


def test_its_redis_killed_is_restarted_on_the_same_port_with_its_data(tmp_path: Path, tiny_model: Path) -> None:
    """depthq up neither restarted its Redis nor said a word when it was SIGKILLed: the dead server
    stayed a zombie, nothing was processed, and a stop took job_timeout_s + 30 s."""
    config = {
        "model": {"path": str(tiny_model), "device": "cpu"},
        "producer": {"settle_ms": 200, "rescan_s": 3600},
        "worker": {"dead_after_s": 10},
    }
    proc, log = start_up(tmp_path, config)
    inbox, out = tmp_path / "inbox", tmp_path / "depth-out"
    try:
        redis = _ready(proc, log, tmp_path, 1)
        url = (tmp_path / "redis-data" / "redis.url").read_text().strip()
        write_jpeg(inbox / "before.jpg", seed=1)
        wait_for(lambda: (out / "before.jpg.json").exists(), f"a photo done before the kill ({log})")
        redis.set("kept", "across the kill")
        old = psutil.Process(int(redis.info("server")["process_id"]))
        old.kill()
        killed = time.monotonic()
        wait_for(lambda: "is back on" in log.read_text(), f"the restart to be logged ({log})")
        print(f"embedded Redis SIGKILLed: back {time.monotonic() - killed:.1f} s later")
        text = log.read_text()
        assert f"the embedded redis-server on {url} killed by SIGKILL; restarting it with its data" in text
        assert (tmp_path / "redis-data" / "redis.url").read_text().strip() == url  # the same port
        assert not old.is_running() or old.status() != psutil.STATUS_ZOMBIE  # reaped
        redis = Redis.from_url(url)
        wait_for(lambda: _answers(redis) and redis.get("kept") == b"across the kill", "its data, back from the AOF")
        write_jpeg(inbox / "after.jpg", seed=2)
        wait_for(lambda: (out / "after.jpg.json").exists(), f"a photo dropped after the restart ({log})", 120)
        assert proc.poll() is None
        stopping = time.monotonic()
    finally:
        code = stop(proc)
    print(f"and stopped {time.monotonic() - stopping:.1f} s after SIGTERM")
    assert code == 0, log.read_text()


def _answers(redis: Redis) -> bool:
    try:
        return bool(redis.ping())
    except RedisError:
        return False


def test_depthq_up_sigkilled_with_busy_workers_leaves_no_process_soon(tmp_path: Path, tiny_model: Path) -> None:
    """Its workers waited out the job timeout for a Redis that had gone with depthq up (28-34 s with
    a 25 s timeout, 10 minutes with the default); a worker whose Redis went too stops at once now."""
    config = {
        "model": {"path": str(tiny_model), "device": "cpu"},
        "producer": {"settle_ms": 200, "rescan_s": 3600},
        "queue": {"job_timeout_s": 120},
        "up": {"workers": 2},
    }
    proc, log = start_up(tmp_path, config, env={**FAULTS, "FAULT_SLEEP_S": "60"})
    try:
        redis = _ready(proc, log, tmp_path, 2)
        pids = [int(redis.info("server")["process_id"]), *worker_pids(log)]
        for i in range(2):  # a minute in the model each; one pixel apart, so not copies of each other
            with Image.open(solid_png(tmp_path / "inbox" / f".slow{i}.png", "yellow")) as image:
                image.putpixel((0, 0), (255, 255, i))
                image.save(tmp_path / "inbox" / f"slow{i}.png")
        wait_for(lambda: _busy(redis) == 2, f"both workers busy ({log})", 60)
    finally:
        proc.kill()  # what the test is about; and on its failure, nothing of this service is left running
        proc.wait()
    killed = time.monotonic()
    wait_for(lambda: not any(alive(pid) for pid in pids), "its Redis and both busy workers to go", timeout=150)
    gone_s = time.monotonic() - killed
    print(f"depthq up SIGKILLed with 2 busy workers: all gone {gone_s:.1f} s later (job_timeout_s 120)")
    assert "its Redis is gone too" in log.read_text()


def _busy(redis: Redis) -> int:
    """Workers busy with a job (rq's worker hashes; their per-worker sets are left out)."""
    return sum(redis.hget(key, "state") == b"busy" for key in redis.keys("rq:worker:*") if key.count(b":") == 2)


# --- the other commands on its machine ---------------------------------------------------------------


def _depthq(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A depthq command run as from a second shell: none of the DEPTHQ_ variables, nor the flags, that
    started depthq up; only the folder's config.yaml."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
    return subprocess.run(
        [str(DEPTHQ), *args], cwd=root, env=env, capture_output=True, text=True, timeout=180, check=False
    )


def test_commands_in_another_shell_use_the_settings_depthq_up_runs_with(tmp_path: Path, tiny_model: Path) -> None:
    """`depthq up --model DIR --watch photos --output results` in one shell; doctor and enqueue in
    another knew none of it: doctor failed the hub model, and enqueue made jobs asking for it."""
    from rq.job import Job

    from depthq.contract import SERIALIZER, job_id

    config = {
        "model": {"device": "cpu"},
        # Only `depthq enqueue` makes jobs here: the watcher looks again only in an hour.
        "producer": {"polling": True, "poll_interval_s": 3600, "rescan_s": 3600},
    }
    (tmp_path / "photos").mkdir()
    proc, log = start_up(tmp_path, config, "--model", str(tiny_model), "--watch", "photos", "--output", "results")
    record = tmp_path / "redis-data" / "up.json"
    try:
        redis = _ready(proc, log, tmp_path, 1)
        assert json.loads(record.read_text())["pid"] == proc.pid

        doctor = _depthq(tmp_path, "doctor")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "0 failed, 0 warning(s)" in doctor.stdout, doctor.stdout
        (settings,) = [line for line in doctor.stdout.splitlines() if line.startswith("ok    settings")]
        assert f"those of the running depthq up (pid {proc.pid}, started " in settings
        assert "for model.path, producer.watch, output.dir, from " in settings and "redis-data/up.json" in settings
        assert f"ok    model     {tiny_model} loaded on cpu" in doctor.stdout

        photo = write_jpeg(tmp_path / "photos" / "a.jpg", seed=4)
        enqueued = _depthq(tmp_path, "enqueue", "--force", "photos/a.jpg")
        assert enqueued.returncode == 0 and "1 enqueued" in enqueued.stdout, enqueued.stdout + enqueued.stderr
        sha = hashlib.sha256(photo.read_bytes()).hexdigest()
        job = Job.fetch(job_id(sha, str(tiny_model)), connection=redis, serializer=SERIALIZER)
        assert job.args[0]["model"] == str(tiny_model) and job.args[0]["source"] == "a.jpg"
        assert not redis.exists(Job.key_for(job_id(sha, "apple/DepthPro-hf")))
        sidecar = tmp_path / "results" / "a.jpg.json"
        wait_for(sidecar.exists, f"the result in up's output folder ({log})", timeout=120)
        meta = json.loads(sidecar.read_text())
        assert "requested" not in meta["model"] and not meta.get("warnings"), meta

        # A copy of it, enqueued later: the same job, so copied rather than computed again.
        (tmp_path / "photos" / "b.jpg").write_bytes(photo.read_bytes())
        copied = _depthq(tmp_path, "enqueue", "photos/b.jpg")
        assert "1 copy" in copied.stdout, copied.stdout + copied.stderr
        saved = record.read_text()
    finally:
        assert stop(proc) == 0, log.read_text()
    assert not record.exists()  # stopped: no command takes its settings any more

    # A record left by a depthq up that is gone (SIGKILL) is not trusted: its pid is dead.
    record.write_text(saved)
    after = _depthq(tmp_path, "doctor", "--no-model")
    (settings,) = [line for line in after.stdout.splitlines() if line.startswith("ok    settings")]
    assert f"is ignored: the depthq up that wrote it (pid {proc.pid}, started " in settings and "is gone" in settings
    assert f"producer.watch {tmp_path / 'photos'}" not in after.stdout  # its own default, inbox
