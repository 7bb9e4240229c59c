"""Clips through `depthq up` as a user runs it: a real subprocess, its own Redis, two real workers, and one
SIGKILLed in the middle of a chunk. The clip still completes, once."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import av
import numpy as np
import pytest
from rq.job import Job
from rq.registry import StartedJobRegistry

from depthq.config import load_config
from depthq.contract import SERIALIZER
from testkit.tiny_model import expected_depth
from testkit.waiting import wait_for
from tests.endstate import settle
from tests.faulty_backend import SOLID
from tests.test_supervisor import FAULTS, _ready, start_up, stop

FRAMES = 8


def write_solid_clip(path: Path, colour: str, frames: int, width: int = 64, height: int = 48) -> Path:
    """A clip of one solid colour: the faulty backend (tests/faulty_backend.py) acts on each of its frames."""
    staged = path.with_name("." + path.name + ".part")
    with av.open(str(staged), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            rgb = np.full((height, width, 3), SOLID[colour], np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    staged.rename(path)  # dropped whole, as a copy into the folder would be
    return path


def test_a_worker_sigkilled_mid_chunk_and_the_clip_still_completes_once(tmp_path: Path, tiny_model: Path) -> None:
    config = {
        "model": {"path": str(tiny_model), "device": "cpu"},
        "worker": {"retry_backoff_s": [0], "dead_after_s": 10},
        "producer": {"settle_ms": 200, "rescan_s": 3600},
        "video": {"chunk_frames": 4},
        "output": {"formats": ["exr"]},
        "up": {"workers": 2},
    }
    # Yellow frames take FAULT_SLEEP_S each in the model: a chunk runs long enough to be killed in.
    proc, log = start_up(tmp_path, config, env={**FAULTS, "FAULT_SLEEP_S": "1"})
    out = tmp_path / "depth-out"
    try:
        redis = _ready(proc, log, tmp_path, 2)
        settings = load_config(
            tmp_path / "config.yaml",
            overrides={"producer": {"watch": str(tmp_path / "inbox")}, "output": {"dir": str(out)}},
            environ={},
        )
        write_solid_clip(tmp_path / "inbox" / "slow.mp4", "yellow", FRAMES)

        def busy_chunk() -> Job | None:
            for jid in StartedJobRegistry(settings.queue.name, connection=redis).get_job_ids(cleanup=False):
                job = Job.fetch(jid, connection=redis, serializer=SERIALIZER)
                if "frame 1/" in str(job.get_meta(refresh=True).get("stage", "")):
                    return job
            return None

        wait_for(lambda: busy_chunk() is not None, f"a chunk job one frame in (log: {log})", timeout=120)
        chunk = busy_chunk()
        assert chunk is not None and chunk.worker_name
        pid = int(chunk.worker_name.rsplit(".", 1)[1])
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()

        sidecar = out / "slow.mp4.json"
        wait_for(lambda: sidecar.exists() or proc.poll() is not None, f"{sidecar} (log: {log})", timeout=240)
        print(f"clip done {time.monotonic() - killed:.1f} s after its chunk's worker was SIGKILLed")
        meta = json.loads(sidecar.read_text())
        assert meta["frames_computed"] == FRAMES
        frames = sorted((out / "slow.mp4.depth").iterdir())
        assert [f.name for f in frames] == [f"{k:06d}.exr" for k in range(1, FRAMES + 1)]
        assert meta["depth"]["min"] == meta["depth"]["max"] == pytest.approx(expected_depth(64, 48), rel=1e-6)
        # Settled first: the sidecar lands before the assemble job's own end is recorded in rq.
        settle(settings, redis, service=proc, log=log, timeout=120)
        # The killed chunk ran again; the assemble once.
        assemble = Job.fetch(meta["job_id"], connection=redis, serializer=SERIALIZER)
        assert len(assemble.results()) == 1
        assert log.read_text().count("slow.mp4: clip of 8 frames assembled") == 1
    finally:
        assert stop(proc) == 0
