"""The producer's enqueueing against a real Redis: one job per content, JSON payloads, aliases."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from redis import Redis
from rq.job import JobStatus

from producer.config import Config
from producer.contract import JOB_FUNCTION, aliases_key, done_key, file_sha256, job_id, source_stamp
from producer.enqueue import Enqueuer, SourceError
from tests.photos import write_jpeg


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
    import producer.enqueue as module

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
    import producer.enqueue as module

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
