"""Clips over the redis transport: the producer sends each chunk its own packets through Redis, a worker
with no disk at all computes them and sends each frame's depth back, and the collector stages them and
assembles the clip on the producer's host, in a child process (`depthq assemble-clip`).

Real Redis, the real Enqueuer, a real burst worker (tiny DepthPro) on a host whose folders do not exist,
the real collector; each test ends with the end state (tests/endstate.py) and no staging folder left.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import OpenEXR
import pytest
from redis import Redis
from rq.job import Job

from depthq.config import Config
from depthq.contract import SERIALIZER, file_sha256, inflight_key
from producer.collector import Collector
from producer.enqueue import Enqueuer
from testkit.clips import write_audio_only_clip, write_clip
from testkit.tiny_model import FOV_DEG, expected_depth
from tests.endstate import assert_end_state
from worker.worker import build_worker


@pytest.fixture
def producer_config(make_config: Callable[..., Config]) -> Config:
    return make_config(
        transport={"mode": "redis"},
        worker={"retry_backoff_s": [0]},
        video={"chunk_frames": 4},
        output={"formats": ["exr"]},
    )


def _collect(config: Config, redis: Redis) -> int:
    collector = Collector(config, redis)
    total = 0
    while n := collector.collect_new():
        total += n
    return total


def _run(producer: Config, worker: Config, redis: Redis, backend: Any) -> None:
    """A worker until the queue is empty, then the collector until the stream is."""
    build_worker(worker, redis, backend).work(burst=True, with_scheduler=False)
    _collect(producer, redis)


def _exr(path: Path) -> np.ndarray:
    with OpenEXR.File(str(path)) as exr:
        return np.asarray(exr.channels()["Z"].pixels)


def test_a_clip_travels_through_redis_and_is_assembled_on_the_producers_host(
    producer_config: Config, worker_config: Config, redis_client: Redis, tiny_backend: Any
) -> None:
    assert not worker_config.output.dir.exists() and not worker_config.producer.watch.exists()
    clip = write_clip(producer_config.producer.watch / "trip" / "IMG_7.MOV", width=64, height=48, frames=10,
                      rotation=270, focal_35mm=26)  # fmt: skip
    submitted = Enqueuer(producer_config, redis_client).submit(clip)
    assert submitted.outcome == "enqueued"
    _run(producer_config, worker_config, redis_client, tiny_backend)

    out = producer_config.output.dir / "trip"
    meta = json.loads((out / "IMG_7.MOV.json").read_text())
    assert meta["kind"] == "clip" and meta["sha256"] == file_sha256(clip)
    assert (meta["width"], meta["height"], meta["frames_computed"]) == (48, 64, 10)
    assert meta["focal_length_source"] == "metadata"
    files = sorted((out / "IMG_7.MOV.depth").iterdir())
    assert [f.name for f in files] == [f"{k:06d}.exr" for k in range(1, 11)]
    for f in files:  # every frame, exactly: the slices are the clip's own packets, never re-encoded
        np.testing.assert_allclose(_exr(f), expected_depth(48, 64, 26), rtol=1e-5)
    with av.open(str(out / "IMG_7.MOV.preview.mp4")) as preview:
        assert sum(1 for _ in preview.decode(video=0)) == 10
    assert {w["host"] for w in meta["workers"]} and sum(w["frames"] for w in meta["workers"]) == 10
    assemble = Job.fetch(submitted.job_id, connection=redis_client, serializer=SERIALIZER)
    assert assemble.get_status() == "finished" and len(assemble.results()) == 1
    assert_end_state(producer_config, redis_client)
    assert Enqueuer(producer_config, redis_client).submit(clip).outcome == "done"


def test_the_producer_sends_a_clip_a_few_chunks_at_a_time_within_the_inflight_limit(
    make_config: Callable[..., Config], worker_config: Config, redis_client: Redis, tiny_backend: Any
) -> None:
    """Never the whole clip at once: with room for two jobs in Redis, the clip goes two chunks at a time,
    the rest waiting on disk ("deferred") until the collector frees room."""
    config = make_config(
        transport={"mode": "redis", "max_inflight_jobs": 2}, worker={"retry_backoff_s": [0]}, video={"chunk_frames": 2}
    )
    clip = write_clip(config.producer.watch / "long.mp4", width=64, height=48, frames=11)  # 6 chunks
    enqueuer = Enqueuer(config, redis_client)
    outcomes, most_held = [], 0
    for _ in range(20):
        outcome = enqueuer.submit(clip).outcome
        outcomes.append(outcome)
        most_held = max(most_held, redis_client.hlen(inflight_key(config.queue.name)))
        if outcome == "done":
            break
        enqueuer.sender._full_until = 0.0  # the sender's own recheck pause, which would only slow the test
        _run(config, worker_config, redis_client, tiny_backend)
    assert outcomes[0] == "deferred" and "enqueued" in outcomes and outcomes[-1] == "done", outcomes
    assert most_held <= 2
    meta = json.loads((config.output.dir / "long.mp4.json").read_text())
    assert meta["frames_computed"] == 11
    assert meta["focal_length_px"] == pytest.approx(0.5 * 64 / math.tan(math.radians(FOV_DEG / 2)))
    assert_end_state(config, redis_client)


def test_a_bad_clip_is_refused_by_the_producer_with_its_error_file(
    producer_config: Config, worker_config: Config, redis_client: Redis, tiny_backend: Any
) -> None:
    clip = write_audio_only_clip(producer_config.producer.watch / "voice.mp4")
    assert Enqueuer(producer_config, redis_client).submit(clip).outcome == "refused"
    error = json.loads((producer_config.output.dir / "voice.mp4.error.json").read_text())
    assert error["source"] == "voice.mp4" and "no video stream" in error["error"]["message"]
    assert error["source_stat"]["size"] == clip.stat().st_size
    _run(producer_config, worker_config, redis_client, tiny_backend)
    assert_end_state(producer_config, redis_client)


def test_a_clip_rewritten_before_its_assembly_lands_nothing_of_the_old_version(
    producer_config: Config, worker_config: Config, redis_client: Redis, tiny_backend: Any
) -> None:
    clip = write_clip(producer_config.producer.watch / "take.mp4", frames=6)
    enqueuer = Enqueuer(producer_config, redis_client)
    enqueuer.submit(clip)
    build_worker(worker_config, redis_client, tiny_backend).work(burst=True, with_scheduler=False)
    write_clip(clip, frames=9, pattern="noise")  # rewritten while its results wait for the collector
    _collect(producer_config, redis_client)
    assert not (producer_config.output.dir / "take.mp4.json").exists()
    assert enqueuer.submit(clip).outcome == "enqueued"  # the new version, sent afresh
    _run(producer_config, worker_config, redis_client, tiny_backend)
    meta = json.loads((producer_config.output.dir / "take.mp4.json").read_text())
    assert meta["frames_computed"] == 9 and meta["sha256"] == file_sha256(clip)
    assert_end_state(producer_config, redis_client)
