"""`depthq failed list|retry|purge` on a real Redis, with jobs that really failed in a real worker."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from redis import Redis
from rq.job import Job

from depthq.cli import main
from depthq.config import Config
from depthq.contract import make_queue, output_path
from producer.enqueue import Enqueuer
from testkit.photos import write_jpeg
from worker.backends import Backend
from worker.worker import build_worker


def test_list_then_retry_a_fixed_photo_then_purge(
    make_config: Callable[..., Config],
    redis_client: Redis,
    redis_url: str,
    tiny_backend: Backend,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = make_config()
    inbox, out = config.producer.watch, config.output.dir
    (inbox / "broken.jpg").write_bytes(b"half a download")
    (inbox / "notes.jpg").write_bytes(b"a text file with the wrong name")
    enqueuer = Enqueuer(config, redis_client)
    jobs = {name: enqueuer.submit(inbox / name).job_id for name in ("broken.jpg", "notes.jpg")}

    def work() -> None:
        build_worker(config, redis_client, tiny_backend).work(burst=True, with_scheduler=False)

    def failed() -> list[dict]:
        assert main(["failed", "list", "--json", "--redis-url", redis_url]) == 0
        return json.loads(capsys.readouterr().out)

    work()
    listed = failed()
    assert {f["source"]: f["job_id"] for f in listed} == jobs
    broken = next(f for f in listed if f["source"] == "broken.jpg")
    assert "broken.jpg" in broken["error"] and "BadInputError" in broken["error"] and broken["failed_at"]
    assert main(["failed", "list", "--redis-url", redis_url]) == 0
    assert "2 failed job(s)" in capsys.readouterr().out

    # The user replaces the photo with a good copy and retries it by name.
    write_jpeg(inbox / "broken.jpg", width=40, height=30)
    assert main(["failed", "retry", "broken.jpg", "--redis-url", redis_url]) == 0
    assert "requeued 1 job(s)" in capsys.readouterr().out
    work()
    assert json.loads(output_path(out, "broken.jpg", "json").read_text())["width"] == 40
    assert not output_path(out, "broken.jpg", "error").exists()
    assert [f["source"] for f in failed()] == ["notes.jpg"]

    assert main(["failed", "retry", "nope.jpg", "--redis-url", redis_url]) == 1
    assert "nope.jpg: no failed job" in capsys.readouterr().err
    assert main(["failed", "purge", "--redis-url", redis_url]) == 2
    assert "--all" in capsys.readouterr().err
    assert main(["failed", "purge", "--all", "--redis-url", redis_url]) == 0
    assert "purged 1 job(s)" in capsys.readouterr().out
    assert make_queue(redis_client, config).failed_job_registry.count == 0
    assert not Job.exists(jobs["notes.jpg"], connection=redis_client)
    # Its error file stays: it is the user's record of why the photo has no depth.
    assert output_path(out, "notes.jpg", "error").exists()


def _rows(table: str, key: str) -> list[dict[str, list[str]]]:
    """A rendered rich table's rows: header -> the cell's lines (a folded cell spans several). A row
    starts at each line where the `key` column, which never folds, has text."""
    lines = table.splitlines()
    headers = [cell.strip() for cell in next(line for line in lines if f" {key} " in line).split("┃")]
    rows: list[dict[str, list[str]]] = []
    for line in (line for line in lines if line.startswith("│")):
        cells = dict(zip(headers, (cell.strip() for cell in line.split("│")), strict=True))
        if cells[key]:
            rows.append({header: [] for header in headers if header})
        for header, lines_of_cell in rows[-1].items():
            if cells[header]:
                lines_of_cell.append(cells[header])
    return rows


def _unfolded(lines: list[str]) -> str:
    """A folded cell's text with its spaces dropped, as wrapping drops the space at each break."""
    return "".join(lines).replace(" ", "")


def test_the_list_fits_80_columns_and_json_keeps_the_error_type(
    make_config: Callable[..., Config],
    redis_client: Redis,
    redis_url: str,
    tiny_backend: Backend,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 80 columns: the photo, when, and the message, without `worker.errors.BadInputError:` and with
    no timestamp cut; the job id and the type in --json, and beside the rest in a wide terminal."""
    config = make_config()
    inbox = config.producer.watch
    (inbox / "trips" / "2024-06 Lisbon").mkdir(parents=True)
    names = ["trips/2024-06 Lisbon/IMG_20240612_153012.jpg", "notes.jpg"]
    (inbox / names[0]).write_bytes(b"half a download")
    (inbox / names[1]).write_bytes(b"a text file with the wrong name")
    enqueuer = Enqueuer(config, redis_client)
    for name in names:
        enqueuer.submit(inbox / name)
    build_worker(config, redis_client, tiny_backend).work(burst=True, with_scheduler=False)

    assert main(["failed", "list", "--json", "--redis-url", redis_url]) == 0
    listed = {f["source"]: f for f in json.loads(capsys.readouterr().out)}
    assert set(listed) == set(names)
    for f in listed.values():
        assert f["error_type"] == "worker.errors.BadInputError"
        assert f["error"] == f"{f['error_type']}: {f['message']}" and f["message"].startswith(f"{f['source']}: ")

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["failed", "list", "--redis-url", redis_url]) == 0
    table = capsys.readouterr().out
    assert max(len(line) for line in table.splitlines()) <= 80, table
    assert "Error" not in table and "worker.errors" not in table and "…" not in table, table
    rows = _rows(table, "failed (UTC)")
    assert len(rows) == 2 and all(list(row) == ["photo", "failed (UTC)", "error"] for row in rows)
    for row in rows:
        f = next(f for f in listed.values() if _unfolded(row["photo"]) == f["source"].replace(" ", ""))
        # One line, whole: the second it failed, in UTC as --json has it.
        assert row["failed (UTC)"] == [datetime.fromisoformat(f["failed_at"]).strftime("%Y-%m-%d %H:%M:%S")]
        # The message in full, folded, not cut; less the photo it begins with, which has its column.
        assert _unfolded(row["error"]) == f["message"].removeprefix(f"{f['source']}: ").replace(" ", "")

    monkeypatch.setenv("COLUMNS", "160")
    assert main(["failed", "list", "--redis-url", redis_url]) == 0
    wide = capsys.readouterr().out
    assert max(len(line) for line in wide.splitlines()) <= 160
    rows = _rows(wide, "job")
    assert sorted(row["job"][0] for row in rows) == sorted(f["job_id"] for f in listed.values())
    assert all(len(row["job"]) == 1 and row["error"][0].startswith("BadInputError: ") for row in rows)
    if os.environ.get("TEST_ARTIFACTS"):
        artifacts = Path(os.environ["TEST_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        (artifacts / "failed-80.txt").write_text(table)
