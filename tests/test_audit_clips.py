"""`depthq audit` on video clips: real clips (testkit/clips.py) cut into jobs by the real Enqueuer and run
by a real depthq worker (rq's burst mode, the tiny model), each state reached for real, and the audit
finds exactly it. A clip's outputs are a sidecar, a folder of depth files and a preview; its jobs are
chunk jobs and an assemble job that waits, deferred, for them; its chunks stage their frames in a
hidden folder the assemble removes."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq.job import Job, JobStatus

from depthq.clip_jobs import assemble_job_id, clip_job_base, is_staging_name, staging_folder
from depthq.config import Config
from depthq.contract import SERIALIZER, file_sha256, make_queue, output_path
from depthq.files import stale_temp_age_s
from producer.audit import audit, repair
from producer.enqueue import Enqueuer
from producer.index import INDEX_NAME
from producer.watcher import Watcher
from testkit.backends import Failing, Looking
from testkit.clips import write_clip
from worker.backends import Backend
from worker.worker import build_worker

CHUNK = 4
FRAMES = 10  # three chunks: 4, 4 and 2 frames


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config(worker={"retry_backoff_s": [0]}, video={"chunk_frames": CHUNK}, output={"formats": ["exr"]})


def _work(config: Config, redis_client: Redis, backend: Any, max_jobs: int | None = None) -> None:
    build_worker(config, redis_client, backend).work(burst=True, with_scheduler=False, max_jobs=max_jobs)


def _clip(config: Config, name: str = "walk.mp4") -> Path:
    return write_clip(config.producer.watch / name, width=32, height=24, frames=FRAMES)


def _audit(config: Config, redis_client: Redis) -> dict[str, Any]:
    return audit(config, redis_client, limit=100).to_dict()


def _found(report: dict[str, Any]) -> dict[str, int]:
    return {kind: n for kind, n in report["counts"].items() if n}


def _status(redis_client: Redis, jid: str) -> JobStatus | None:
    return Job.fetch(jid, connection=redis_client, serializer=SERIALIZER).get_status()


def _staging(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if is_staging_name(p.name)) if out.exists() else []


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _done(config: Config, redis_client: Redis, backend: Backend, *names: str) -> dict[str, Path]:
    """Clips computed by a real worker."""
    enqueuer = Enqueuer(config, redis_client)
    clips = {name: _clip(config, name) for name in names}
    for clip in clips.values():
        assert enqueuer.submit(clip).outcome == "enqueued"
    _work(config, redis_client, backend)
    for name in names:
        assert output_path(config.output.dir, name, "json").exists()
    return clips


def test_a_done_clip_audits_clean_its_depth_folder_and_preview_are_its_outputs(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    _done(config, redis_client, tiny_backend, "walk.mp4", "day/IMG_0001.MOV")
    out = config.output.dir
    assert (out / "walk.mp4.depth").is_dir() and (out / "day" / "IMG_0001.MOV.preview.mp4").is_file()
    assert not _staging(out)
    report = _audit(config, redis_client)
    assert report["ok"] is True and _found(report) == {"photos": 2, "done": 2}
    # The index (the watcher's rescan read the clips' sidecars into it) is trusted for clips as for photos.
    watcher = Watcher(config, Enqueuer(config, redis_client))
    watcher.rescan("start")
    try:
        indexed = _audit(config, redis_client)
    finally:
        watcher.index.close()
    assert indexed["index"] is True and indexed["sidecars_read"] == 0
    assert _found(indexed) == {"photos": 2, "done": 2}


def test_a_clip_enqueued_and_not_run_is_queued_by_its_deferred_assemble_job(
    config: Config, redis_client: Redis
) -> None:
    clip = _clip(config)
    jid = assemble_job_id(clip_job_base(file_sha256(clip), config.model.path, "walk.mp4"))
    config.output.dir.mkdir()
    watcher = Watcher(config, Enqueuer(config, redis_client))  # its index beside the outputs
    try:
        watcher.submit(clip)  # as an event would: the index records the clip's assemble job
        assert _status(redis_client, jid) == JobStatus.DEFERRED  # in no lane, by design
        assert make_queue(redis_client, config, "live").count == 3  # its chunks
        report = _audit(config, redis_client)
    finally:
        watcher.index.close()
    # Not lost, not queued nowhere (the deferred assemble is in no lane), not duplicated; and found
    # pending by the job the index names, without hashing the clip.
    assert report["ok"] is True and _found(report) == {"photos": 1, "queued": 1}
    assert report["index"] is True and report["hashed"] == 0
    (queued,) = report["items"]["queued"]
    assert (queued["source"], queued["job_id"], queued["lane"]) == ("walk.mp4", jid, "live")
    assert queued["chunks"] == {"queued": 3} and queued["queued_nowhere"] is False
    # Without the index: the clip is hashed, and its assemble job found by its content and name.
    for leftover in config.output.dir.glob(INDEX_NAME + "*"):
        leftover.unlink()
    hashed = _audit(config, redis_client)
    assert hashed["index"] is False and hashed["hashed"] == 1
    assert hashed["items"]["queued"] == report["items"]["queued"]


def test_a_clip_whose_chunk_runs_is_running_and_its_staging_folder_is_no_leftover(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    clip = _clip(config)
    jid = Enqueuer(config, redis_client).submit(clip).job_id
    seen: list[dict[str, Any]] = []
    looking = Looking(tiny_backend, lambda: seen.append(_audit(config, redis_client)))
    _work(config, redis_client, looking, max_jobs=3)  # the chunks, not the assemble
    assert len(seen) == FRAMES
    for during in seen:
        assert during["ok"] is True and _found(during) == {"photos": 1, "running": 1}, during
        assert during["items"]["running"][0]["job_id"] == jid
    # The first frame: the first chunk started, two more queued, the assemble deferred; the last frame:
    # two chunks staged (their folder in the output, held by the clip in flight) and the last running.
    assert seen[0]["items"]["running"][0]["chunks"] == {"queued": 2, "started": 1}
    assert seen[-1]["items"]["running"][0]["chunks"] == {"finished": 2, "started": 1}
    # Every chunk over: the assemble is in its lane now, queued (and found there), the staging folder full.
    assert _status(redis_client, jid) == JobStatus.QUEUED and _staging(config.output.dir)
    between = _audit(config, redis_client)
    assert between["ok"] is True and _found(between) == {"photos": 1, "queued": 1}
    (queued,) = between["items"]["queued"]
    assert queued["job_id"] == jid and queued["queued_nowhere"] is False and "chunks" not in queued
    _work(config, redis_client, tiny_backend)
    assert _found(_audit(config, redis_client)) == {"photos": 1, "done": 1}


def test_a_clip_whose_chunks_wait_out_a_back_off_is_retrying(
    make_config: Callable[..., Config], redis_client: Redis, tiny_backend: Backend
) -> None:
    config = make_config(worker={"retries": 2, "retry_backoff_s": [3600]}, video={"chunk_frames": CHUNK})
    jid = Enqueuer(config, redis_client).submit(_clip(config)).job_id
    _work(config, redis_client, Failing(tiny_backend))
    assert _status(redis_client, jid) == JobStatus.DEFERRED
    report = _audit(config, redis_client)
    assert report["ok"] is True and _found(report) == {"photos": 1, "retrying": 1}
    (retrying,) = report["items"]["retrying"]
    assert retrying["job_id"] == jid and retrying["chunks"] == {"scheduled": 3}


def test_a_staging_folder_left_by_a_clip_that_is_gone_is_temporary_and_repair_removes_it(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    clip = _clip(config, "trip/gone.mp4")
    sha = file_sha256(clip)
    Enqueuer(config, redis_client).submit(clip)
    _work(config, redis_client, tiny_backend, max_jobs=3)  # the three chunks staged, not the assemble
    staging = staging_folder(config.output.dir, "trip/gone.mp4", sha)
    assert _staging(config.output.dir) == [staging] and any(staging.iterdir())
    redis_client.flushall()  # Redis restarted empty: the clip's jobs are gone
    clip.unlink()  # and the clip with them
    found = audit(config, redis_client, limit=100)
    report = found.to_dict()
    assert report["ok"] is True and _found(report) == {"temporary": 1}
    (left,) = report["items"]["temporary"]
    assert left == {
        "source": "trip/gone.mp4",
        "file": f"trip/{staging.name}/",
        "age_s": left["age_s"],
        "removable": False,  # written to lately: a job could still be writing it
        "staging": True,
    }
    did = repair(config, redis_client, found)
    assert (did["staging_removed"], did["staging_left"]) == (0, 1) and staging.is_dir()

    _age(staging, stale_temp_age_s(config.queue.job_timeout_s) + 60)
    found = audit(config, redis_client, limit=100)
    assert found.to_dict()["items"]["temporary"][0]["removable"] is True
    did = repair(config, redis_client, found)
    assert (did["staging_removed"], did["staging_left"]) == (1, 0) and did["errors"] == []
    assert not staging.exists() and (config.output.dir / "trip").is_dir()
    assert _found(_audit(config, redis_client)) == {}


def test_a_lost_clip_is_made_again_by_repair_and_keeps_the_chunks_it_staged(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    clip = _clip(config)
    Enqueuer(config, redis_client).submit(clip)
    _work(config, redis_client, tiny_backend, max_jobs=2)  # two of three chunks staged
    staging = staging_folder(config.output.dir, "walk.mp4", file_sha256(clip))
    redis_client.flushall()
    _age(staging, stale_temp_age_s(config.queue.job_timeout_s) + 60)
    found = audit(config, redis_client, limit=100)
    report = found.to_dict()
    assert report["ok"] is False and _found(report) == {"photos": 1, "lost": 1, "temporary": 1}
    (lost,) = report["items"]["lost"]
    assert lost["why"] == "no job for this version"
    assert lost["job_id"] == assemble_job_id(clip_job_base(file_sha256(clip), config.model.path, "walk.mp4"))
    assert report["items"]["temporary"][0]["removable"] is True

    did = repair(config, redis_client, found)
    # Made again through the Enqueuer's path; its jobs pending again, the staged chunks are kept.
    assert did["enqueued"] == {"enqueued": 1} and (did["staging_removed"], did["staging_left"]) == (0, 1)
    assert staging.is_dir()
    assert _status(redis_client, lost["job_id"]) == JobStatus.DEFERRED
    after = _audit(config, redis_client)
    assert after["ok"] is True and _found(after) == {"photos": 1, "queued": 1}
    assert after["items"]["queued"][0]["lane"] == "backfill"

    computed: list[int] = []
    _work(config, redis_client, Looking(tiny_backend, lambda: computed.append(1)))
    assert len(computed) == FRAMES - 2 * CHUNK  # only the chunk that was never staged
    assert not staging.exists()
    assert _found(_audit(config, redis_client)) == {"photos": 1, "done": 1}


def test_a_finished_clip_job_without_outputs_is_lost_and_repaired(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    _done(config, redis_client, tiny_backend, "walk.mp4")
    out = config.output.dir
    output_path(out, "walk.mp4", "json").unlink()  # a user cleaning up by hand
    shutil.rmtree(out / "walk.mp4.depth")
    (out / "walk.mp4.preview.mp4").unlink()
    found = audit(config, redis_client, limit=100)
    report = found.to_dict()
    assert _found(report) == {"photos": 1, "lost": 1}
    assert report["items"]["lost"][0]["why"] == "its job is finished, with no result for this version"
    assert repair(config, redis_client, found)["enqueued"] == {"enqueued": 1}
    _work(config, redis_client, tiny_backend)
    assert _found(_audit(config, redis_client)) == {"photos": 1, "done": 1}


def test_a_rewritten_clip_is_stale_and_hash_sees_other_content_under_the_same_size_and_mtime(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    clips = _done(config, redis_client, tiny_backend, "rewritten.mp4", "flipped.mp4")
    write_clip(clips["rewritten.mp4"], width=32, height=24, frames=6, pattern="noise")
    flipped = clips["flipped.mp4"]
    st, data = flipped.stat(), bytearray(flipped.read_bytes())
    data[data.index(b"mdat") + 64] ^= 0xFF  # in the coded frames: the container still opens
    flipped.write_bytes(bytes(data))
    os.utime(flipped, ns=(st.st_atime_ns, st.st_mtime_ns))
    report = _audit(config, redis_client)
    assert report["ok"] is False and _found(report) == {"photos": 2, "done": 1, "stale": 1}
    assert report["items"]["stale"][0]["source"] == "rewritten.mp4"
    found = audit(config, redis_client, limit=100, check_hash=True)  # reads the clip sidecar's sha256
    report = found.to_dict()
    assert _found(report) == {"photos": 2, "stale": 2}
    stale = {item["source"]: item for item in report["items"]["stale"]}
    assert stale["flipped.mp4"]["sha256_recorded"] != stale["flipped.mp4"]["sha256_now"] == file_sha256(flipped)
    assert repair(config, redis_client, found)["enqueued"] == {"enqueued": 2}
    after = audit(config, redis_client, limit=100, check_hash=True).to_dict()
    assert after["ok"] is True and _found(after) == {"photos": 2, "queued": 2}
    assert all(item["stale_output"] and item["chunks"] for item in after["items"]["queued"])


def test_a_clip_without_its_depth_folder_or_preview_is_partial_and_its_data_alone_too(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    _done(config, redis_client, tiny_backend, "a.mp4", "b.mp4", "c.mp4")
    out = config.output.dir
    shutil.rmtree(out / "a.mp4.depth")
    (out / "b.mp4.preview.mp4").unlink()
    output_path(out, "c.mp4", "json").unlink()  # data with no sidecar, and no job that will make one
    report = _audit(config, redis_client)
    assert report["ok"] is False and _found(report) == {"photos": 3, "done": 2, "lost": 1, "partial": 3}
    partial = {item["source"]: item for item in report["items"]["partial"]}
    assert partial["a.mp4"] == {"source": "a.mp4", "missing": ["depth"], "state": "done"}
    assert partial["b.mp4"] == {"source": "b.mp4", "missing": ["preview"], "state": "done"}
    assert partial["c.mp4"]["data_files"] == ["depth", "preview"] and partial["c.mp4"]["state"] == "lost"
    assert "orphans" not in report["items"]


def test_a_deleted_clips_outputs_are_orphans_and_never_deleted(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    clips = _done(config, redis_client, tiny_backend, "gone.mp4", "kept.mp4", "trip/x.mov")
    clips["gone.mp4"].unlink()
    clips["trip/x.mov"].unlink()
    (config.producer.watch / "trip").rmdir()
    found = audit(config, redis_client, limit=100)
    report = found.to_dict()
    assert report["ok"] is True and _found(report) == {"photos": 1, "done": 1, "orphans": 2}
    orphans = {item["source"]: item for item in report["items"]["orphans"]}
    assert orphans["gone.mp4"] == {
        "source": "gone.mp4",
        "files": ["gone.mp4.depth/", "gone.mp4.json", "gone.mp4.preview.mp4"],
        "folder_gone": False,
    }
    assert orphans["trip/x.mov"]["files"] == ["x.mov.depth/", "x.mov.json", "x.mov.preview.mp4"]
    assert orphans["trip/x.mov"]["folder_gone"] is True
    repair(config, redis_client, found)
    out = config.output.dir
    assert (out / "gone.mp4.depth").is_dir() and (out / "gone.mp4.json").is_file()
    assert len(list((out / "trip" / "x.mov.depth").iterdir())) == FRAMES
