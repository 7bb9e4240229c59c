"""A clip's jobs end to end in one process: the producer's Enqueuer cuts a real clip into chunk jobs and an
assemble job on the test Redis, and a real depthq worker (rq's burst mode, the tiny model) runs them.

Each test ends with the system's end state (tests/endstate.py): every job over, nothing failed but the
bad clips, nothing waiting, no temporary file, and here also no staging folder left.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import OpenEXR
import pytest
from redis import Redis
from rq.job import Job

from depthq.clip_jobs import assemble_job_id, clip_job_base
from depthq.config import Config
from depthq.contract import SERIALIZER, file_sha256
from producer.enqueue import Enqueuer
from testkit.backends import Around
from testkit.clips import (
    write_audio_only_clip,
    write_clip,
    write_truncated_clip,
    write_undecodable_clip,
    write_zero_frame_clip,
)
from testkit.tiny_model import FOV_DEG, INVERSE_DEPTH, expected_depth
from tests.endstate import assert_end_state, staging_folders
from worker.backends.base import Prediction

CHUNK = 4


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config(
        worker={"retry_backoff_s": [0]},
        video={"chunk_frames": CHUNK},
        output={"formats": ["exr"]},
    )


@pytest.fixture
def enqueue(config: Config, redis_client: Redis) -> Callable[[Path], Any]:
    enqueuer = Enqueuer(config, redis_client)
    return enqueuer.submit


def _exr(path: Path) -> np.ndarray:
    with OpenEXR.File(str(path)) as exr:
        return np.asarray(exr.channels()["Z"].pixels)


def _preview_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_a_clip_gets_every_frame_at_the_closed_form_one_focal_length_a_preview_and_its_sidecar_last(
    config: Config, redis_client: Redis, enqueue: Callable[[Path], Any], run_worker: Callable[[], Any]
) -> None:
    clip = write_clip(config.producer.watch / "walk.mp4", width=64, height=48, frames=10)
    submitted = enqueue(clip)
    assert submitted.outcome == "enqueued"
    run_worker()

    out = config.output.dir
    meta = json.loads((out / "walk.mp4.json").read_text())
    assert meta["kind"] == "clip" and meta["source"] == "walk.mp4"
    assert (meta["width"], meta["height"], meta["frames_computed"], meta["frame_count"]) == (64, 48, 10, 10)
    assert meta["sha256"] == file_sha256(clip)
    assert meta["focal_length_source"] == "median of frames' FOV"
    assert meta["focal_length_px"] == pytest.approx(0.5 * 64 / math.tan(math.radians(FOV_DEG / 2)))
    assert meta["frame_fov_deg"] == [pytest.approx(FOV_DEG)] * 10
    files = sorted((out / "walk.mp4.depth").iterdir())
    assert [f.name for f in files] == [f"{k:06d}.exr" for k in range(1, 11)]
    for f in files:
        depth = _exr(f)
        assert depth.shape == (48, 64)
        np.testing.assert_allclose(depth, expected_depth(64, 48), rtol=1e-5)
    assert _preview_frames(out / "walk.mp4.preview.mp4") == 10
    assert meta["workers"] and sum(w["frames"] for w in meta["workers"]) == 10
    # Exactly one assemble: its job ran once, and it is the job the sidecar names.
    assemble = Job.fetch(submitted.job_id, connection=redis_client, serializer=SERIALIZER)
    assert assemble.get_status() == "finished" and len(assemble.results()) == 1
    assert meta["job_id"] == submitted.job_id
    assert_end_state(config, redis_client)
    # Done means done: the clip's next look adds nothing.
    assert enqueue(clip).outcome == "done"


def test_the_clips_35mm_focal_length_and_rotation_are_used(
    config: Config, redis_client: Redis, enqueue: Callable[[Path], Any], run_worker: Callable[[], Any]
) -> None:
    clip = write_clip(
        config.producer.watch / "IMG_0001.MOV", width=64, height=48, frames=5, rotation=270, focal_35mm=26
    )
    enqueue(clip)
    run_worker()
    meta = json.loads((config.output.dir / "IMG_0001.MOV.json").read_text())
    assert (meta["width"], meta["height"], meta["rotation"]) == (48, 64, 270)
    assert meta["focal_length_source"] == "metadata" and meta["focal_length_35mm"] == pytest.approx(26)
    for f in sorted((config.output.dir / "IMG_0001.MOV.depth").iterdir()):
        np.testing.assert_allclose(_exr(f), expected_depth(48, 64, 26), rtol=1e-5)
    assert_end_state(config, redis_client)


class JitteringFov(Around):
    """The tiny model with a FOV estimate that wanders from frame to frame, as a real one does."""

    def __init__(self, inner: Any, fovs: list[float]):
        super().__init__(inner)
        self.fovs, self.calls = fovs, 0

    def predict(self, rgb: np.ndarray) -> Prediction:
        prediction = self.inner.predict(rgb)
        fov = self.fovs[self.calls % len(self.fovs)]
        self.calls += 1
        return Prediction(prediction.inverse_depth, fov, prediction.already_metric)


JITTER = [57.0, 63.0, 60.5, 66.0, 54.0, 61.0, 59.0]


def test_each_frame_is_rescaled_to_the_median_fov_and_keeps_its_own_estimate_in_the_sidecar(
    config: Config, redis_client: Redis, enqueue: Callable[[Path], Any], tiny_backend: Any
) -> None:
    from worker.worker import build_worker

    clip = write_clip(config.producer.watch / "static.mkv", width=64, height=48, frames=7)
    enqueue(clip)
    build_worker(config, redis_client, JitteringFov(tiny_backend, JITTER)).work(burst=True, with_scheduler=False)
    meta = json.loads((config.output.dir / "static.mkv.json").read_text())
    median = float(np.median(JITTER))
    f_px = 0.5 * 64 / math.tan(math.radians(median / 2))
    assert meta["focal_length_px"] == pytest.approx(f_px)
    assert sorted(meta["frame_fov_deg"]) == sorted(JITTER)
    assert meta["frame_fov_spread"]["min_deg"] == min(JITTER) and meta["frame_fov_spread"]["max_deg"] == max(JITTER)
    # One camera: every frame's depth is the closed form at the clip's focal length, none at its own.
    for f in sorted((config.output.dir / "static.mkv.depth").iterdir()):
        np.testing.assert_allclose(_exr(f), f_px / (INVERSE_DEPTH * 64), rtol=1e-5)
    assert_end_state(config, redis_client)


@pytest.mark.parametrize(
    ("name", "make", "says"),
    [
        ("cut.mp4", lambda p: write_truncated_clip(write_clip(p, frames=30), keep=0.3), "cut"),
        # Its index first, so it opens and claims all 40 frames; the chunks past the data find none.
        ("halfway.mp4", lambda p: write_truncated_clip(write_clip(p, frames=40, movflags="faststart"), 0.5), "cut"),
        ("voice.mp4", write_audio_only_clip, "no video stream"),
        ("empty.mp4", write_zero_frame_clip, ""),
        ("alien.mov", write_undecodable_clip, "decode"),
    ],
)
def test_a_bad_clip_ends_with_its_error_file_and_nothing_half_written(
    config: Config,
    redis_client: Redis,
    enqueue: Callable[[Path], Any],
    run_worker: Callable[[], Any],
    name: str,
    make: Callable[[Path], Path],
    says: str,
) -> None:
    path = make(config.producer.watch / name)
    enqueue(path)
    run_worker()
    out = config.output.dir
    error = json.loads((out / f"{name}.error.json").read_text())
    assert error["source"] == name and name in error["error"]["message"]
    assert says.lower() in error["error"]["message"].lower()
    assert error["source_stat"]["size"] == path.stat().st_size
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [f"{name}.error.json"]
    assert_end_state(config, redis_client, bad=(name,))


def test_a_clip_over_max_frames_is_refused_naming_the_setting(
    make_config: Callable[..., Config], redis_client: Redis, run_worker: Callable[[], Any], config: Config
) -> None:
    short = make_config(worker={"retry_backoff_s": [0]}, video={"max_frames": 5})
    clip = write_clip(short.producer.watch / "long.mkv", frames=8)
    assert Enqueuer(short, redis_client).submit(clip).outcome == "refused"
    run_worker()
    message = json.loads((short.output.dir / "long.mkv.error.json").read_text())["error"]["message"]
    assert "8 frames" in message and "video.max_frames (5)" in message
    assert_end_state(short, redis_client, bad=("long.mkv",))


def test_a_clip_rewritten_before_its_chunks_run_lands_only_its_new_version(
    config: Config, redis_client: Redis, enqueue: Callable[[Path], Any], run_worker: Callable[[], Any]
) -> None:
    clip = write_clip(config.producer.watch / "take.mp4", frames=6)
    old = enqueue(clip)
    write_clip(config.producer.watch / "take.mp4", frames=9, pattern="noise")  # rewritten, queued jobs stale
    new = enqueue(clip)
    assert new.job_id != old.job_id
    run_worker()
    meta = json.loads((config.output.dir / "take.mp4.json").read_text())
    assert meta["frames_computed"] == 9 and meta["sha256"] == file_sha256(clip)
    assert len(list((config.output.dir / "take.mp4.depth").iterdir())) == 9
    assert_end_state(config, redis_client)


class DeletesTheClip(Around):
    """The tiny model, deleting the clip once it has computed `after` frames: a clip deleted mid-way."""

    def __init__(self, inner: Any, clip: list[Path], after: int):
        super().__init__(inner)
        self.clip, self.after, self.calls = clip, after, 0

    def predict(self, rgb: np.ndarray) -> Prediction:
        self.calls += 1
        if self.calls == self.after and self.clip:
            self.clip[0].unlink()
        return self.inner.predict(rgb)


@pytest.fixture
def deleting(tiny_backend: Any) -> Iterator[DeletesTheClip]:
    yield DeletesTheClip(tiny_backend, [], after=CHUNK + 1)


def test_a_clip_deleted_mid_way_leaves_no_output_and_no_staging(
    config: Config, redis_client: Redis, enqueue: Callable[[Path], Any], deleting: DeletesTheClip
) -> None:
    from worker.worker import build_worker

    clip = write_clip(config.producer.watch / "gone.mp4", frames=12)
    deleting.clip.append(clip)
    enqueue(clip)
    build_worker(config, redis_client, deleting).work(burst=True, with_scheduler=False)
    assert deleting.calls >= CHUNK + 1
    out = config.output.dir
    assert not (out / "gone.mp4.json").exists() and not (out / "gone.mp4.depth").exists()
    assert not (out / "gone.mp4.error.json").exists()  # gone is no fault of the clip: as for a photo
    assert_end_state(config, redis_client)


def test_a_chunk_staged_by_an_earlier_attempt_is_not_computed_again(
    config: Config, redis_client: Redis, enqueue: Callable[[Path], Any], run_worker: Callable[[], Any]
) -> None:
    """A clip made again (its outputs deleted) keeps nothing stale: and a worker that finds a chunk's
    record of this content staged (an attempt that died after writing it) skips the chunk."""
    clip = write_clip(config.producer.watch / "again.mp4", frames=6)
    submitted = enqueue(clip)
    run_worker()
    shutil.rmtree(config.output.dir)
    sha = file_sha256(clip)
    base = clip_job_base(sha, config.model.path, "again.mp4")
    assert submitted.job_id == assemble_job_id(base)
    assert enqueue(clip).outcome == "enqueued"  # its assemble is over, and the clip has no result
    run_worker()
    assert len(list((config.output.dir / "again.mp4.depth").iterdir())) == 6
    assert_end_state(config, redis_client)


def test_every_nth_frame_is_computed_numbered_in_order_and_the_preview_keeps_the_clips_length(
    make_config: Callable[..., Config], redis_client: Redis, run_worker: Callable[[], Any], config: Config
) -> None:
    halves = make_config(worker={"retry_backoff_s": [0]}, video={"chunk_frames": 2, "every_nth": 2})
    clip = write_clip(halves.producer.watch / "nth.mp4", frames=9, fps=30)
    Enqueuer(halves, redis_client).submit(clip)
    run_worker()
    meta = json.loads((halves.output.dir / "nth.mp4.json").read_text())
    assert (meta["every_nth"], meta["frames_computed"], meta["frame_count"]) == (2, 5, 9)
    assert sorted(p.name for p in (halves.output.dir / "nth.mp4.depth").iterdir()) == [
        f"{k:06d}.npy" for k in range(1, 6)
    ]
    preview = halves.output.dir / "nth.mp4.preview.mp4"
    assert _preview_frames(preview) == 5
    with av.open(str(preview)) as container:
        assert container.streams.video[0].average_rate == 15  # fps / every_nth: as long as the clip
    assert_end_state(halves, redis_client)


class MetersOnly(Around):
    """A meters-only model (the hub's Core ML exports): 1/meters, and no FOV."""

    def predict(self, rgb: np.ndarray) -> Prediction:
        side = self.input_size
        return Prediction(np.full((side, side), 0.5, np.float32), None, already_metric=True)


def test_a_model_without_fov_keeps_each_frames_depth_and_the_sidecar_says_so(
    config: Config, redis_client: Redis, enqueue: Callable[[Path], Any], tiny_backend: Any
) -> None:
    from worker.worker import build_worker

    enqueue(write_clip(config.producer.watch / "meters.mp4", frames=5))
    build_worker(config, redis_client, MetersOnly(tiny_backend)).work(burst=True, with_scheduler=False)
    meta = json.loads((config.output.dir / "meters.mp4.json").read_text())
    assert meta["focal_length_px"] is None and meta["focal_length_source"] is None and meta["camera"] is None
    assert meta["frame_fov_deg"] == [None] * 5
    assert any("per-frame depth" in w for w in meta["warnings"])
    for f in sorted((config.output.dir / "meters.mp4.depth").iterdir()):
        np.testing.assert_allclose(_exr(f), 2.0, rtol=1e-6)  # 1 / 0.5 m, as the model said
    assert_end_state(config, redis_client)


def test_an_assemble_left_waiting_on_chunks_that_are_gone_is_made_again_and_the_clip_finishes(
    config: Config, redis_client: Redis, enqueue: Callable[[Path], Any], run_worker: Callable[[], Any]
) -> None:
    """rq enqueues a dependent only when a dependency ends through a worker: chunks deleted by hand (a
    purge, a Redis that lost them) leave the assemble deferred for ever, unless the producer sees it."""
    clip = write_clip(config.producer.watch / "orphaned.mp4", frames=6)
    first = enqueue(clip)
    assemble = Job.fetch(first.job_id, connection=redis_client, serializer=SERIALIZER)
    assert assemble.get_status() == "deferred"
    for jid in redis_client.smembers(assemble.dependencies_key):
        Job.fetch(jid.decode(), connection=redis_client, serializer=SERIALIZER).delete()
    again = enqueue(clip)
    assert (again.outcome, again.job_id) == ("enqueued", first.job_id)
    run_worker()
    assert json.loads((config.output.dir / "orphaned.mp4.json").read_text())["frames_computed"] == 6
    assert_end_state(config, redis_client)


def test_a_lost_assemble_is_made_again_without_computing_the_staged_chunks_again(
    config: Config,
    redis_client: Redis,
    enqueue: Callable[[Path], Any],
    tiny_backend: Any,
    run_worker: Callable[[], Any],
) -> None:
    from worker.worker import build_worker

    clip = write_clip(config.producer.watch / "staged.mp4", frames=6)  # two chunks of 4 and 2
    first = enqueue(clip)
    build_worker(config, redis_client, tiny_backend).work(burst=True, max_jobs=2, with_scheduler=False)
    assert not (config.output.dir / "staged.mp4.json").exists()
    Job.fetch(first.job_id, connection=redis_client, serializer=SERIALIZER).delete()  # the assemble, lost
    assert enqueue(clip).outcome == "enqueued"
    run_worker()
    assert json.loads((config.output.dir / "staged.mp4.json").read_text())["frames_computed"] == 6
    base = first.job_id.removesuffix("-clip")
    for index in range(2):  # each chunk computed once: the remade clip kept their staged frames
        chunk = Job.fetch(f"{base}-c{index:05d}", connection=redis_client, serializer=SERIALIZER)
        assert len(chunk.results()) == 1
    assert_end_state(config, redis_client)


class FailsFirst(Around):
    """The tiny model, failing its first `n` predictions as a passing fault would (a device hiccup)."""

    def __init__(self, inner: Any, n: int):
        super().__init__(inner)
        self.left = n

    def predict(self, rgb: np.ndarray) -> Prediction:
        if self.left:
            self.left -= 1
            raise RuntimeError("the device hiccuped")
        return self.inner.predict(rgb)


def test_depthq_failed_retry_of_a_clip_makes_the_clip_again_and_it_finishes(
    make_config: Callable[..., Config], redis_client: Redis, tiny_backend: Any, run_worker: Callable[[], Any]
) -> None:
    from depthq.ops import failed
    from worker.worker import build_worker

    once = make_config(worker={"retries": 0}, video={"chunk_frames": 4})
    clip = write_clip(once.producer.watch / "hiccup.mp4", frames=6)
    Enqueuer(once, redis_client).submit(clip)
    build_worker(once, redis_client, FailsFirst(tiny_backend, 1)).work(burst=True, with_scheduler=False)
    error = json.loads((once.output.dir / "hiccup.mp4.error.json").read_text())["error"]
    assert "the device hiccuped" in error["message"]
    assert [row.source for row in failed.list_failed(redis_client, once)] == ["hiccup.mp4"]
    assert not staging_folders(once.output.dir)

    enqueuer = Enqueuer(once, redis_client)
    failed.retry(redis_client, once, ["hiccup.mp4"], resubmit_clip=lambda path: enqueuer.submit(path, force=True))
    build_worker(once, redis_client, tiny_backend).work(burst=True, with_scheduler=False)
    assert json.loads((once.output.dir / "hiccup.mp4.json").read_text())["frames_computed"] == 6
    assert not (once.output.dir / "hiccup.mp4.error.json").exists()  # superseded by the result
    assert_end_state(once, redis_client)
