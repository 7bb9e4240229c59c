"""`depthq audit`: each kind of trouble caused for real (real Redis, real files, the tiny model's real
results), and the audit finds exactly it; `--repair` puts right what it may, and deletes no output."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq.job import Job, JobStatus

from depthq.config import Config
from depthq.contract import (
    SERIALIZER,
    JobPayload,
    make_queue,
    output_base,
    output_path,
    photo_key,
    source_stamp,
    taking_key,
)
from depthq.files import atomic_bytes, json_bytes, staged_write, stale_temp_age_s
from depthq.taking import TAKE
from producer.audit import KINDS, audit, repair
from producer.enqueue import Enqueuer
from producer.index import INDEX_NAME, PhotoIndex
from producer.watcher import Watcher
from testkit.backends import Failing, Looking
from testkit.photos import write_jpeg
from worker.backends import Backend
from worker.worker import build_worker

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("numpy", "torch", "coremltools")


def _work(config: Config, redis_client: Redis, backend: Any) -> None:
    build_worker(config, redis_client, backend).work(burst=True, with_scheduler=False)


def _done(config: Config, redis_client: Redis, backend: Backend, *names: str) -> dict[str, Path]:
    """Photos computed by a real worker, as a rescan would have sent them."""
    enqueuer = Enqueuer(config, redis_client, lane="backfill")
    photos = {}
    for i, name in enumerate(names):
        photos[name] = write_jpeg(config.producer.watch / name, width=32, height=24, seed=100 + i)
        assert enqueuer.submit(photos[name]).outcome == "enqueued"
    _work(config, redis_client, backend)
    for name in names:
        assert output_path(config.output.dir, name, "json").exists()
    return photos


def _found(report: dict[str, Any]) -> dict[str, int]:
    """The counts that are not zero: what a test expects, exactly."""
    return {kind: n for kind, n in report["counts"].items() if n}


def _audit(config: Config, redis_client: Redis, **kwargs: Any) -> dict[str, Any]:
    return audit(config, redis_client, limit=100, **kwargs).to_dict()


def _sources(report: dict[str, Any], kind: str) -> list[str]:
    return sorted(item["source"] for item in report["items"].get(kind, []))


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config()


def test_a_clean_folder_is_ok_and_the_index_and_its_files_are_no_orphans(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    _done(config, redis_client, tiny_backend, "a.jpg", "day1/b.jpg", "day1/trip/c.JPG")
    (config.producer.watch / "notes.txt").write_text("not a photo")
    watcher = Watcher(config, Enqueuer(config, redis_client))
    watcher.rescan("start")  # the index beside the outputs, held by the watcher during the audit
    try:
        report = _audit(config, redis_client)
    finally:
        watcher.index.close()
    assert report["ok"] is True
    assert _found(report) == {"photos": 3, "done": 3}
    assert set(report["counts"]) == {"photos", *KINDS}
    assert report["index"] is True and report["sidecars_read"] == 0 and report["hashed"] == 0


def test_a_photo_without_a_job_and_a_job_finished_without_output_are_lost_and_repaired(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    _done(config, redis_client, tiny_backend, "kept.jpg", "wiped.jpg")
    for kind in ("json", "npy", "preview"):  # a user cleaning up by hand
        output_path(config.output.dir, "wiped.jpg", kind).unlink()
    write_jpeg(config.producer.watch / "never.jpg", width=32, height=24, seed=7)  # an event the watcher missed
    found = audit(config, redis_client, limit=100)
    report = found.to_dict()
    assert report["ok"] is False
    assert _found(report) == {"photos": 3, "done": 1, "lost": 2}
    why = {item["source"]: item["why"] for item in report["items"]["lost"]}
    assert why["never.jpg"] == "no job for this version"
    assert why["wiped.jpg"] == "its job is finished, with no result for this version"

    did = repair(config, redis_client, found)
    assert did["enqueued"] == {"enqueued": 1, "requeued": 1} and did["errors"] == []
    backfill = make_queue(redis_client, config, "backfill")
    sources = sorted(
        Job.fetch(j, connection=redis_client, serializer=SERIALIZER).args[0]["source"] for j in backfill.job_ids
    )
    assert sources == ["never.jpg", "wiped.jpg"]
    assert make_queue(redis_client, config, "live").count == 0
    after = _audit(config, redis_client)
    assert after["ok"] is True and _found(after) == {"photos": 3, "done": 1, "queued": 2}
    assert {item["lane"] for item in after["items"]["queued"]} == {"backfill"}


def test_a_queued_job_in_no_list_is_found_and_pushed_back_and_a_taken_one_is_not_lost(
    config: Config, redis_client: Redis
) -> None:
    enqueuer = Enqueuer(config, redis_client, lane="backfill")
    ids = {
        name: enqueuer.submit(write_jpeg(config.producer.watch / name, width=32, height=24, seed=i)).job_id
        for i, name in enumerate(("dropped.jpg", "taken.jpg", "waiting.jpg"))
    }
    lane = make_queue(redis_client, config, "backfill")
    redis_client.lrem(lane.key, 0, ids["dropped.jpg"])  # a lost LPUSH, a hand-edited Redis: queued, in no list
    # A worker took this one and has not started it yet: its taking list holds it (the worker's own script).
    taking = taking_key(config.queue.name, "mini-1.coreml.4242")
    live = make_queue(redis_client, config, "live")
    assert redis_client.eval(TAKE, 3, live.key, lane.key, taking) == [lane.key.encode(), ids["taken.jpg"].encode()]
    assert redis_client.lrange(taking, 0, -1) == [ids["taken.jpg"].encode()]
    found = audit(config, redis_client, limit=100)
    report = found.to_dict()
    assert report["ok"] is False
    assert _found(report) == {"photos": 3, "queued": 3, "queued_nowhere": 1}
    (nowhere,) = report["items"]["queued_nowhere"]
    assert (nowhere["source"], nowhere["job_id"], nowhere["lane"]) == ("dropped.jpg", ids["dropped.jpg"], "backfill")
    flags = {item["source"]: item["queued_nowhere"] for item in report["items"]["queued"]}
    assert flags == {"dropped.jpg": True, "taken.jpg": False, "waiting.jpg": False}

    did = repair(config, redis_client, found)
    assert did["requeued_jobs"] == [ids["dropped.jpg"]] and did["enqueued"] == {}
    assert ids["dropped.jpg"] in lane.get_job_ids()
    job = Job.fetch(ids["dropped.jpg"], connection=redis_client, serializer=SERIALIZER)
    assert job.get_status() == JobStatus.QUEUED and job.args[0]["source"] == "dropped.jpg"  # the same job
    after = _audit(config, redis_client)
    assert after["ok"] is True and _found(after) == {"photos": 3, "queued": 3}


def test_a_job_twice_in_the_lanes_and_a_photo_with_two_pending_jobs_are_duplicated(
    config: Config, redis_client: Redis
) -> None:
    enqueuer = Enqueuer(config, redis_client)
    photo = write_jpeg(config.producer.watch / "a.jpg", width=32, height=24, seed=1)
    first = enqueuer.submit(photo).job_id
    redis_client.rpush(make_queue(redis_client, config, "backfill").key, first)  # in both lanes
    write_jpeg(config.producer.watch / "b.jpg", width=32, height=24, seed=2)
    b_first = enqueuer.submit(config.producer.watch / "b.jpg").job_id
    # A second job for the very same content of b.jpg (the id a copy job of it would get): computed twice.
    payload = JobPayload(**Job.fetch(b_first, connection=redis_client, serializer=SERIALIZER).args[0])
    b_second = f"{b_first}-{hashlib.sha256(b'b.jpg').hexdigest()[:8]}"
    enqueuer._enqueue(b_second, payload)
    report = _audit(config, redis_client)
    assert report["ok"] is False
    assert _found(report) == {"photos": 2, "queued": 2, "duplicated": 2}
    by_kind = {("job_id" in item): item for item in report["items"]["duplicated"]}
    assert by_kind[True]["job_id"] == first and len(by_kind[True]["lists"]) == 2
    assert by_kind[False] == {"source": "b.jpg", "job_ids": sorted([b_first, b_second])}


def test_a_photo_rewritten_while_its_old_job_waits_is_no_duplicate(config: Config, redis_client: Redis) -> None:
    """Two pending jobs for two contents of one name: the old one's result is dropped as superseded."""
    enqueuer = Enqueuer(config, redis_client)
    write_jpeg(config.producer.watch / "b.jpg", width=32, height=24, seed=2)
    old = enqueuer.submit(config.producer.watch / "b.jpg").job_id
    write_jpeg(config.producer.watch / "b.jpg", width=40, height=30, seed=3)
    assert enqueuer.submit(config.producer.watch / "b.jpg").job_id != old
    report = _audit(config, redis_client)
    assert report["ok"] is True and _found(report) == {"photos": 1, "queued": 1}


def test_a_running_job_is_running(config: Config, redis_client: Redis, tiny_backend: Backend) -> None:
    seen: list[dict[str, Any]] = []
    Enqueuer(config, redis_client).submit(write_jpeg(config.producer.watch / "a.jpg", width=32, height=24))
    _work(config, redis_client, Looking(tiny_backend, lambda: seen.append(_audit(config, redis_client))))
    (during,) = seen
    assert during["ok"] is True and _found(during) == {"photos": 1, "running": 1}
    assert during["items"]["running"][0]["lane"] == "live"
    assert _found(_audit(config, redis_client)) == {"photos": 1, "done": 1}


def test_a_job_waiting_out_its_back_off_is_retrying(
    make_config: Callable[..., Config], redis_client: Redis, tiny_backend: Backend
) -> None:
    config = make_config(worker={"retries": 2, "retry_backoff_s": [3600]})
    jid = Enqueuer(config, redis_client).submit(write_jpeg(config.producer.watch / "a.jpg", width=32, height=24)).job_id
    _work(config, redis_client, Failing(tiny_backend))
    assert Job.fetch(jid, connection=redis_client, serializer=SERIALIZER).get_status() == JobStatus.SCHEDULED
    report = _audit(config, redis_client)
    assert report["ok"] is True and _found(report) == {"photos": 1, "retrying": 1}
    assert report["items"]["retrying"][0]["job_id"] == jid


def test_a_failed_job_with_its_error_file_is_an_error_and_without_it_failed(
    make_config: Callable[..., Config], redis_client: Redis, tiny_backend: Backend
) -> None:
    config = make_config(worker={"retries": 0})
    jid = Enqueuer(config, redis_client).submit(write_jpeg(config.producer.watch / "a.jpg", width=32, height=24)).job_id
    _work(config, redis_client, Failing(tiny_backend))
    report = _audit(config, redis_client)
    assert report["ok"] is True and _found(report) == {"photos": 1, "errors": 1}
    assert report["items"]["errors"][0]["error"] == "RuntimeError: the model fell over"
    output_path(config.output.dir, "a.jpg", "error").unlink()
    report = _audit(config, redis_client)
    assert report["ok"] is True and _found(report) == {"photos": 1, "failed": 1}
    assert report["items"]["failed"][0]["job_id"] == jid


def test_redis_transport_a_result_waiting_for_the_collector_and_a_photo_whose_bytes_expired(
    make_config: Callable[..., Config], redis_client: Redis, tiny_backend: Backend
) -> None:
    config = make_config(transport={"mode": "redis"}, worker={"retry_backoff_s": [0]})
    enqueuer = Enqueuer(config, redis_client)
    waiting = enqueuer.submit(write_jpeg(config.producer.watch / "waiting.jpg", width=32, height=24, seed=1))
    expired = enqueuer.submit(write_jpeg(config.producer.watch / "expired.jpg", width=32, height=24, seed=2))
    redis_client.delete(photo_key(config.queue.name, expired.job_id))
    _work(config, redis_client, tiny_backend)  # no collector runs
    report = _audit(config, redis_client)
    assert _found(report) == {"photos": 2, "collecting": 1, "failed": 1}
    assert report["items"]["collecting"][0]["job_id"] == waiting.job_id
    assert report["items"]["failed"][0]["source"] == "expired.jpg"


def test_a_rewritten_photo_is_stale_until_its_new_version_has_a_job(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    photos = _done(config, redis_client, tiny_backend, "a.jpg", "b.jpg")
    before = source_stamp(photos["a.jpg"].stat())
    write_jpeg(photos["a.jpg"], width=48, height=36, seed=9)  # another photo under the old name
    found = audit(config, redis_client, limit=100)
    report = found.to_dict()
    assert report["ok"] is False and _found(report) == {"photos": 2, "done": 1, "stale": 1}
    (stale,) = report["items"]["stale"]
    assert (stale["source"], stale["file"], stale["recorded"]) == ("a.jpg", "json", before)
    assert stale["now"] == source_stamp(photos["a.jpg"].stat()) != before

    assert repair(config, redis_client, found)["enqueued"] == {"enqueued": 1}
    report = _audit(config, redis_client)
    assert report["ok"] is True and _found(report) == {"photos": 2, "done": 1, "queued": 1}
    assert report["items"]["queued"][0]["stale_output"] is True


def test_hash_finds_other_content_under_the_same_size_and_mtime(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    photo = write_jpeg(config.producer.watch / "a.jpg", width=32, height=24)
    with photo.open("ab") as f:
        f.write(b"\0" * 16)  # after the image's end marker: decoders never read it
    Enqueuer(config, redis_client).submit(photo)
    _work(config, redis_client, tiny_backend)
    st = photo.stat()
    photo.write_bytes(photo.read_bytes()[:-1] + b"\1")  # other content, same size, and the mtime put back
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _found(_audit(config, redis_client)) == {"photos": 1, "done": 1}
    found = audit(config, redis_client, limit=100, check_hash=True)
    report = found.to_dict()
    assert report["ok"] is False and _found(report) == {"photos": 1, "stale": 1}
    (stale,) = report["items"]["stale"]
    assert stale["sha256_recorded"] != stale["sha256_now"] and stale["recorded"] == stale["now"]
    assert repair(config, redis_client, found)["enqueued"] == {"enqueued": 1}
    _work(config, redis_client, tiny_backend)
    assert _found(_audit(config, redis_client, check_hash=True)) == {"photos": 1, "done": 1}


def test_partial_sets_both_files_and_orphans(config: Config, redis_client: Redis, tiny_backend: Backend) -> None:
    photos = _done(config, redis_client, tiny_backend, "partial.jpg", "both.jpg", "gone.jpg", "trip/x.jpg")
    out = config.output.dir
    output_path(out, "partial.jpg", "npy").unlink()
    stamp = source_stamp(photos["both.jpg"].stat())
    error = {"source": "both.jpg", "job_id": "j", "error": {"type": "x", "message": "y"}, "source_stat": stamp}
    atomic_bytes(output_path(out, "both.jpg", "error"), json_bytes(error))
    photos["gone.jpg"].unlink()
    photos["trip/x.jpg"].unlink()
    (config.producer.watch / "trip").rmdir()
    # Data files of a photo with no sidecar and no job: a worker that died between the two.
    data_only = write_jpeg(config.producer.watch / "data-only.jpg", width=32, height=24, seed=5)
    output_path(out, "data-only.jpg", "npy").write_bytes(output_path(out, "both.jpg", "npy").read_bytes())
    (out / "stray.txt").write_text("the user's")
    report = _audit(config, redis_client)
    assert report["ok"] is False
    assert _found(report) == {"photos": 3, "done": 2, "lost": 1, "partial": 2, "both": 1, "orphans": 3}
    partial = {item["source"]: item for item in report["items"]["partial"]}
    assert partial["partial.jpg"]["missing"] == ["npy"]
    assert partial["data-only.jpg"]["data_files"] == ["npy"] and partial["data-only.jpg"]["state"] == "lost"
    assert _sources(report, "both") == ["both.jpg"]
    orphans = {item["source"]: item for item in report["items"]["orphans"]}
    assert set(orphans) == {"gone.jpg", "trip/x.jpg", "stray.txt"}
    assert orphans["gone.jpg"]["files"] == ["gone.jpg.depth.npy", "gone.jpg.json", "gone.jpg.preview.png"]
    assert orphans["trip/x.jpg"]["folder_gone"] is True and orphans["gone.jpg"]["folder_gone"] is False
    assert data_only.exists()
    # Orphans are listed, never deleted, even by --repair.
    repair(config, redis_client, audit(config, redis_client))
    assert output_path(out, "gone.jpg", "json").exists() and (out / "stray.txt").exists()
    assert output_path(out, "both.jpg", "error").exists() and output_path(out, "trip/x.jpg", "npy").exists()


def test_a_format_added_later_does_not_make_older_results_partial(
    make_config: Callable[..., Config], redis_client: Redis, tiny_backend: Backend
) -> None:
    """Partial means a file every result has is missing. A format added to output.formats is written
    for new photos; an older result without it is whole for what its job was asked."""
    config = make_config(output={"formats": ["ply"]})
    _done(config, redis_client, tiny_backend, "a.jpg", "b.jpg")
    out = config.output.dir
    output_path(out, "a.jpg", "ply").unlink()  # as if made before ply was asked for
    output_path(out, "b.jpg", "preview").unlink()
    report = _audit(config, redis_client)
    assert _found(report) == {"photos": 2, "done": 2, "partial": 1}
    assert report["items"]["partial"] == [{"source": "b.jpg", "missing": ["preview"], "state": "done"}]


def test_temporary_files_are_listed_and_repair_removes_only_the_old(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    _done(config, redis_client, tiny_backend, "day/a.jpg")
    npy = output_path(config.output.dir, "day/a.jpg", "npy")
    old = staged_write(npy, lambda f: f.write(b"left by a worker killed mid-write"))
    young = staged_write(output_path(config.output.dir, "day/a.jpg", "json"), lambda f: f.write(b"being written"))
    long_ago = time.time() - stale_temp_age_s(config.queue.job_timeout_s) - 60
    os.utime(old, (long_ago, long_ago))
    found = audit(config, redis_client, limit=100)
    report = found.to_dict()
    assert report["ok"] is True and _found(report) == {"photos": 1, "done": 1, "temporary": 2}
    removable = {item["file"]: item["removable"] for item in report["items"]["temporary"]}
    assert removable == {f"day/{old.name}": True, f"day/{young.name}": False}
    assert {item["source"] for item in report["items"]["temporary"]} == {"day/a.jpg"}
    did = repair(config, redis_client, found)
    assert (did["temporary_removed"], did["temporary_left"]) == (1, 1)
    assert not old.exists() and young.exists() and npy.exists()


def test_a_long_name_is_done_under_its_shortened_output_name(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    name = "ü" * 118 + ".jpg"
    assert len(name.encode()) == 240
    photo = _done(config, redis_client, tiny_backend, f"day/{name}")[f"day/{name}"]
    assert output_base(name) != name and (config.output.dir / "day" / f"{output_base(name)}.json").exists()
    report = _audit(config, redis_client)
    assert report["ok"] is True and _found(report) == {"photos": 1, "done": 1}
    photo.unlink()
    report = _audit(config, redis_client)
    assert _found(report) == {"orphans": 1}
    assert report["items"]["orphans"][0]["source"] == f"day/{name}"  # named by its sidecar, in full


def test_the_index_is_read_beside_its_writer_and_the_audit_works_without_it(
    config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    _done(config, redis_client, tiny_backend, "a.jpg", "b.jpg", "day/c.jpg")
    watcher = Watcher(config, Enqueuer(config, redis_client))
    watcher.rescan("start")  # reads the sidecars into the index
    watcher.index.close()
    writer = PhotoIndex.open_beside(config.output.dir)  # a watcher holds it, as in service
    assert writer is not None and not writer.read_only
    try:
        trusted = _audit(config, redis_client)
        assert trusted["index"] is True and trusted["sidecars_read"] == 0
        assert _found(trusted) == {"photos": 3, "done": 3}
        output_path(config.output.dir, "b.jpg", "json").unlink()  # the index says done; the listing says not
        contradicted = _audit(config, redis_client)
        assert _found(contradicted) == {"photos": 3, "done": 2, "lost": 1, "partial": 1}
        assert _sources(contradicted, "lost") == ["b.jpg"]
    finally:
        writer.close()
    for leftover in config.output.dir.glob(INDEX_NAME + "*"):
        leftover.unlink()
    without = _audit(config, redis_client)
    assert without["index"] is False and without["sidecars_read"] == 2
    assert _found(without) == _found(contradicted)


# --- the command, as a user runs it ---------------------------------------------------------------

# Runs the CLI and reports which heavy modules it loaded.
_PROBE = f"""
import sys
from depthq.cli import main
code = main(sys.argv[1:])
print("HEAVY:" + (",".join(m for m in {HEAVY!r} if m in sys.modules) or "none"), file=sys.stderr)
sys.exit(code)
"""


def _depthq(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
    return subprocess.run(
        [sys.executable, "-c", _PROBE, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def _done_by_hand(config: Config, name: str) -> None:
    """A photo with the outputs a worker leaves (its sidecar records the photo's size and mtime)."""
    photo = write_jpeg(config.producer.watch / name, width=32, height=24)
    sidecar = {"source": name, "sha256": "0" * 64, "source_stat": source_stamp(photo.stat()), "camera": None}
    atomic_bytes(output_path(config.output.dir, name, "npy"), b"\x93NUMPY")
    atomic_bytes(output_path(config.output.dir, name, "preview"), b"\x89PNG")
    atomic_bytes(output_path(config.output.dir, name, "json"), json_bytes(sidecar))


def test_the_command_prints_json_and_exits_by_what_it_found(
    config: Config, redis_client: Redis, write_config_file: Callable[..., Path], tmp_path: Path
) -> None:
    _done_by_hand(config, "a.jpg")
    path = write_config_file(config)
    clean = _depthq("audit", "--json", "--config", str(path))
    assert clean.returncode == 0, clean.stderr
    assert "HEAVY:none" in clean.stderr  # a watcher host's command: no numpy, torch or coremltools
    report = json.loads(clean.stdout)
    assert set(report) >= {"ok", "counts", "items", "seconds"}
    assert report["ok"] is True and set(report["counts"]) == {"photos", *KINDS}
    assert all(isinstance(n, int) for n in report["counts"].values()) and report["seconds"] >= 0
    assert _found(report) == {"photos": 1, "done": 1} and report["items"] == {"done": [{"source": "a.jpg"}]}

    write_jpeg(config.producer.watch / "lost.jpg", width=32, height=24, seed=3)
    lost = _depthq("audit", "--json", "--limit", "0", "--config", str(path))
    assert lost.returncode == 1, lost.stderr
    report = json.loads(lost.stdout)
    assert report["ok"] is False and report["counts"]["lost"] == 1 and report["items"] == {}

    table = _depthq("audit", "--repair", "--config", str(path))
    assert table.returncode == 1, table.stderr  # what it found; the repair is said below the tables
    assert "lost.jpg" in table.stdout
    assert "repair: lost and stale photos sent to the backfill lane: 1 enqueued" in table.stdout
    assert make_queue(redis_client, config, "backfill").count == 1
    assert _depthq("audit", "--config", str(path)).returncode == 0

    bad = write_config_file(config, "bad.yaml", output={"dir": str(config.output.dir), "formatz": ["ply"]})
    wrong = _depthq("audit", "--config", str(bad))
    assert wrong.returncode == 2 and "formatz" in wrong.stderr
    unmounted = write_config_file(config, "unmounted.yaml", producer={"watch": str(tmp_path / "not-mounted")})
    missing = _depthq("audit", "--config", str(unmounted))
    assert missing.returncode == 2 and "producer.watch" in missing.stderr


def test_the_walk_skips_the_output_inside_the_watched_folder_hidden_and_linked_folders(
    make_config: Callable[..., Config], redis_client: Redis, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    config = make_config(output={"dir": str(inbox / "depth-out")})  # its previews are .png: no photos
    _done_by_hand(config, "a.jpg")
    _done_by_hand(config, "day/b.jpg")
    write_jpeg(inbox / ".thumbnails" / "t.jpg", width=8, height=8)  # hidden: the watcher passes it by
    elsewhere = write_jpeg(tmp_path / "elsewhere" / "e.jpg", width=8, height=8).parent
    (inbox / "linked").symlink_to(elsewhere, target_is_directory=True)  # followed by no walk
    report = _audit(config, redis_client)
    assert report["ok"] is True and _found(report) == {"photos": 2, "done": 2}
