"""The producer's enqueueing against a real Redis: one job per content, JSON payloads, aliases."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from redis import Redis
from rq.job import JobStatus

from depthq.config import Config
from depthq.contract import JOB_FUNCTION, aliases_key, done_key, file_sha256, job_id, source_stamp
from producer.enqueue import Enqueuer, SourceError
from testkit.photos import write_jpeg


@pytest.fixture
def enqueuer(make_config: Callable[..., Config], redis_client: Redis) -> Enqueuer:
    return Enqueuer(make_config(), redis_client)


def test_job_is_json_with_the_contract_payload(enqueuer: Enqueuer, redis_client: Redis) -> None:
    photo = write_jpeg(enqueuer.watch_root / "sub" / "a.jpg")
    result = enqueuer.submit(photo)
    assert result.outcome == "enqueued"
    assert result.job_id == job_id(file_sha256(photo), enqueuer.config.model.path)
    raw = redis_client.hget(f"rq:job:{result.job_id}", "data")
    assert raw is not None
    func, _instance, args, _kwargs = json.loads(zlib.decompress(raw))  # rq zlib-wraps it; JSON, never pickle
    assert func == JOB_FUNCTION
    payload = args[0]
    assert payload["source"] == "sub/a.jpg"
    assert payload["size"] == photo.stat().st_size
    assert payload["sha256"] == file_sha256(photo)
    assert payload["outputs"] == ["npy", "preview", "json"]
    assert enqueuer.queue.count == 1


def test_second_event_for_the_same_file_is_a_duplicate(enqueuer: Enqueuer) -> None:
    photo = write_jpeg(enqueuer.watch_root / "a.jpg")
    assert enqueuer.submit(photo).outcome == "enqueued"
    assert enqueuer.submit(photo).outcome == "duplicate"
    assert enqueuer.queue.count == 1


def test_changed_content_is_a_new_job(enqueuer: Enqueuer) -> None:
    photo = write_jpeg(enqueuer.watch_root / "a.jpg", seed=1)
    first = enqueuer.submit(photo)
    write_jpeg(photo, seed=2)
    second = enqueuer.submit(photo)
    assert second.outcome == "enqueued"
    assert first.job_id != second.job_id
    assert enqueuer.queue.count == 2


def test_copy_under_another_name_while_pending_becomes_an_alias(enqueuer: Enqueuer, redis_client: Redis) -> None:
    a = write_jpeg(enqueuer.watch_root / "a.jpg")
    b = enqueuer.watch_root / "copies" / "b.jpg"
    b.parent.mkdir()
    b.write_bytes(a.read_bytes())
    first = enqueuer.submit(a)
    second = enqueuer.submit(b)
    assert second.outcome == "aliased"
    assert enqueuer.queue.count == 1
    assert redis_client.smembers(aliases_key(enqueuer.queue.name, first.job_id)) == {b"copies/b.jpg"}


def test_copy_after_the_original_is_done_becomes_a_copy_job(enqueuer: Enqueuer, redis_client: Redis) -> None:
    a = write_jpeg(enqueuer.watch_root / "a.jpg")
    b = enqueuer.watch_root / "b.jpg"
    b.write_bytes(a.read_bytes())
    first = enqueuer.submit(a)
    redis_client.set(done_key(enqueuer.queue.name, first.job_id), "a.jpg")
    second = enqueuer.submit(b)
    assert second.outcome == "copy"
    assert second.job_id.startswith(first.job_id + "-")
    raw = redis_client.hget(f"rq:job:{second.job_id}", "data")
    assert json.loads(zlib.decompress(raw))[2][0]["same_as"] == "a.jpg"


def test_symlink_out_of_the_watch_root_is_not_read_but_queued_for_refusal(
    enqueuer: Enqueuer, tmp_path: Path, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    import producer.sending as module

    outside = write_jpeg(tmp_path / "elsewhere" / "secret.jpg")
    link = enqueuer.watch_root / "link.jpg"
    link.symlink_to(outside)
    monkeypatch.setattr(module, "file_sha256", lambda p: pytest.fail(f"the producer read {p}"))
    result = enqueuer.submit(link)
    assert result.outcome == "enqueued" and result.job_id.startswith("unread-")
    payload = json.loads(zlib.decompress(redis_client.hget(f"rq:job:{result.job_id}", "data")))[2][0]
    assert (payload["source"], payload["sha256"]) == ("link.jpg", "")


def test_directory_named_like_a_photo_is_refused(enqueuer: Enqueuer) -> None:
    folder = enqueuer.watch_root / "x.jpg"
    folder.mkdir()
    with pytest.raises(SourceError, match="not a regular file"):
        enqueuer.submit(folder)


def test_photo_with_a_result_for_exactly_this_file_is_done(enqueuer: Enqueuer) -> None:
    photo = write_jpeg(enqueuer.watch_root / "a.jpg")
    sidecar = enqueuer.config.output.dir / "a.jpg.json"
    sidecar.parent.mkdir(parents=True)
    sidecar.write_text(json.dumps({"source_stat": source_stamp(photo.stat())}))
    assert enqueuer.submit(photo).outcome == "done"
    assert enqueuer.submit(photo, force=True).outcome == "enqueued"


@pytest.mark.parametrize("status", [JobStatus.FAILED, JobStatus.STOPPED, JobStatus.FINISHED])
def test_job_that_is_over_without_a_result_runs_again(enqueuer: Enqueuer, status: JobStatus) -> None:
    photo = write_jpeg(enqueuer.watch_root / "a.jpg")
    jid = enqueuer.submit(photo).job_id
    job = enqueuer.queue.fetch_job(jid)
    enqueuer.queue.remove(job)
    job.set_status(status)  # e.g. the worker was killed with no retry left, or the output was deleted
    assert enqueuer.submit(photo).outcome == "requeued"
    assert enqueuer.queue.job_ids == [jid]


def test_unchanged_photo_is_hashed_once(enqueuer: Enqueuer, monkeypatch: pytest.MonkeyPatch) -> None:
    import producer.sending as module

    calls: list[Path] = []
    real = module.file_sha256
    monkeypatch.setattr(module, "file_sha256", lambda p: calls.append(p) or real(p))
    photo = write_jpeg(enqueuer.watch_root / "a.jpg")
    for _ in range(3):  # events and rescans while the job waits
        enqueuer.submit(photo)
    assert calls == [photo]
    write_jpeg(photo, seed=9)
    enqueuer.submit(photo)
    assert len(calls) == 2


def _stored(redis_client: Redis, jid: str) -> dict[bytes, bytes]:
    """A job's hash without the fields that differ from one enqueue to the next (times)."""
    fields = redis_client.hgetall(f"rq:job:{jid}")
    return {k: v for k, v in fields.items() if k not in (b"created_at", b"enqueued_at")}


def test_a_burst_stores_the_jobs_one_by_one_would(enqueuer: Enqueuer, redis_client: Redis) -> None:
    photos = [write_jpeg(enqueuer.watch_root / f"{i}.jpg", seed=i) for i in range(5)]
    results = enqueuer.submit_many(photos)
    assert [(path, r.outcome if r else None) for path, r in results] == [(p, "enqueued") for p in photos]
    jids = [r.job_id for _, r in results if r]
    assert enqueuer.queue.job_ids == jids
    batched = {jid: _stored(redis_client, jid) for jid in jids}
    redis_client.flushall()
    for photo in photos:
        assert enqueuer.submit(photo).outcome == "enqueued"
    assert {jid: _stored(redis_client, jid) for jid in jids} == batched
    assert enqueuer.queue.job_ids == jids


def test_a_burst_leaves_the_unusual_to_submit(enqueuer: Enqueuer, redis_client: Redis, tmp_path: Path) -> None:
    """Only new content and jobs still pending for the same photo are settled in bulk; submit() gets the rest."""
    root = enqueuer.watch_root
    new = write_jpeg(root / "new.jpg", seed=1)
    copy = root / "copy.jpg"
    copy.write_bytes(new.read_bytes())
    queued = write_jpeg(root / "queued.jpg", seed=2)
    failed = write_jpeg(root / "failed.jpg", seed=3)
    done = write_jpeg(root / "done.jpg", seed=4)
    (enqueuer.config.output.dir).mkdir(parents=True)
    (enqueuer.config.output.dir / "done.jpg.json").write_text(json.dumps({"source_stat": source_stamp(done.stat())}))
    link = root / "link.jpg"
    link.symlink_to(write_jpeg(tmp_path / "elsewhere" / "secret.jpg", seed=5))
    gone = root / "gone.jpg"
    assert enqueuer.submit(queued).outcome == "enqueued"
    failed_id = enqueuer.submit(failed).job_id
    job = enqueuer.queue.fetch_job(failed_id)
    enqueuer.queue.remove(job)
    job.set_status(JobStatus.FAILED)

    results = dict(enqueuer.submit_many([new, copy, queued, failed, done, link, gone]))
    assert {path.name: r.outcome if r else None for path, r in results.items()} == {
        "new.jpg": "enqueued",
        "copy.jpg": None,  # same content as new.jpg, earlier in the batch: an alias, by submit()
        "queued.jpg": "duplicate",
        "failed.jpg": None,  # over without a result: submit() runs it again
        "done.jpg": "done",
        "link.jpg": None,  # not to be read: submit() queues it for the worker to refuse
        "gone.jpg": None,  # submit() raises, to a caller that decides what a missing file means
    }
    assert enqueuer.submit(copy).outcome == "aliased"
    assert enqueuer.submit(failed).outcome == "requeued"
    assert enqueuer.submit(link).job_id.startswith("unread-")
    with pytest.raises(SourceError, match="cannot be read"):
        enqueuer.submit(gone)
    new_id = results[new].job_id  # type: ignore[union-attr]
    assert redis_client.smembers(aliases_key(enqueuer.queue.name, new_id)) == {b"copy.jpg"}
    assert len(enqueuer.queue.job_ids) == len(set(enqueuer.queue.job_ids)) == 4  # new, queued, failed, link


def test_a_job_that_appears_during_a_burst_is_not_overwritten(
    enqueuer: Enqueuer, redis_client: Redis, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another producer enqueues the same content between our look and our write: its job stays as it is."""
    a = write_jpeg(enqueuer.watch_root / "a.jpg", seed=1)
    b = write_jpeg(enqueuer.watch_root / "b.jpg", seed=2)
    elsewhere = enqueuer.watch_root / "elsewhere.jpg"
    elsewhere.write_bytes(a.read_bytes())
    other = Enqueuer(make_config(), redis_client)
    real = enqueuer.queue.enqueue_many

    def racing(*args, **kwargs):  # type: ignore[no-untyped-def]
        assert other.submit(elsewhere).outcome == "enqueued"
        return real(*args, **kwargs)

    monkeypatch.setattr(enqueuer.queue, "enqueue_many", racing)
    results = enqueuer.submit_many([a, b])
    assert [r for _, r in results] == [None, None]  # nothing written: both go one by one
    monkeypatch.undo()
    assert enqueuer.submit(a).outcome == "aliased"
    assert enqueuer.submit(b).outcome == "enqueued"
    jid = job_id(file_sha256(a), enqueuer.config.model.path)
    raw = redis_client.hget(f"rq:job:{jid}", "data")
    assert json.loads(zlib.decompress(raw))[2][0]["source"] == "elsewhere.jpg"
    assert sorted(enqueuer.queue.job_ids) == sorted([jid, job_id(file_sha256(b), enqueuer.config.model.path)])


def test_a_failed_job_whose_worker_died_is_sent_again_without_a_crash(enqueuer: Enqueuer, redis_client: Redis) -> None:
    """rq's job.delete() raises ValueError for an execution record that expired with its dead worker;
    that once killed the watcher thread, and depthq up with it, on every rescan."""
    from rq.job import Job

    from depthq.contract import SERIALIZER
    from worker.worker import DepthWorker

    photo = write_jpeg(enqueuer.config.producer.watch / "a.jpg")
    jid = enqueuer.submit(photo).job_id
    job = Job.fetch(jid, connection=redis_client, serializer=SERIALIZER)
    worker = DepthWorker([enqueuer.queue], connection=redis_client, serializer=SERIALIZER, name="gone")
    execution = worker.prepare_execution(job)
    redis_client.delete(execution.key)  # as its TTL lapses once the worker is dead
    job.set_status(JobStatus.FAILED)
    with pytest.raises(ValueError, match="not found in Redis"):
        Job.fetch(jid, connection=redis_client, serializer=SERIALIZER).delete()  # what rq alone does

    assert enqueuer.submit(photo).outcome == "requeued"
    again = Job.fetch(jid, connection=redis_client, serializer=SERIALIZER)
    assert again.get_status() == JobStatus.QUEUED and jid in enqueuer.queue.get_job_ids()
