"""`depthq status` and the job stages behind it, read from a real Redis while a real worker runs a job."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import Worker
from rq.job import Job

import depthq.ops.status as status_module
from depthq.cli import main
from depthq.clip_jobs import chunk_job_ids
from depthq.config import Config
from depthq.contract import SERIALIZER, Completion, completions_key, make_queue, record_completion, watches_key
from depthq.ops.status import ClipRow, Status, gather
from producer.enqueue import Enqueuer
from testkit.backends import Looking
from testkit.clips import write_clip
from testkit.photos import write_jpeg
from worker import clip_assembly
from worker.backends import Backend
from worker.store import OutputStore
from worker.worker import build_worker


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config()


def test_a_running_job_shows_its_stage_and_worker(
    config: Config, redis_client: Redis, tiny_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Status] = []
    looked_at: list[float] = []
    stages: list[str] = []
    backend = Looking(tiny_backend, lambda: (looked_at.append(time.time()), seen.append(gather(redis_client, config))))
    submitted = Enqueuer(config, redis_client).submit(write_jpeg(config.producer.watch / "a.jpg", width=64, height=48))

    def meta() -> dict[str, Any]:
        return Job.fetch(submitted.job_id, connection=redis_client, serializer=SERIALIZER).get_meta(refresh=True)

    write_data = OutputStore.write_data

    def spying_write_data(self: OutputStore, *args: Any, **kwargs: Any) -> Any:
        stages.append(meta()["stage"])
        return write_data(self, *args, **kwargs)

    monkeypatch.setattr(OutputStore, "write_data", spying_write_data)
    before_work = time.time()
    build_worker(config, redis_client, backend).work(burst=True, with_scheduler=False)

    (during,) = seen
    (row,) = during.workers
    assert (row.state, row.source, row.stage, row.backend, row.device) == ("busy", "a.jpg", "inferring", "torch", "cpu")
    # The job started after the worker did, and before the look in the middle of its forward pass.
    assert row.job_age_s is not None and 0 <= row.job_age_s <= looked_at[0] - before_work
    assert not row.foreign
    assert during.running == 1 and during.queued == 0
    assert stages == ["writing"]
    final = meta()
    assert final["stage"] == "done" and final["backend"] == "torch"
    assert set(final["timings_ms"]) >= {"queue_wait", "decode", "inference", "write", "total"}

    after = gather(redis_client, config)
    assert after.workers == []  # a burst worker leaves when the queue is empty
    assert [w.done for w in after.windows] == [1, 1]
    assert after.windows[0].total_p50_s == pytest.approx(final["timings_ms"]["total"] / 1000.0)


def test_throughput_and_percentiles_over_each_window(config: Config, redis_client: Redis) -> None:
    now = 1_800_000_000.0
    with redis_client.pipeline() as pipe:
        # 100 completions a minute apart, oldest first (99 minutes ago): the trim keeps the last hour.
        for i in reversed(range(100)):
            c = Completion(f"j{i}", "mini-1", "coreml", now - 60 * i, queue_wait_s=i, total_s=i + 3.0)
            record_completion(pipe, config.queue.name, c)
        pipe.execute()
    assert redis_client.zcard(completions_key(config.queue.name)) == 60
    status = gather(redis_client, config, now=now)
    five, hour = status.windows
    assert (five.minutes, five.done, five.jobs_per_min) == (5, 6, 6 / 5)  # ended 0..5 minutes ago
    assert (hour.done, hour.jobs_per_min) == (60, 1.0)
    assert five.queue_wait_p50_s == pytest.approx(2.5) and five.total_p50_s == pytest.approx(5.5)
    assert hour.queue_wait_p95_s == pytest.approx(0.95 * 59)
    assert status.oldest_queued_age_s is None and status.failed == 0


def test_oldest_queued_age_and_json_output(
    config: Config, redis_client: Redis, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    Enqueuer(config, redis_client).submit(write_jpeg(config.producer.watch / "waiting.jpg"))
    for i in range(2):  # what a scan found: the backfill lane
        Enqueuer(config, redis_client, lane="backfill").submit(
            write_jpeg(config.producer.watch / f"{i}.jpg", seed=10 + i)
        )
    assert main(["status", "--json", "--redis-url", redis_url]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["queued"] == 3 and status["oldest_queued_age_s"] >= 0
    assert {lane: s["queued"] for lane, s in status["lanes"].items()} == {"live": 1, "backfill": 2}
    assert status["lanes"]["backfill"]["queue"] == "depthq-backfill"
    assert [w["minutes"] for w in status["windows"]] == [5, 60]
    assert status["transit"] is None  # the shared transport keeps nothing in Redis but the job
    assert main(["status", "--redis-url", redis_url]) == 0
    table = capsys.readouterr().out
    assert "queue depthq" in table and "oldest queued" in table and "0 worker(s) on 0 host(s)" in table
    assert "3 (1 live, 2 backfill)" in table


def test_a_young_service_is_rated_over_the_time_it_has_run(config: Config, redis_client: Redis) -> None:
    """Six photos in a service 3 minutes old: 2 a minute, not 6 / 5."""
    now = 1_800_000_000.0
    with redis_client.pipeline() as pipe:
        for i in range(6):  # the first enqueued 180 s ago, each taking 10 s end to end
            record_completion(pipe, config.queue.name, Completion(f"j{i}", "h", "torch", now - 170 + 30 * i, 0.5, 10.0))
        pipe.execute()
    five, hour = gather(redis_client, config, now=now).windows
    assert (five.done, hour.done) == (6, 6)
    assert five.jobs_per_min == pytest.approx(2.0) and hour.jobs_per_min == pytest.approx(2.0)


def test_the_tables_fit_80_columns_without_cutting_a_name(
    config: Config,
    redis_client: Redis,
    redis_url: str,
    tiny_backend: Backend,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`depthq status` at 80 columns, looked at while a worker on a Mac-length host name computes a photo
    deep in folders, beside a plain rq worker: names and times whole, only the photo folded; and every
    column where they all fit."""
    monkeypatch.setattr(socket, "gethostname", lambda: "mac-mini-studio.local")
    redis_client.hset(watches_key(config.queue.name), "mac-mini-studio", "1200 1300")
    foreign = Worker([make_queue(redis_client, config)], connection=redis_client)
    foreign.register_birth()
    photo = "trips/2024-06 Lisbon/IMG_20240612_153012.jpg"
    (config.producer.watch / "trips" / "2024-06 Lisbon").mkdir(parents=True)
    Enqueuer(config, redis_client).submit(write_jpeg(config.producer.watch / photo))
    tables: dict[int, str] = {}

    def look() -> None:
        for width in (80, 160):
            monkeypatch.setenv("COLUMNS", str(width))
            assert main(["status", "--redis-url", redis_url]) == 0
            tables[width] = capsys.readouterr().out

    worker = build_worker(config, redis_client, Looking(tiny_backend, look))
    worker.work(burst=True, with_scheduler=False)
    foreign.register_death()

    table = tables[80]
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 80, table
    assert "…" not in table, table
    # The names, each whole on its line: the worker names say the host (a plain rq worker's note says it).
    for name in (worker.name, foreign.name):
        assert any(line.startswith(f"│ {name} ") for line in lines), (name, table)
    assert any(line.startswith("│ inotify watches on mac-mini-studio ") for line in lines), table
    # The stage and the photo, folded down their column but whole.
    doing = "".join(line.split("│")[2] for line in lines if line.startswith("│ ") and line.count("│") == 5)
    assert f"inferring:{photo}".replace(" ", "") in doing.replace(" ", ""), table
    assert "notadepthqworker,onmac-mini-studio:stopit" in doing.replace(" ", ""), table
    # Each worker's times on its first line, whole: how long the job has run, and its last heartbeat.
    assert re.search(rf"^│ {re.escape(worker.name)} +│ inferring: .*│ \d+\.\d\d s +│ \d+\.\d\d s ago │$", table, re.M)
    assert re.search(rf"^│ {foreign.name} +│ .*│ - +│ \d+\.\d\d s ago │$", table, re.M), table
    rates = next(line for line in lines if "jobs/min" in line)
    assert [cell.strip() for cell in rates.split("┃")[1:-1]] == [
        *("last", "done", "jobs/min", "wait p50", "wait p95", "total p50", "total p95")
    ]

    wide = tables[160]
    assert max(len(line) for line in wide.splitlines()) <= 160 and "…" not in wide, wide
    header = next(line for line in wide.splitlines() if "┃ host " in line)
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == [
        *("host", "worker", "backend", "device", "state", "photo", "stage", "running for", "heartbeat")
    ]
    row = next(line for line in wide.splitlines() if f" {worker.name} " in line)
    assert [cell.strip() for cell in row.split("│")[1:5]] == ["mac-mini-studio.local", worker.name, "torch", "cpu"]
    if os.environ.get("TEST_ARTIFACTS"):
        artifacts = Path(os.environ["TEST_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        (artifacts / "status-80.txt").write_text(table)


def test_a_clip_in_progress_shows_its_frames_done_its_chunks_and_the_hosts_on_it(
    make_config: Callable[..., Config],
    redis_client: Redis,
    redis_url: str,
    tiny_backend: Backend,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A clip of 10 frames in chunks of 4 (4, 4, 2), deep in folders, on a Mac-length host name: looked at
    before any work, in the middle of each chunk, while it is assembled, and at 80 columns."""
    monkeypatch.setattr(socket, "gethostname", lambda: "mac-mini-studio.local")
    config = make_config(video={"chunk_frames": 4})
    clip = "trips/2024-06 Lisbon/VID_20240612_153012.mp4"
    Enqueuer(config, redis_client).submit(write_clip(config.producer.watch / clip, frames=10))

    (waiting,) = gather(redis_client, config).clips
    assert (waiting.source, waiting.lane, waiting.frames_done, waiting.frames) == (clip, "live", 0, 10)
    assert (waiting.chunks_done, waiting.chunks, waiting.chunks_running, waiting.hosts) == (0, 3, 0, {})
    assert not waiting.assembling

    seen: list[ClipRow] = []
    tables: list[str] = []

    def look() -> None:
        (row,) = gather(redis_client, config).clips
        seen.append(row)
        if len(seen) == 5:  # chunk 2's first frame: chunk 1 is done
            monkeypatch.setenv("COLUMNS", "80")
            assert main(["status", "--redis-url", redis_url]) == 0
            tables.append(capsys.readouterr().out)
            assert main(["status", "--json", "--redis-url", redis_url]) == 0
            tables.append(capsys.readouterr().out)

    worker = build_worker(config, redis_client, Looking(tiny_backend, look))
    worker.work(burst=True, max_jobs=2, with_scheduler=False)  # two of the three chunks
    assert len(seen) == 8  # a look per frame computed
    host = "mac-mini-studio"
    first, second = seen[0], seen[4]
    assert (first.frames_done, first.chunks_done, first.chunks_running, first.hosts) == (0, 0, 1, {host: 0})
    assert (second.frames_done, second.chunks_done, second.chunks_running, second.hosts) == (4, 1, 1, {host: 4})
    (after_two,) = gather(redis_client, config).clips
    assert (after_two.frames_done, after_two.chunks_done, after_two.chunks_running) == (8, 2, 0)
    assert after_two.hosts == {host: 8}

    table, as_json = tables
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in table, table
    top = next(i for i, line in enumerate(lines) if line.startswith("1 clip(s) in progress"))
    header = lines[top + 2]
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["clip", "frames", "chunks", "hosts"], table
    rows = lines[top + 4 : lines.index(next(line for line in lines[top:] if line.startswith("└")))]
    # Frames done of the clip's, its chunks, its host whole; the clip's name folded down its column, whole.
    assert re.fullmatch(r"│ trips/2024-06 +│ +4/10 │ 1/3 done, 1 running +│ mac-mini-studio +│", rows[0]), table
    assert "".join(row.split("│")[1].strip() for row in rows) == clip.replace(" ", ""), table
    (listed,) = json.loads(as_json)["clips"]
    assert (listed["source"], listed["frames_done"], listed["frames"], listed["hosts"]) == (clip, 4, 10, {host: 4})

    assembling: list[ClipRow] = []
    focal = clip_assembly.clip_focal_px

    def looking_focal(*args: Any, **kwargs: Any) -> Any:
        assembling.extend(gather(redis_client, config).clips)
        return focal(*args, **kwargs)

    monkeypatch.setattr(clip_assembly, "clip_focal_px", looking_focal)
    build_worker(config, redis_client, tiny_backend).work(burst=True, with_scheduler=False)
    (row,) = assembling
    assert row.assembling and (row.frames_done, row.chunks_done, row.hosts) == (10, 3, {host: 10})
    assert gather(redis_client, config).clips == []
    assert json.loads((config.output.dir / (clip + ".json")).read_text())["frames_computed"] == 10


def test_clips_are_listed_oldest_first_from_both_lanes_and_the_rest_counted(
    make_config: Callable[..., Config],
    redis_client: Redis,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Live first, each lane oldest first; past CLIPS_SHOWN the rest are counted, not read."""
    config = make_config(video={"chunk_frames": 4})
    watch = config.producer.watch
    first = Enqueuer(config, redis_client).submit(write_clip(watch / "a.mp4", frames=5))
    Enqueuer(config, redis_client).submit(write_clip(watch / "b.mov", frames=3))
    Enqueuer(config, redis_client, lane="backfill").submit(write_clip(watch / "old/c.mkv", frames=9))
    clips = gather(redis_client, config).clips
    assert [(c.source, c.lane, c.frames, c.chunks) for c in clips] == [
        ("a.mp4", "live", 5, 2),
        ("b.mov", "live", 3, 1),
        ("old/c.mkv", "backfill", 9, 3),
    ]
    monkeypatch.setattr(status_module, "CLIPS_SHOWN", 2)
    status = gather(redis_client, config)
    assert [c.source for c in status.clips] == ["a.mp4", "b.mov"] and status.clips_not_shown == 1
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["status", "--redis-url", redis_url]) == 0
    table = capsys.readouterr().out
    assert "3 clip(s) in progress" in table and "and 1 more, not shown" in table
    assert "old/c.mkv" not in table

    # Its first chunk's job deleted (from the dashboard, say): how many frames are done is not known.
    Job.fetch(chunk_job_ids(first.job_id, 1)[0], connection=redis_client, serializer=SERIALIZER).delete()
    (unknown, _) = gather(redis_client, config).clips
    assert (unknown.source, unknown.frames_done, unknown.frames) == ("a.mp4", None, 5)
    assert main(["status", "--redis-url", redis_url]) == 0
    assert re.search(r"^│ a\.mp4 +│ +\?/5 │", capsys.readouterr().out, re.M)
