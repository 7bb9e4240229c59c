"""A prediction that holds the GIL, as every coremltools prediction does (its bindings never release it).

While it runs no Python thread of the worker runs: not the heartbeat, not the hung-job limit. These
tests cause it for real on Linux, in real workers under `depthq up`: the faulty backend calls libc
through ctypes.PyDLL, which keeps the GIL, and says it holds the GIL as the Core ML backend does.
- a hang there is ended by the watchdog that needs no GIL (faulthandler's C thread), with the stack
  in the log, and the photo ends as an error file after worker.retries deaths;
- a prediction longer than worker.dead_after_s is not handed to the other worker meanwhile: it is
  computed once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from redis import Redis
from rq.job import Job

from depthq import attempts
from depthq.config import load_config
from depthq.contract import SERIALIZER
from testkit.photos import write_jpeg
from testkit.waiting import wait_for
from tests.endstate import settle
from tests.test_supervisor import FAULTS, _ready, solid_png, start_up, stop, worker_pids

DEAD_AFTER_S = 10


def _config(tiny_model: Path, job_timeout_s: int) -> dict:
    return {
        "model": {"path": str(tiny_model), "device": "cpu"},
        "worker": {"retries": 2, "retry_backoff_s": [0], "dead_after_s": DEAD_AFTER_S},
        "queue": {"job_timeout_s": job_timeout_s},
        "producer": {"settle_ms": 200, "rescan_s": 3600},
        "up": {"workers": 2},
    }


def _settle(
    root: Path, config: dict, redis: Redis, proc: subprocess.Popen[bytes], log: Path, bad: tuple[str, ...] = ()
) -> None:
    """The end state of the test's `depthq up`, read with the config it runs."""
    where = {"producer": {**config["producer"], "watch": root / "inbox"}, "output": {"dir": root / "depth-out"}}
    loaded = load_config(root / "config.yaml", overrides={**config, **where}, environ={})
    settle(loaded, redis, bad=bad, service=proc, log=log, timeout=120)


def test_a_hang_holding_the_gil_is_ended_by_the_watchdog_and_recorded(tmp_path: Path, tiny_model: Path) -> None:
    config = _config(tiny_model, job_timeout_s=3)
    proc, log = start_up(tmp_path, config, env={**FAULTS, "FAULT_HOLDS_GIL": "1"})
    inbox, out = tmp_path / "inbox", tmp_path / "depth-out"
    try:
        redis = _ready(proc, log, tmp_path, 2)
        dropped = time.monotonic()
        solid_png(inbox / "hang.png", "magenta")
        write_jpeg(inbox / "ok.jpg", seed=1)
        error = out / "hang.png.error.json"
        wait_for(lambda: error.exists() or proc.poll() is not None, f"{error} (log: {log})", timeout=300)
        took = time.monotonic() - dropped
        assert proc.poll() is None, log.read_text()
        text = log.read_text()
        # faulthandler's watchdog: the stack of the stuck call, then the exit the supervisor saw.
        assert "Timeout (0:00:" in text and "_deadlock" in text, text
        assert text.count("exited with code 1") >= 2, text
        recorded = json.loads(error.read_text())["error"]
        assert recorded["type"] == "worker_crashed", recorded
        assert "died in 2 attempts" in recorded["message"], recorded
        wait_for(lambda: (out / "ok.jpg.json").exists(), f"the good photo beside it ({log})")
        print(f"GIL-held hang to error file: {took:.1f} s (watchdog at 3 + 5 + {DEAD_AFTER_S} s a try)")
        _settle(tmp_path, config, redis, proc, log, bad=("hang.png",))
    finally:
        assert stop(proc) == 0, log.read_text()


def test_a_prediction_holding_the_gil_past_dead_after_s_is_computed_once(tmp_path: Path, tiny_model: Path) -> None:
    config = _config(tiny_model, job_timeout_s=120)
    held_s = 2.5 * DEAD_AFTER_S  # the other worker's maintenance runs every dead_after_s / 2 meanwhile
    proc, log = start_up(tmp_path, config, env={**FAULTS, "FAULT_HOLDS_GIL": "1", "FAULT_SLEEP_S": str(held_s)})
    inbox, out = tmp_path / "inbox", tmp_path / "depth-out"
    try:
        redis = _ready(proc, log, tmp_path, 2)
        solid_png(inbox / "long.png", "cyan")
        sidecar = out / "long.png.json"
        wait_for(lambda: sidecar.exists() or proc.poll() is not None, f"{sidecar} (log: {log})", timeout=180)
        assert proc.poll() is None, log.read_text()
        (key,) = redis.keys(attempts.attempts_key("depthq", "*"))  # the one photo's attempts
        record = redis.hgetall(key)
        assert record[b"started"] == b"1" and record[b"ended"] == b"1", record  # one attempt, no hand-over
        assert json.loads(sidecar.read_text())["timings_ms"]["inference"] >= held_s * 1000
        assert len(worker_pids(log)) == 2  # no worker died or was replaced
        _settle(tmp_path, config, redis, proc, log)
    finally:
        assert stop(proc) == 0, log.read_text()


def test_a_worker_killed_in_a_gil_held_prediction_has_its_job_handed_over_at_once(
    tmp_path: Path, tiny_model: Path
) -> None:
    """The announced hold would keep the job for job_timeout_s + 5 s + 2 x dead_after_s (145 s here);
    `depthq up` saw the death, so it marks the job abandoned and the other worker takes it at its next
    maintenance (every dead_after_s / 2)."""
    config = _config(tiny_model, job_timeout_s=120)
    held_s = 20
    proc, log = start_up(tmp_path, config, env={**FAULTS, "FAULT_HOLDS_GIL": "1", "FAULT_SLEEP_S": str(held_s)})
    inbox, out = tmp_path / "inbox", tmp_path / "depth-out"
    try:
        redis = _ready(proc, log, tmp_path, 2)
        solid_png(inbox / "long.png", "cyan")
        wait_for(lambda: bool(redis.keys(attempts.attempts_key("depthq", "*"))), "the photo's first attempt")
        (key,) = redis.keys(attempts.attempts_key("depthq", "*"))
        jid = key.decode().rsplit(":", 1)[1]
        wait_for(lambda: _stage(redis, jid) == "inferring", "the prediction to start")
        holder = int(Job.fetch(jid, connection=redis, serializer=SERIALIZER).worker_name.rsplit(".", 1)[1])
        os.kill(holder, signal.SIGKILL)
        # Bounded well below the announced hold: only the hand-over at the death gets there in time.
        wait_for(lambda: redis.hget(key, "started") == b"2", "the other worker to take the job up", timeout=60)
        wait_for(lambda: (out / "long.png.json").exists(), f"the photo done by the other worker ({log})", timeout=120)
        assert f"worker pid {holder} died in job {jid}" in log.read_text()
        _settle(tmp_path, config, redis, proc, log)
    finally:
        assert stop(proc) == 0, log.read_text()


def _stage(redis: Redis, jid: str) -> str | None:
    return Job.fetch(jid, connection=redis, serializer=SERIALIZER).get_meta(refresh=True).get("stage")
