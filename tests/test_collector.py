"""producer/collector.py (redis transport): results sent through Redis become files in the output folder,
whatever happens to the collector or the disk, and one that can never be written holds up no other."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from redis import Redis

import producer.collector as collector_module
from depthq.config import Config
from depthq.contract import (
    inflight_key,
    result_key,
    results_stream,
)
from producer.collector import Collector
from producer.enqueue import Enqueuer
from testkit.photos import write_jpeg
from testkit.tiny_model import expected_depth
from tests import disk
from tests.endstate import assert_end_state, temporary_files
from worker.backends import Backend
from worker.worker import build_worker


def _work(config: Config, redis_client: Redis, backend: Backend) -> None:
    build_worker(config, redis_client, backend).work(burst=True, with_scheduler=False)


def test_a_collector_that_dies_mid_write_loses_nothing(
    producer_config: Config,
    worker_config: Config,
    redis_client: Redis,
    tiny_backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    photo = write_jpeg(producer_config.producer.watch / "a.jpg")
    jid = Enqueuer(producer_config, redis_client).submit(photo).job_id
    _work(worker_config, redis_client, tiny_backend)

    real_write = collector_module.write_outputs

    def dies_after_the_first_file(root: Path, source: str, files: dict[str, bytes]) -> None:
        real_write(root, source, {"npy": files["npy"]})
        (root / f".{source}.preview.png.k1ll3d.tmp").write_bytes(files["preview"][:100])  # half a file
        raise SystemExit("killed mid-write")

    monkeypatch.setattr(collector_module, "write_outputs", dies_after_the_first_file)
    doomed = Collector(producer_config, redis_client, name="doomed")
    doomed.ensure_group()
    with pytest.raises(SystemExit):
        doomed.collect_new()
    monkeypatch.setattr(collector_module, "write_outputs", real_write)
    out = producer_config.output.dir
    assert not (out / "a.jpg.json").exists()  # half a set, and no sidecar saying otherwise
    assert redis_client.exists(result_key(producer_config.queue.name, jid))

    # Another collector takes the entry over once it has been idle for claim_after_s.
    survivor = Collector(producer_config, redis_client, name="survivor")
    survivor.claim_after_ms = 0
    assert survivor.collect_new() == 0  # nothing new: the entry is pending with the dead one
    assert survivor.claim_abandoned() == 1
    assert json.loads((out / "a.jpg.json").read_text())["job_id"] == jid
    np.testing.assert_allclose(np.load(out / "a.jpg.depth.npy"), expected_depth(64, 48), rtol=1e-5)
    assert not list(out.glob(".*.tmp"))  # the dead collector's half-written file is gone too
    assert redis_client.xlen(results_stream(producer_config.queue.name)) == 0
    assert not redis_client.exists(result_key(producer_config.queue.name, jid))
    assert_end_state(producer_config, redis_client)


def test_a_restarted_collector_finishes_its_own_pending_entries_first(
    producer_config: Config, worker_config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    photo = write_jpeg(producer_config.producer.watch / "a.jpg")
    Enqueuer(producer_config, redis_client).submit(photo)
    _work(worker_config, redis_client, tiny_backend)
    first = Collector(producer_config, redis_client, name="collector@a")
    first.ensure_group()
    # Read, then "crash" before writing anything: the entry is pending for collector@a.
    assert len(first._read(">")) == 1
    again = Collector(producer_config, redis_client, name="collector@a")
    assert again.collect_new() == 0
    assert again.collect_pending() == 0  # written: nothing held back
    assert (producer_config.output.dir / "a.jpg.json").exists()
    assert_end_state(producer_config, redis_client)


def test_a_result_that_cannot_be_decoded_becomes_an_error_file_and_the_collector_goes_on(
    producer_config: Config, worker_config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    q = producer_config.queue.name
    redis_client.hset(result_key(q, "bad"), mapping={"npy": b"not zstd", "json": b"{}"})
    redis_client.hset(inflight_key(q), "bad", 10)
    redis_client.xadd(results_stream(q), {"job": "bad", "source": "odd.jpg"})
    Enqueuer(producer_config, redis_client).submit(write_jpeg(producer_config.producer.watch / "fine.jpg"))
    _work(worker_config, redis_client, tiny_backend)
    assert Collector(producer_config, redis_client).collect_new() == 2
    out = producer_config.output.dir
    error = json.loads((out / "odd.jpg.error.json").read_text())
    assert "could not be decompressed" in error["error"]["message"]
    assert not (out / "odd.jpg.depth.npy").exists() and not (out / "odd.jpg.json").exists()
    assert (out / "fine.jpg.json").exists()
    assert redis_client.hlen(inflight_key(q)) == 0 and not redis_client.exists(result_key(q, "bad"))
    assert_end_state(producer_config, redis_client)


def test_a_result_that_can_never_be_written_is_that_photos_error_and_holds_up_no_other(
    producer_config: Config, worker_config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    """One result the collector could not write (it took "File name too long" for a full disk) was
    retried every 5 s for ever, and nothing behind it was collected. A result no retry can write is
    that photo's failure; only the disk's own trouble is waited out."""
    watch, out = producer_config.producer.watch, producer_config.output.dir
    enqueuer = Enqueuer(producer_config, redis_client)
    enqueuer.submit(write_jpeg(watch / "blocked" / "a.jpg", seed=1))
    out.mkdir(parents=True)
    (out / "blocked").write_text("a file where the photo's output folder goes")
    for i in range(3):
        enqueuer.submit(write_jpeg(watch / f"b{i}.jpg", seed=10 + i))
    _work(worker_config, redis_client, tiny_backend)
    collector = Collector(producer_config, redis_client)
    collector.ensure_group()
    assert collector.collect_new() == 4
    assert collector.collect_pending() == 0  # nothing held back: the blocked one is settled too
    assert all((out / f"b{i}.jpg.json").exists() for i in range(3))
    (out / "blocked").unlink()  # the error file could not go there either: said in the log, and let go
    assert redis_client.xlen(results_stream(producer_config.queue.name)) == 0
    assert_end_state(producer_config, redis_client)


def test_a_result_the_collector_cannot_write_gets_an_error_file_naming_why(
    producer_config: Config, worker_config: Config, redis_client: Redis, tiny_backend: Backend
) -> None:
    watch, out = producer_config.producer.watch, producer_config.output.dir
    enqueuer = Enqueuer(producer_config, redis_client)
    photo = write_jpeg(watch / "a.jpg", seed=1)
    enqueuer.submit(photo)
    (out / "a.jpg.depth.npy").mkdir(parents=True)  # a folder where the depth map goes
    (out / "a.jpg.depth.npy" / "keep").write_text("x")
    enqueuer.submit(write_jpeg(watch / "b.jpg", seed=2))
    _work(worker_config, redis_client, tiny_backend)
    collector = Collector(producer_config, redis_client)
    collector.ensure_group()
    assert collector.collect_new() == 2
    error = json.loads((out / "a.jpg.error.json").read_text())
    assert error["error"]["type"] == "unwritable_result" and "a.jpg" in error["error"]["message"]
    assert "rename the photo or the folder" in error["error"]["message"]
    assert error["job_id"]
    assert (out / "b.jpg.json").exists()
    assert_end_state(producer_config, redis_client)


def test_a_full_output_disk_holds_results_in_redis_and_they_follow_once_it_has_room(
    make_config: Callable[..., Config],
    worker_config: Config,
    redis_client: Redis,
    tiny_backend: Backend,
    tmp_path: Path,
) -> None:
    from depthq.ops.status import gather

    with disk.small_disk(tmp_path / "small-out", "1m") as out:
        config = make_config(transport={"mode": "redis"}, output={"dir": str(out)})
        enqueuer = Enqueuer(config, redis_client)
        for i in range(3):
            enqueuer.submit(write_jpeg(config.producer.watch / f"p{i}.jpg", seed=i))
        _work(worker_config, redis_client, tiny_backend)
        filler = disk.fill(out, leave_bytes=0)
        collector = Collector(config, redis_client)
        collector.ensure_group()
        assert collector.collect_new() == 3
        assert collector.collect_pending() == 3  # each tried, each held back: nothing is their fault
        assert collector.disk_failing and any("output disk full" in a for a in gather(redis_client, config).alerts)
        assert not list(out.glob("*.error.json")) and temporary_files(out) == []
        filler.unlink()
        assert collector.collect_pending() == 0
        assert all((out / f"p{i}.jpg.json").exists() for i in range(3))
        assert not collector.disk_failing and not gather(redis_client, config).alerts
        assert_end_state(config, redis_client)
