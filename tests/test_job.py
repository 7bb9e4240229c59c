"""worker/job.py: one photo in, its depth set out. Run by a real worker in this process, on a real
Redis, with a tiny DepthPro whose output has a closed form (fixtures `config`, `backend` and
`run_worker` in conftest.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from redis import Redis
from rq.job import Job, JobStatus
from rq.scheduler import RQScheduler

from depthq.config import Config
from depthq.contract import SERIALIZER, JobPayload, done_key, file_sha256, make_queue, make_queues, output_path
from producer.enqueue import Enqueuer
from testkit.photos import write_jpeg
from testkit.tiny_model import FOV_DEG, expected_depth
from testkit.waiting import wait_for
from tests import disk
from tests.endstate import assert_end_state
from tests.test_depth import torch_model_input
from worker.backends import Backend
from worker.backends.base import Prediction
from worker.preprocess import model_input
from worker.worker import build_worker


def _sidecar(config: Config, rel: str) -> dict:
    return json.loads((config.output.dir / (rel + ".json")).read_text())


def test_photo_becomes_depth_preview_and_sidecar(config: Config, redis_client: Redis, run_worker) -> None:
    photo = write_jpeg(config.producer.watch / "trip" / "a.jpg", width=80, height=60)
    submitted = Enqueuer(config, redis_client).submit(photo)
    run_worker()
    out = config.output.dir / "trip"
    depth = np.load(out / "a.jpg.depth.npy")
    assert depth.dtype == np.float32 and depth.shape == (60, 80)
    np.testing.assert_allclose(depth, expected_depth(80, 60), rtol=1e-5)
    with Image.open(out / "a.jpg.preview.png") as preview:
        assert preview.size == (80, 60) and preview.mode == "RGB"
    meta = _sidecar(config, "trip/a.jpg")
    assert meta["source"] == "trip/a.jpg"
    assert meta["sha256"] == file_sha256(photo)
    assert (meta["width"], meta["height"]) == (80, 60)
    assert meta["fov_deg"] == pytest.approx(FOV_DEG)
    assert meta["fov_model_deg"] == pytest.approx(FOV_DEG)
    assert meta["focal_length_source"] == "model"
    assert meta["focal_length_px"] == pytest.approx(40 / math.tan(math.radians(30)))
    assert meta["fov_vertical_deg"] == pytest.approx(math.degrees(2 * math.atan(30 / meta["focal_length_px"])))
    assert meta["depth"]["unit"] == "m" and meta["depth"]["file"] == "a.jpg.depth.npy"
    assert meta["depth"]["median"] == pytest.approx(expected_depth(80, 60), rel=1e-5)
    revision = meta["model"].pop("revision")
    assert meta["model"] == {
        "name": config.model.path,
        "source": config.model.path,
        "path": config.model.path,  # the tests' checkpoint is a local folder
        "precision": "float32",
        "backend": "torch",
        "device": "cpu",
    }
    assert revision.startswith("sha256:") and len(revision) == len("sha256:") + 16
    assert "warnings" not in meta
    assert set(meta["timings_ms"]) == {"queue_wait", "decode", "inference", "postprocess", "write", "total"}
    assert meta["worker"]["name"].startswith(meta["worker"]["host"] + ".torch.")
    assert meta["job_id"] == submitted.job_id
    assert meta["created_at"].endswith("+00:00")
    assert not list(out.glob(".*.tmp"))
    job = Job.fetch(submitted.job_id, connection=redis_client, serializer=SERIALIZER)
    assert job.get_status() == JobStatus.FINISHED
    assert_end_state(config, redis_client)


def test_exif_focal_length_wins_over_the_model(config: Config, redis_client: Redis, run_worker) -> None:
    photo = write_jpeg(config.producer.watch / "exif.jpg", width=90, height=60, focal_35mm=26)
    Enqueuer(config, redis_client).submit(photo)
    run_worker()
    meta = _sidecar(config, "exif.jpg")
    assert meta["focal_length_source"] == "exif"
    assert meta["focal_length_px"] == pytest.approx(26 * math.hypot(90, 60) / math.hypot(36, 24))
    assert meta["fov_model_deg"] == pytest.approx(FOV_DEG)
    depth = np.load(config.output.dir / "exif.jpg.depth.npy")
    np.testing.assert_allclose(depth, expected_depth(90, 60, 26), rtol=1e-5)
    assert_end_state(config, redis_client)


def test_extra_formats(make_config: Callable[..., Config], redis_client: Redis, backend: Backend) -> None:
    config = make_config(output={"formats": ["tiff", "png16"]})
    photo = write_jpeg(config.producer.watch / "f.jpg", width=40, height=30)
    Enqueuer(config, redis_client).submit(photo)
    build_worker(config, redis_client, backend).work(burst=True)
    depth = np.load(config.output.dir / "f.jpg.depth.npy")
    with Image.open(config.output.dir / "f.jpg.depth.tiff") as tiff:
        np.testing.assert_array_equal(np.asarray(tiff), depth)
    with Image.open(config.output.dir / "f.jpg.depth.png") as png16:
        mm = np.asarray(png16)
        assert png16.mode.startswith("I")
    np.testing.assert_allclose(mm, np.rint(depth * 1000), atol=1)
    assert_end_state(config, redis_client)


def test_bad_photo_gets_an_error_file_no_retry_and_the_worker_goes_on(
    config: Config, redis_client: Redis, run_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.job as job_module

    attempts: list[str] = []
    real = job_module.process
    monkeypatch.setattr(
        job_module, "process", lambda rt, payload: attempts.append(payload["source"]) or real(rt, payload)
    )
    broken = config.producer.watch / "broken.jpg"
    broken.write_text("this is not a JPEG")
    good = write_jpeg(config.producer.watch / "good.jpg")
    enq = Enqueuer(config, redis_client)
    bad_job = enq.submit(broken).job_id
    enq.submit(good)
    run_worker()
    error = json.loads((config.output.dir / "broken.jpg.error.json").read_text())
    assert error["source"] == "broken.jpg" and error["job_id"] == bad_job
    assert error["error"]["type"] == "bad_input"
    assert "broken.jpg" in error["error"]["message"]
    assert not (config.output.dir / "broken.jpg.json").exists()
    job = Job.fetch(bad_job, connection=redis_client, serializer=SERIALIZER)
    assert job.get_status() == JobStatus.FAILED
    assert attempts.count("broken.jpg") == 1  # no retry spent on a bad photo
    assert (config.output.dir / "good.jpg.json").exists()
    assert_end_state(config, redis_client, bad=["broken.jpg"])


@pytest.mark.parametrize("spent_elsewhere", [False, True])
def test_unexpected_error_is_retried(
    config: Config, redis_client: Redis, backend: Backend, spent_elsewhere: bool
) -> None:
    """With `spent_elsewhere`, a process that is not a depthq worker already spent rq's retries
    (without running depthq's function): depthq's own count decides, and the photo still gets its retry."""

    class FlakyOnce:
        """The real backend, with one transient failure in front (fault injection)."""

        def __init__(self, inner: Backend):
            self.inner, self.failed = inner, False
            self.name, self.device, self.model_name = inner.name, inner.device, inner.model_name
            self.input_size, self.warnings = inner.input_size, inner.warnings

        def load(self) -> None:
            pass

        def predict(self, rgb: np.ndarray) -> Prediction:
            if not self.failed:
                self.failed = True
                raise RuntimeError("transient GPU hiccup")
            return self.inner.predict(rgb)

    photo = write_jpeg(config.producer.watch / "flaky.jpg")
    jid = Enqueuer(config, redis_client).submit(photo).job_id
    if spent_elsewhere:
        spent = Job.fetch(jid, connection=redis_client, serializer=SERIALIZER)
        spent.retries_left = 0
        spent.save()
    build_worker(config, redis_client, FlakyOnce(backend)).work(burst=True)
    job = Job.fetch(jid, connection=redis_client, serializer=SERIALIZER)
    assert job.get_status() == JobStatus.FINISHED
    assert job.retries_left == config.worker.retries - 1
    assert (config.output.dir / "flaky.jpg.json").exists()
    assert not (config.output.dir / "flaky.jpg.error.json").exists()
    assert_end_state(config, redis_client)


def test_payload_escaping_the_roots_is_refused(config: Config, redis_client: Redis, run_worker) -> None:
    queue = make_queue(redis_client, config)
    bad = JobPayload(source="x.jpg", size=1, mtime=0, sha256="0", model="m").to_dict()
    bad["source"] = "../../outside.jpg"
    job = queue.enqueue("worker.job.process", bad)
    run_worker()
    job.refresh()
    assert job.get_status() == JobStatus.FAILED
    assert "RefusedJobError" in (job.latest_result().exc_string or "")
    assert not list(config.output.dir.parent.glob("outside*"))
    assert_end_state(config, redis_client, bad=["../../outside.jpg"])


def test_copies_are_computed_once(config: Config, redis_client: Redis, run_worker) -> None:
    a = write_jpeg(config.producer.watch / "a.jpg")
    (config.producer.watch / "b.jpg").write_bytes(a.read_bytes())
    enq = Enqueuer(config, redis_client)
    assert enq.submit(a).outcome == "enqueued"
    assert enq.submit(config.producer.watch / "b.jpg").outcome == "aliased"
    run_worker()
    assert make_queue(redis_client, config).finished_job_registry.count == 1
    meta_b = _sidecar(config, "b.jpg")
    assert meta_b["source"] == "b.jpg" and meta_b["copied_from"] == "a.jpg"
    np.testing.assert_array_equal(
        np.load(config.output.dir / "a.jpg.depth.npy"), np.load(config.output.dir / "b.jpg.depth.npy")
    )
    # A third copy after the job is done: copied from the store, not recomputed.
    (config.producer.watch / "c.jpg").write_bytes(a.read_bytes())
    assert enq.submit(config.producer.watch / "c.jpg").outcome == "copy"
    run_worker()
    meta_c = _sidecar(config, "c.jpg")
    assert meta_c["copied_from"] == "a.jpg"
    assert meta_c["timings_ms"]["inference"] == 0.0
    # The copy's job ended as done, once: not retried, not failed (its result once lacked "aliases").
    assert make_queue(redis_client, config, "live").finished_job_registry.count == 2
    assert_end_state(config, redis_client)


def test_force_recomputes(config: Config, redis_client: Redis, run_worker) -> None:
    photo = write_jpeg(config.producer.watch / "a.jpg")
    enq = Enqueuer(config, redis_client)
    enq.submit(photo)
    run_worker()
    first = _sidecar(config, "a.jpg")["created_at"]
    assert enq.submit(photo).outcome == "done"
    assert enq.submit(photo, force=True).outcome == "enqueued"
    run_worker()
    assert _sidecar(config, "a.jpg")["created_at"] > first
    assert_end_state(config, redis_client)


def test_deleted_before_the_job_runs_ends_quietly_and_returns_if_the_photo_does(
    config: Config, redis_client: Redis, run_worker
) -> None:
    photo = write_jpeg(config.producer.watch / "gone.jpg")
    enq = Enqueuer(config, redis_client)
    jid = enq.submit(photo).job_id
    data = photo.read_bytes()
    photo.unlink()
    run_worker()
    # Nothing to compute, and no error file for a photo that is not there; the job is over, not failed.
    assert not config.output.dir.exists() or not list(config.output.dir.glob("gone.jpg*"))
    job = Job.fetch(jid, connection=redis_client, serializer=SERIALIZER)
    assert job.get_status() == JobStatus.FINISHED and job.return_value() == {"source": "gone.jpg", "gone": True}
    # Its copies are closed out: one the producer meets from now on (even before rq marks the job
    # finished) gets a job of its own at once, not a place in a set no one will take it from.
    assert redis_client.get(done_key(config.queue.name, jid)) == b""
    assert_end_state(config, redis_client)
    photo.write_bytes(data)  # it comes back (moved back in): computed then
    assert enq.submit(photo).outcome == "requeued"
    run_worker()
    assert _sidecar(config, "gone.jpg")["source"] == "gone.jpg"
    assert_end_state(config, redis_client)


def test_photo_moved_inside_the_folder_while_queued_is_computed_under_its_new_name_at_once(
    config: Config, redis_client: Redis, run_worker
) -> None:
    enq = Enqueuer(config, redis_client)
    photo = write_jpeg(config.producer.watch / "a.jpg")
    jid = enq.submit(photo).job_id
    moved = config.producer.watch / "sorted" / "a.jpg"
    moved.parent.mkdir()
    photo.rename(moved)
    assert enq.submit(moved).outcome == "aliased"  # the rename event, while the job waits
    run_worker()
    meta = _sidecar(config, "sorted/a.jpg")
    assert meta["source"] == "sorted/a.jpg" and "copied_from" not in meta
    assert not (config.output.dir / "a.jpg.error.json").exists()  # nothing recorded for a name that is gone
    assert Job.fetch(jid, connection=redis_client, serializer=SERIALIZER).return_value()["source"] == "sorted/a.jpg"
    assert enq.submit(moved).outcome == "done"  # the next rescan finds nothing to do
    assert_end_state(config, redis_client)


def test_copies_of_a_bad_photo_get_its_error_at_once(config: Config, redis_client: Redis, run_worker) -> None:
    """Zero-byte files all share one hash: the first one's job fails, and every copy queued as its alias
    gets the same error file then, not at the next rescan."""
    enq = Enqueuer(config, redis_client)
    names = ["empty1.jpg", "empty2.jpg", "sub/empty3.jpg"]
    for name in names:
        path = config.producer.watch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    outcomes = [enq.submit(config.producer.watch / name).outcome for name in names]
    assert outcomes == ["enqueued", "aliased", "aliased"]
    run_worker()
    for name in names:
        error = json.loads((config.output.dir / (name + ".error.json")).read_text())
        assert error["source"] == name and error["error"]["type"] == "bad_input"
        assert error["source_stat"]["size"] == 0
    assert [enq.submit(config.producer.watch / name).outcome for name in names] == ["done"] * 3
    assert_end_state(config, redis_client, bad=["empty1.jpg"])


def test_copy_never_gets_another_photos_depth(config: Config, redis_client: Redis, run_worker) -> None:
    enq = Enqueuer(config, redis_client)
    a = write_jpeg(config.producer.watch / "a.jpg", width=64, height=48)
    b = config.producer.watch / "b.jpg"
    b.write_bytes(a.read_bytes())
    enq.submit(a)
    assert enq.submit(b).outcome == "aliased"
    write_jpeg(a, width=100, height=30, seed=5)  # a is overwritten before its job runs
    run_worker()
    assert _sidecar(config, "a.jpg")["width"] == 100
    assert not (config.output.dir / "b.jpg.json").exists()
    assert enq.submit(b).outcome == "copy"  # its own job, since no result of its content exists
    run_worker()
    meta = _sidecar(config, "b.jpg")
    assert (meta["width"], meta["height"]) == (64, 48)
    assert meta["sha256"] == file_sha256(b)
    assert_end_state(config, redis_client)


# --- the model's input at the released size ------------------------------------------------------------

RELEASED_SIDE = 1536


class InputRecorder:
    """A backend at DepthPro's released input side that keeps the model input it was handed."""

    name, device, model_name, warnings = "recorder", "cpu", "recorder", ()

    def __init__(self) -> None:
        self.input_size = RELEASED_SIDE
        self.inputs: list[np.ndarray] = []

    def load(self) -> None:
        pass

    def predict(self, rgb: np.ndarray) -> Prediction:
        self.inputs.append(model_input(rgb, self.input_size))
        return Prediction(np.full((self.input_size, self.input_size), 0.25, np.float32), FOV_DEG)


@pytest.mark.parametrize("fast_decode", [False, True])
def test_the_models_input_is_the_references_unless_fast_decode_is_set(
    make_config: Callable[..., Config], redis_client: Redis, fast_decode: bool
) -> None:
    """A photo over twice the model's side on both sides: the job feeds the model what ml-depth-pro's
    infer() would (full decode, bilinear resize without antialias), unless `worker.fast_decode` asks
    for the DCT-reduced decode, which averages where the reference skips."""
    config = make_config(worker={"fast_decode": fast_decode})
    photo = config.producer.watch / "big.jpg"
    yy, xx = np.mgrid[0:3100, 0:3200]
    smooth = (127 + 100 * np.sin(xx / 37.0) * np.cos(yy / 53.0))[..., None] + np.array([0, 40, -40])
    noise = np.random.default_rng(0).normal(0, 12, (3100, 3200, 3))
    Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(photo, format="JPEG", quality=92)
    recorder = InputRecorder()
    Enqueuer(config, redis_client).submit(photo)
    build_worker(config, redis_client, recorder).work(burst=True, with_scheduler=False)

    (seen,) = recorder.inputs
    with Image.open(photo) as img:
        reference = torch_model_input(np.array(img.convert("RGB")), RELEASED_SIDE, torch.float64)
    difference = float(np.max(np.abs(seen.astype(np.float64) - reference)))
    if fast_decode:
        assert difference > 0.05  # the averaged image, visibly not the reference's input
    else:
        assert difference <= 1e-4
    assert _sidecar(config, "big.jpg")["width"] == 3200
    assert_end_state(config, redis_client)


def test_an_absurd_fov_from_the_model_is_blamed_on_the_model_and_retried(
    config: Config, redis_client: Redis, backend: Backend
) -> None:
    class NegativeFov:
        name, device, model_name, warnings = "torch", "cpu", "broken", ()
        input_size = backend.input_size
        calls = 0

        def load(self) -> None:
            pass

        def predict(self, rgb: np.ndarray) -> Prediction:
            NegativeFov.calls += 1
            return Prediction(np.full((self.input_size,) * 2, 0.25, np.float32), -12.5)

    jid = Enqueuer(config, redis_client).submit(write_jpeg(config.producer.watch / "fine.jpg")).job_id
    build_worker(config, redis_client, NegativeFov()).work(burst=True, with_scheduler=False)
    assert NegativeFov.calls == 1 + config.worker.retries  # another worker's model might answer well
    error = json.loads((config.output.dir / "fine.jpg.error.json").read_text())["error"]
    assert error["type"] == "model_output"
    assert "-12.5 degrees, which no camera has" in error["message"] and "not the photo" in error["message"]
    assert Job.fetch(jid, connection=redis_client, serializer=SERIALIZER).get_status() == JobStatus.FAILED
    assert_end_state(config, redis_client, bad=["fine.jpg"])  # failed by the broken model, as it should be


def test_the_sidecar_names_the_model_that_ran_and_the_one_asked_for_when_they_differ(
    make_config: Callable[..., Config], redis_client: Redis, backend: Backend
) -> None:
    """A producer asking for another model.path than this worker loaded: the worker's is recorded."""
    producer_side = make_config(model={"path": "apple/DepthPro-hf"})
    Enqueuer(producer_side, redis_client).submit(write_jpeg(producer_side.producer.watch / "a.jpg"))
    build_worker(make_config(), redis_client, backend).work(burst=True, with_scheduler=False)
    meta = _sidecar(producer_side, "a.jpg")
    assert meta["model"]["name"] == backend.model_info["name"] != "apple/DepthPro-hf"
    assert meta["model"]["requested"] == "apple/DepthPro-hf"
    assert (
        f"the job asked for model apple/DepthPro-hf; this worker ran {meta['model']['name']} (torch)"
        in meta["warnings"]
    )
    assert_end_state(producer_side, redis_client)


def test_depthq_status_stops_saying_the_disk_is_full_once_any_worker_writes_again(
    make_config: Callable[..., Config], redis_client: Redis, backend: Backend, tmp_path: Path
) -> None:
    """Only the worker that met the full disk cleared the alert, so after a restart `depthq status`
    said "output disk full ... 0.0 MiB free" for 15 minutes of a disk with room."""
    from depthq.ops.status import gather

    with disk.small_disk(tmp_path / "small-out", "1m") as out:
        config = make_config(output={"dir": str(out)}, worker={"retry_backoff_s": [0]})
        filler = disk.fill(out, leave_bytes=0)
        enq = Enqueuer(config, redis_client)
        held = enq.submit(write_jpeg(config.producer.watch / "held.jpg", seed=1)).job_id
        build_worker(config, redis_client, backend).work(burst=True)  # the worker that meets the full disk
        assert any(a.startswith("output disk full") for a in gather(redis_client, config).alerts)
        assert Job.fetch(held, connection=redis_client, serializer=SERIALIZER).get_status() == JobStatus.SCHEDULED
        filler.unlink()
        enq.submit(write_jpeg(config.producer.watch / "next.jpg", seed=2))
        build_worker(config, redis_client, backend).work(burst=True)  # a fresh worker: it never saw the disk full
        assert (out / "next.jpg.json").exists()
        assert gather(redis_client, config).alerts == []
        scheduler = RQScheduler([q.name for q in make_queues(redis_client, config)], connection=redis_client)
        scheduler.acquire_locks()

        def back_on_its_lane() -> bool:  # once its back-off (whole seconds in rq's registry) is over
            scheduler.enqueue_scheduled_jobs()
            return held in make_queue(redis_client, config).job_ids

        wait_for(back_on_its_lane, "the held photo's job back on its lane", 10)
        scheduler.release_locks()
        build_worker(config, redis_client, backend).work(burst=True)
        assert (out / "held.jpg.json").exists() and not list(out.glob("*.error.json"))
        assert_end_state(config, redis_client)


@pytest.mark.parametrize("length", [230, 255])
def test_a_photo_with_a_name_too_long_for_its_outputs_gets_them_under_a_shortened_name(
    config: Config, redis_client: Redis, run_worker, length: int
) -> None:
    name = "片" * ((length - 4) // 3) + "x" * ((length - 4) % 3) + ".jpg"
    assert len(name.encode()) == length
    photo = write_jpeg(config.producer.watch / "day" / name)
    enq = Enqueuer(config, redis_client)
    enq.submit(photo)
    run_worker()
    sidecar = output_path(config.output.dir, f"day/{name}", "json")
    meta = json.loads(sidecar.read_text())
    assert (
        meta["source"] == f"day/{name}"
        and meta["depth"]["file"] == output_path(config.output.dir, f"day/{name}", "npy").name
    )
    assert "~" in sidecar.name and len(sidecar.name.encode()) < 255
    assert enq.submit(photo).outcome == "done"  # the producer finds it by the same rule
    assert_end_state(config, redis_client)
