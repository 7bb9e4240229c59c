"""`depthq up`'s supervisor, run for real: what it does when its workers cannot start, crash or stop.

Each test starts the real command in its own process group, with its own embedded redis-server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

DEPTHQ = Path(sys.executable).with_name("depthq")


def start_up(root: Path, config: dict, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    (root / "inbox").mkdir(exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"redis": {"data_dir": str(root / "redis-data")}, **config}))
    log = root / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
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
