"""Both transports on one real Redis, in this process: the producer sends (producer/sending.py) and
the worker reads and writes (worker/transport.py) only what the payload's transport allows; the
collector's own tests are in test_collector.py. Fixtures `producer_config` and `worker_config` are
in conftest.py."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zstandard
from redis import Redis
from rq.job import Job, JobStatus

from depthq.config import Config
from depthq.contract import (
    MAX_KEPT_NAME,
    SERIALIZER,
    JobPayload,
    PayloadError,
    inflight_key,
    is_finished,
    output_path,
    photo_key,
    result_key,
    results_stream,
)
from producer.collector import Collector
from producer.enqueue import Enqueuer
from testkit.photos import write_jpeg
from testkit.tiny_model import expected_depth
from tests.endstate import assert_end_state
from worker.backends import Backend
from worker.worker import build_worker


def _work(config: Config, redis_client: Redis, backend: Backend) -> None:
    build_worker(config, redis_client, backend).work(burst=True, with_scheduler=False)


def test_photo_travels_through_redis_and_the_collector_writes_its_outputs(
    producer_config: Config, worker_config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    photo = write_jpeg(producer_config.producer.watch / "trip" / "a.jpg", width=80, height=60)
    enqueuer = Enqueuer(producer_config, redis_client)
    submitted = enqueuer.submit(photo)
    assert submitted.outcome == "enqueued"
    q = producer_config.queue.name
    assert redis_client.get(photo_key(q, submitted.job_id)) == photo.read_bytes()
    assert int(redis_client.hget(inflight_key(q), submitted.job_id)) == photo.stat().st_size
    payload = Job.fetch(submitted.job_id, connection=redis_client, serializer=SERIALIZER).args[0]
    assert (payload["transport"], payload["root"], payload["v"]) == ("redis", "inbox", 2)

    _work(worker_config, redis_client, tiny_backend)
    assert not worker_config.output.dir.exists() and not worker_config.producer.watch.exists()
    out = producer_config.output.dir / "trip"
    assert not out.exists()  # nothing on disk until a collector writes it
    stored = redis_client.hgetall(result_key(q, submitted.job_id))
    assert set(stored) == {b"npy", b"preview", b"json"}
    assert stored[b"npy"][:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    assert int(redis_client.hget(inflight_key(q), submitted.job_id)) > photo.stat().st_size

    collector = Collector(producer_config, redis_client)
    collector.ensure_group()
    assert collector.collect_new() == 1
    depth = np.load(out / "a.jpg.depth.npy")
    assert depth.dtype == np.float32 and depth.shape == (60, 80)
    np.testing.assert_allclose(depth, expected_depth(80, 60), rtol=1e-5)
    raw = (out / "a.jpg.depth.npy").read_bytes()
    assert len(stored[b"npy"]) < len(raw) and zstandard.ZstdDecompressor().decompress(stored[b"npy"]) == raw
    meta = json.loads((out / "a.jpg.json").read_text())
    assert meta["source"] == "trip/a.jpg" and meta["job_id"] == submitted.job_id
    assert (out / "a.jpg.preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))
    # Freed in Redis, and the producer sees the photo as done.
    assert not redis_client.exists(photo_key(q, submitted.job_id), result_key(q, submitted.job_id))
    assert redis_client.hlen(inflight_key(q)) == 0 and redis_client.xlen(results_stream(q)) == 0
    assert is_finished(producer_config.output.dir, "trip/a.jpg", photo.stat())
    assert enqueuer.submit(photo).outcome == "done"
    assert_end_state(producer_config, redis_client)


def test_a_bad_photo_comes_back_as_an_error_file(
    producer_config: Config, worker_config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    broken = producer_config.producer.watch / "broken.jpg"
    broken.write_text("not a JPEG")
    Enqueuer(producer_config, redis_client).submit(broken)
    _work(worker_config, redis_client, tiny_backend)
    Collector(producer_config, redis_client).collect_new()
    error = json.loads((producer_config.output.dir / "broken.jpg.error.json").read_text())
    assert error["error"]["type"] == "bad_input" and "broken.jpg" in error["error"]["message"]
    assert error["source_stat"] == {"size": broken.stat().st_size, "mtime": int(broken.stat().st_mtime)}
    assert not (producer_config.output.dir / "broken.jpg.json").exists()
    assert redis_client.hlen(inflight_key(producer_config.queue.name)) == 0
    assert_end_state(producer_config, redis_client, bad=["broken.jpg"])


def test_a_photo_over_the_size_cap_is_refused_with_an_error_file_naming_the_setting(
    make_config: Callable[..., Config], redis_client: Redis
) -> None:
    config = make_config(transport={"mode": "redis", "max_photo_bytes": 1000})
    photo = write_jpeg(config.producer.watch / "big.jpg", width=200, height=150)
    assert photo.stat().st_size > 1000
    result = Enqueuer(config, redis_client).submit(photo)
    assert result.outcome == "refused"
    error = json.loads((config.output.dir / "big.jpg.error.json").read_text())
    assert "transport.max_photo_bytes" in error["error"]["message"] and "big.jpg" in error["error"]["message"]
    assert redis_client.keys("rq:job:*") == [] and redis_client.keys("depthq:*photo*") == []
    # Refused once, not again on every rescan: the error file records this version of the photo.
    assert Enqueuer(config, redis_client).submit(photo).outcome == "done"
    assert_end_state(config, redis_client)


def test_the_producer_holds_photos_back_while_redis_holds_enough(
    make_config: Callable[..., Config], worker_config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    # Ends with the third photo's job queued on purpose: that it is let through at last is the point.
    config = make_config(transport={"mode": "redis", "max_inflight_jobs": 2})
    photos = [write_jpeg(config.producer.watch / f"{i}.jpg", seed=i) for i in range(3)]
    enqueuer = Enqueuer(config, redis_client)
    assert [enqueuer.submit(p).outcome for p in photos] == ["enqueued", "enqueued", "deferred"]
    _work(worker_config, redis_client, tiny_backend)
    assert enqueuer.submit(photos[2]).outcome == "deferred"  # done, but not yet collected: still in Redis
    Collector(config, redis_client).collect_new()
    enqueuer.sender._full_until = 0.0  # the half-second memo of "full" is not what this test is about
    assert enqueuer.submit(photos[2]).outcome == "enqueued"


def test_bytes_cap_and_entries_of_deleted_jobs_do_not_hold_the_producer_back(
    make_config: Callable[..., Config], redis_client: Redis
) -> None:
    # Ends with b's job queued on purpose (no worker runs): that it is let through is the point.
    a = write_jpeg(make_config().producer.watch / "a.jpg", seed=1)
    b = write_jpeg(make_config().producer.watch / "b.jpg", seed=2)
    config = make_config(transport={"mode": "redis", "max_inflight_bytes": a.stat().st_size + 10})
    enqueuer = Enqueuer(config, redis_client)
    first = enqueuer.submit(a)
    assert first.outcome == "enqueued"
    assert enqueuer.submit(b).outcome == "deferred"
    # The job is deleted by hand (rq-dashboard): its photo and entry must not block anything for a week.
    Job.fetch(first.job_id, connection=redis_client, serializer=SERIALIZER).delete()
    assert enqueuer.submit(b).outcome == "deferred"  # not in the first minute: its job may be on its way
    enqueuer.sender._full_until = 0.0
    redis_client.expire(photo_key(config.queue.name, first.job_id), config.transport.blob_ttl_s - 61)
    enqueuer.sender._full_until = 0.0
    second = enqueuer.submit(b)
    assert second.outcome == "enqueued"
    assert not redis_client.exists(photo_key(config.queue.name, first.job_id))
    assert redis_client.hkeys(inflight_key(config.queue.name)) == [second.job_id.encode()]


def test_a_photo_whose_bytes_are_gone_fails_without_an_error_file_and_is_sent_again(
    producer_config: Config, worker_config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    photo = write_jpeg(producer_config.producer.watch / "a.jpg")
    enqueuer = Enqueuer(producer_config, redis_client)
    jid = enqueuer.submit(photo).job_id
    redis_client.delete(photo_key(producer_config.queue.name, jid))  # expired, say
    _work(worker_config, redis_client, tiny_backend)
    job = Job.fetch(jid, connection=redis_client, serializer=SERIALIZER)
    assert job.get_status() == JobStatus.FAILED
    assert "no longer in Redis" in (job.latest_result().exc_string or "")
    assert redis_client.xlen(results_stream(producer_config.queue.name)) == 0
    assert enqueuer.submit(photo).outcome == "requeued"
    _work(worker_config, redis_client, tiny_backend)
    Collector(producer_config, redis_client).collect_new()
    assert (producer_config.output.dir / "a.jpg.json").exists()
    assert_end_state(producer_config, redis_client)


def test_a_copy_under_another_name_gets_its_own_job_and_outputs(
    producer_config: Config, worker_config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    a = write_jpeg(producer_config.producer.watch / "a.jpg")
    b = producer_config.producer.watch / "copies" / "b.jpg"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    enqueuer = Enqueuer(producer_config, redis_client)
    assert enqueuer.submit(a).outcome == "enqueued"
    assert enqueuer.submit(b).outcome == "copy"  # not an alias: no worker could read b's file
    _work(worker_config, redis_client, tiny_backend)
    collector = Collector(producer_config, redis_client)
    collector.ensure_group()
    assert collector.collect_new() == 2
    for rel in ("a.jpg", "copies/b.jpg"):
        assert json.loads((producer_config.output.dir / f"{rel}.json").read_text())["source"] == rel
    assert_end_state(producer_config, redis_client)


def test_the_shared_transport_reads_from_this_hosts_mount_of_the_named_root(
    make_config: Callable[..., Config], redis_client: Redis, tiny_backend: Backend, tmp_path: Path
) -> None:
    producer_config = make_config(transport={"root": "photos"})
    photo = write_jpeg(producer_config.producer.watch / "sub" / "a.jpg")
    Enqueuer(producer_config, redis_client).submit(photo)
    mount = tmp_path / "mnt-photos"  # the same share, mounted elsewhere on the worker's host
    os.rename(producer_config.producer.watch, mount)
    worker_config = make_config(
        producer={"watch": str(tmp_path / "nowhere")}, transport={"root": "other", "roots": {"photos": str(mount)}}
    )
    _work(worker_config, redis_client, tiny_backend)
    meta = json.loads((worker_config.output.dir / "sub" / "a.jpg.json").read_text())
    assert meta["source"] == "sub/a.jpg"
    assert_end_state(worker_config, redis_client)


def test_a_worker_that_does_not_map_the_root_says_which_setting_to_add(
    make_config: Callable[..., Config], redis_client: Redis, tiny_backend: Backend, tmp_path: Path
) -> None:
    producer_config = make_config(transport={"root": "photos"}, worker={"retries": 0})
    photo = write_jpeg(producer_config.producer.watch / "a.jpg")
    jid = Enqueuer(producer_config, redis_client).submit(photo).job_id
    worker_config = make_config(transport={"root": "inbox"}, worker={"retries": 0})
    _work(worker_config, redis_client, tiny_backend)
    job = Job.fetch(jid, connection=redis_client, serializer=SERIALIZER)
    assert job.get_status() == JobStatus.FAILED
    error = json.loads((worker_config.output.dir / "a.jpg.error.json").read_text())
    assert "transport.roots.photos" in error["error"]["message"]
    assert_end_state(worker_config, redis_client, bad=["a.jpg"])  # failed on purpose: the root is not mapped


def test_unknown_transports_are_refused() -> None:
    payload = {"source": "a.jpg", "size": 1, "mtime": 0.0, "sha256": "", "model": "m", "v": 2}
    with pytest.raises(PayloadError, match="transport"):
        JobPayload.from_dict({**payload, "transport": "carrier-pigeon"})
    with pytest.raises(PayloadError, match="same_as"):
        JobPayload.from_dict({**payload, "transport": "redis", "same_as": "b.jpg"})


def test_status_shows_what_redis_holds_and_whether_a_collector_runs(
    producer_config: Config, worker_config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    from rich.console import Console

    from depthq.ops.status import gather, render

    photo = write_jpeg(producer_config.producer.watch / "a.jpg")
    Enqueuer(producer_config, redis_client).submit(photo)
    transit = gather(redis_client, producer_config).transit
    assert transit is not None and (transit.jobs, transit.bytes) == (1, photo.stat().st_size)
    assert transit.results_waiting == 0 and transit.collectors_idle_s == {}
    _work(worker_config, redis_client, tiny_backend)
    transit = gather(redis_client, producer_config).transit
    assert transit is not None and transit.results_waiting == 1 and transit.bytes > photo.stat().st_size
    console = Console(record=True, width=200)
    render(gather(redis_client, producer_config), console)
    assert "none has run" in console.export_text()
    Collector(producer_config, redis_client, name="collector@a").collect_new()
    transit = gather(redis_client, producer_config).transit
    assert transit is not None and (transit.jobs, transit.bytes, transit.results_waiting) == (0, 0, 0)
    assert list(transit.collectors_idle_s) == ["collector@a"]
    assert_end_state(producer_config, redis_client)


def test_a_worker_whose_job_was_handed_over_sends_no_second_result(redis_client: Redis) -> None:
    from worker.store import HandedOverError, RedisResultStore

    # Ends with the owner's result waiting on purpose: a unit test of the store, no job and no collector.
    redis_client.hset("rq:job:j1", "worker_name", "c.torch.2")  # the job another worker took over
    stale = RedisResultStore(redis_client, "depthq", "j1", "b.torch.1", ttl_s=60, zstd_level=1)
    with pytest.raises(HandedOverError, match=r"handed to c\.torch\.2"):
        stale.write_error("a.jpg", {"error": "late"})
    assert redis_client.xlen(results_stream("depthq")) == 0 and not redis_client.exists(result_key("depthq", "j1"))
    owner = RedisResultStore(redis_client, "depthq", "j1", "c.torch.2", ttl_s=60, zstd_level=1)
    owner.write_error("a.jpg", {"error": "real"})
    assert redis_client.xlen(results_stream("depthq")) == 1
    assert json.loads(redis_client.hget(result_key("depthq", "j1"), "error")) == {"error": "real"}
    assert 0 < redis_client.ttl(result_key("depthq", "j1")) <= 60


def test_failed_retry_sends_a_fixed_photo_again(
    producer_config: Config, worker_config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    from depthq.ops import failed

    photo = producer_config.producer.watch / "fixme.jpg"
    photo.write_text("not yet a JPEG")
    jid = Enqueuer(producer_config, redis_client).submit(photo).job_id
    _work(worker_config, redis_client, tiny_backend)
    Collector(producer_config, redis_client).collect_new()
    out = producer_config.output.dir
    assert (out / "fixme.jpg.error.json").exists()
    assert not redis_client.exists(photo_key(producer_config.queue.name, jid))  # freed with the error

    write_jpeg(photo)  # the user fixes the photo, then retries the failed job
    assert failed.retry(redis_client, producer_config, ["fixme.jpg"]) == [jid]
    _work(worker_config, redis_client, tiny_backend)
    Collector(producer_config, redis_client).collect_new()
    assert json.loads((out / "fixme.jpg.json").read_text())["job_id"] == jid
    assert not (out / "fixme.jpg.error.json").exists()

    # Where the photo cannot be read (a worker host), the retry says where to run it instead.
    redis_client.delete(photo_key(producer_config.queue.name, jid))
    Job.fetch(jid, connection=redis_client, serializer=SERIALIZER).delete()
    other = Enqueuer(producer_config, redis_client)
    photo.write_text("broken again")
    jid = other.submit(photo, force=True).job_id
    _work(worker_config, redis_client, tiny_backend)
    Collector(producer_config, redis_client).collect_new()
    with pytest.raises(LookupError, match="producer's host"):
        failed.retry(redis_client, worker_config, [jid])
    assert_end_state(producer_config, redis_client, bad=["fixme.jpg"])


def test_a_copy_of_a_collected_photo_leaves_nothing_behind_in_redis(
    producer_config: Config, worker_config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    # Ends with the copy's job queued on purpose: what Redis holds for it before it runs is the point.
    a = write_jpeg(producer_config.producer.watch / "a.jpg")
    enqueuer = Enqueuer(producer_config, redis_client)
    first = enqueuer.submit(a)
    _work(worker_config, redis_client, tiny_backend)
    Collector(producer_config, redis_client).collect_new()
    b = producer_config.producer.watch / "b.jpg"
    shutil.copyfile(a, b)
    copy = enqueuer.submit(b)
    assert copy.outcome == "copy"
    q = producer_config.queue.name
    assert not redis_client.exists(photo_key(q, first.job_id))  # the bytes put under the done job's id
    assert redis_client.hkeys(inflight_key(q)) == [copy.job_id.encode()]


@pytest.mark.parametrize("length", [229, 230, 255])
def test_long_names_travel_through_redis_and_come_back_done(
    producer_config: Config, worker_config: Config, redis_client: Redis, tiny_backend: Backend, length: int
) -> None:
    name = "ü" * ((length - 5) // 2) + "x" * ((length - 5) % 2) + ".jpeg"
    assert len(name.encode()) == length
    photo = write_jpeg(producer_config.producer.watch / name)
    enqueuer = Enqueuer(producer_config, redis_client)
    enqueuer.submit(photo)
    _work(worker_config, redis_client, tiny_backend)
    collector = Collector(producer_config, redis_client)
    collector.ensure_group()
    assert collector.collect_new() == 1
    sidecar = output_path(producer_config.output.dir, name, "json")
    assert json.loads(sidecar.read_text())["source"] == name
    assert (sidecar.name == name + ".json") == (length <= MAX_KEPT_NAME)
    assert enqueuer.submit(photo).outcome == "done"
    assert_end_state(producer_config, redis_client)


def test_a_job_whose_worker_died_just_after_sending_its_result_ends_as_done_on_the_next_worker(
    producer_config: Config, worker_config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    """The result and the done marker go in one step: once the collector has freed the photo's bytes, the
    worker the job is handed to finds it done, not its photo gone (found by the chaos soak: a worker
    SIGKILLed between the two steps left a good photo in the failed registry)."""
    from depthq.sidecar import Sidecar
    from worker.transport import AlreadyDoneError, RedisTransport

    photo = write_jpeg(producer_config.producer.watch / "sent.jpg", seed=4)
    jid = Enqueuer(producer_config, redis_client).submit(photo).job_id
    payload = JobPayload.from_dict(Job.fetch(jid, connection=redis_client, serializer=SERIALIZER).args[0])
    first = RedisTransport(worker_config, redis_client, "b.torch.1")
    redis_client.hset(Job.key_for(jid), "worker_name", "b.torch.1")  # b took it, computed, sent, and died
    store = first.store(jid)
    store.write_data("sent.jpg", np.ones((4, 4), np.float32), b"png", ["npy", "preview", "json"])
    stat = photo.stat()
    sidecar = Sidecar(
        source="sent.jpg", sha256=payload.sha256, source_stat={"size": stat.st_size, "mtime": int(stat.st_mtime)},
        width=4, height=4, fov_deg=60.0, fov_vertical_deg=60.0, focal_length_px=3.5, focal_length_source="model",
        focal_length_35mm=None, fov_model_deg=60.0, camera=None, depth={"unit": "m", "min": 1.0, "max": 1.0},
        model={"name": "tiny"}, worker={"host": "b", "name": "b.torch.1"},
    )  # fmt: skip
    store.write_sidecar("sent.jpg", sidecar)
    Collector(producer_config, redis_client).collect_new()
    assert (producer_config.output.dir / "sent.jpg.json").exists()
    assert not redis_client.exists(photo_key(producer_config.queue.name, jid))  # freed with the result
    redis_client.hset(Job.key_for(jid), "worker_name", "c.torch.1")  # handed to c
    with pytest.raises(AlreadyDoneError):
        RedisTransport(worker_config, redis_client, "c.torch.1").read(payload, jid)
