"""`depthq failed list|retry|purge` on a real Redis, with jobs that really failed in a real worker."""

from __future__ import annotations

import json
from collections.abc import Callable

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
