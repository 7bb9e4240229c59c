"""A folder that only grows: the index of what is done, the live lane ahead of the backfill, polling
by folder, and the gallery's newest results, against a real Redis, real files and the tiny model."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import PurePath

import numpy as np
from redis import Redis
from rq.job import Job

from depthq.config import Config
from depthq.contract import LANES, RECENT_MAX, SERIALIZER, make_queue, output_path, recent_key
from producer.enqueue import Enqueuer
from producer.index import INDEX_NAME
from producer.poller import FolderPoller
from producer.watcher import Watcher
from testkit.photos import write_jpeg
from testkit.waiting import wait_for
from testkit.watching import watching
from tests.endstate import assert_end_state
from tests.test_watcher import jobs
from worker.backends import Backend
from worker.backends.base import Prediction
from worker.worker import build_worker


def _scan(config: Config, redis_client: Redis) -> Watcher:
    """A watcher's start-up scan, done here and now, its index closed after (as at a restart)."""
    watcher = Watcher(config, Enqueuer(config, redis_client))
    watcher.rescan("start")
    watcher.index.close()
    return watcher


def test_the_index_survives_deletion(
    make_config: Callable[..., Config], redis_client: Redis, tiny_backend: Backend
) -> None:
    """Lose the index: the restart reads the sidecars again and computes nothing already done. Delete
    one output set by hand: that photo, and only it, is computed again."""
    config = make_config(producer={"settle_ms": 0})
    for i in range(12):
        write_jpeg(config.producer.watch / f"day{i % 3}" / f"{i:02d}.jpg", width=64, height=48, seed=i)
    first = _scan(config, redis_client)
    assert first.last_scan is not None and first.last_scan.found == 12
    build_worker(config, redis_client, tiny_backend).work(burst=True, with_scheduler=False)
    sidecars = sorted(config.output.dir.rglob("*.jpg.json"))
    assert len(sidecars) == 12

    learned = _scan(config, redis_client).last_scan  # the sidecars are read once, into the index
    assert learned is not None and (learned.done, learned.sidecars_read, learned.found) == (12, 12, 0)
    trusted = _scan(config, redis_client).last_scan  # then trusted: a walk and a stat per photo
    assert trusted is not None and (trusted.done, trusted.sidecars_read, trusted.found) == (12, 0, 0)

    (config.output.dir / INDEX_NAME).unlink()
    for leftover in config.output.dir.glob(INDEX_NAME + "-*"):
        leftover.unlink()
    rebuilt = _scan(config, redis_client).last_scan
    assert rebuilt is not None and (rebuilt.done, rebuilt.sidecars_read, rebuilt.found) == (12, 12, 0)
    assert jobs(Enqueuer(config, redis_client)) == []  # nothing done is computed again

    victim = "day1/04.jpg"
    written = {kind: output_path(config.output.dir, victim, kind) for kind in ("json", "npy", "preview")}
    for path in written.values():
        path.unlink()
    again = _scan(config, redis_client).last_scan
    assert again is not None and (again.done, again.sidecars_read, again.found) == (11, 0, 1)
    build_worker(config, redis_client, tiny_backend).work(burst=True, with_scheduler=False)
    assert all(path.exists() for path in written.values())
    assert json.loads(written["json"].read_text())["source"] == victim
    assert sorted(config.output.dir.rglob("*.jpg.json")) == sidecars
    assert_end_state(config, redis_client)


class _DropsALivePhoto:
    """The tiny model, which drops a new photo into the watched folder during its third backfill job
    and waits until the watcher has given it a job, as a user's drop would arrive mid-backfill."""

    def __init__(self, inner: Backend, drop: Callable[[], None]):
        self.inner, self.drop, self.calls = inner, drop, 0
        self.name, self.device, self.model_name = inner.name, inner.device, inner.model_name
        self.input_size, self.warnings = inner.input_size, inner.warnings

    def load(self) -> None:
        pass

    def predict(self, rgb: np.ndarray) -> Prediction:
        self.calls += 1
        if self.calls == 3:
            self.drop()
        return self.inner.predict(rgb)


def test_a_live_drop_during_a_long_backfill_is_done_before_it(
    make_config: Callable[..., Config], redis_client: Redis, tiny_backend: Backend
) -> None:
    config = make_config(producer={"settle_ms": 0})
    inbox = config.producer.watch
    for i in range(15):  # an archive copied in while the producer was down
        write_jpeg(inbox / "import" / f"{i:02d}.jpg", width=64, height=48, seed=i)
    enqueuer = Enqueuer(config, redis_client)
    live, backfill = (make_queue(redis_client, config, lane) for lane in LANES)
    live_photo = inbox / "just now.jpg"

    def drop() -> None:
        write_jpeg(live_photo, width=64, height=48, seed=99)
        wait_for(lambda: live.count == 1, "the live photo's job")

    with watching(Watcher(config, enqueuer)):
        wait_for(lambda: backfill.count == 15, "the start-up scan's 15 backfill jobs")
        assert live.count == 0
        worker = build_worker(config, redis_client, _DropsALivePhoto(tiny_backend, drop))
        done_order: list[str] = []
        original = worker.perform_job

        def perform_job(job, queue, execution):  # type: ignore[no-untyped-def]
            done_order.append(job.args[0]["source"])
            return original(job, queue, execution)

        worker.perform_job = perform_job  # type: ignore[method-assign]
        worker.work(burst=True, with_scheduler=False)
    # Taken right after the job during which it arrived: not after the other 12 of the backfill.
    assert done_order.index("just now.jpg") == 3
    assert len(done_order) == 16 and backfill.count == 0
    assert output_path(config.output.dir, "just now.jpg", "json").exists()
    assert_end_state(config, redis_client)


def test_polling_lists_only_the_folders_that_changed(
    make_config: Callable[..., Config], redis_client: Redis, monkeypatch
) -> None:
    """A poll is one stat per folder; a new photo makes only its own folder (and a new one) be listed."""
    # Ends with jobs queued on purpose: what the poll enqueued is the point, and no worker runs.
    config = make_config(producer={"polling": True, "poll_interval_s": 3600, "settle_ms": 0})
    for day in range(30):
        write_jpeg(config.producer.watch / f"day{day:02d}" / "old.jpg", width=32, height=24, seed=day)
    enqueuer = Enqueuer(config, redis_client)
    watcher = Watcher(config, enqueuer)
    watcher.rescan("start")
    assert len(watcher.scanner.folder_mtimes) == 31  # the state kept: one mtime per folder, none per file
    listed: list[str] = []
    scan_folder = watcher.scanner.scan_folder

    def spy(path: str, rel: str, stats):  # type: ignore[no-untyped-def]
        listed.append(rel)
        return scan_folder(path, rel, stats)

    monkeypatch.setattr(watcher.scanner, "scan_folder", spy)
    poller = FolderPoller(watcher, 3600)
    assert poller.poll_once() == 0 and listed == []
    write_jpeg(config.producer.watch / "day07" / "new.jpg", width=32, height=24, seed=100)
    write_jpeg(config.producer.watch / "day30" / "new.jpg", width=32, height=24, seed=101)
    assert poller.poll_once() == 2
    assert sorted(listed) == ["", "day07", "day30"]  # the root changed too: day30 is new in it
    watcher.submit_many(watcher.tracker.pop_ready())
    assert len(make_queue(redis_client, config, "live").job_ids) == 2  # new drops, so the live lane
    watcher.index.close()


def test_the_gallery_reads_the_newest_from_the_recent_list(
    make_config: Callable[..., Config], redis_client: Redis, redis_url: str, tiny_backend: Backend
) -> None:
    """Workers name each photo they finish; the gallery stats those few, never lists the tree."""
    from depthq.ops.dashboard import create_app

    config = make_config(producer={"settle_ms": 0}, dashboard={"refresh_s": 0.001})  # no cached listing
    for i in range(5):
        write_jpeg(config.producer.watch / f"{i}.jpg", width=64, height=48, seed=i)
    _scan(config, redis_client)
    build_worker(config, redis_client, tiny_backend).work(burst=True, with_scheduler=False)
    named = [s.decode() for s in redis_client.lrange(recent_key(config.queue.name), 0, -1)]
    assert sorted(named) == [f"{i}.jpg" for i in range(5)]
    # A result the list does not name (written by hand, or before the list existed) is not looked for.
    unnamed = output_path(config.output.dir, "elsewhere/x.jpg", "json")
    unnamed.parent.mkdir(parents=True)
    unnamed.write_text(output_path(config.output.dir, "0.jpg", "json").read_text())
    client = create_app(config, redis_url).test_client()
    cards = client.get("/gallery/results.json").get_json()["results"]
    assert sorted(card["source"] for card in cards) == [f"{i}.jpg" for i in range(5)]
    redis_client.ltrim(recent_key(config.queue.name), 1, 0)  # an empty list (a new Redis): the tree, as before
    cards = client.get("/gallery/results.json").get_json()["results"]
    assert "elsewhere/x.jpg" in {card["source"] for card in cards}
    assert 4 * config.dashboard.gallery_size <= RECENT_MAX  # enough names for a full page
    assert_end_state(config, redis_client)


def test_a_scan_thread_never_holds_up_the_event_loop(make_config: Callable[..., Config], redis_client: Redis) -> None:
    """While a rescan is stuck (a hung share), a live drop is still enqueued."""
    # Ends with jobs queued on purpose: that the live drop was enqueued is the point, and no worker runs.
    config = make_config(producer={"settle_ms": 0})
    enqueuer = Enqueuer(config, redis_client)
    watcher = Watcher(config, enqueuer)
    release = threading.Event()
    walk = watcher.scanner.walk

    def stuck_walk(stats, stop=None):  # type: ignore[no-untyped-def]
        yield from walk(stats, stop)
        release.wait(30)  # the walk does not end until the test says so

    watcher.scanner.walk = stuck_walk  # type: ignore[method-assign]
    try:
        with watching(watcher):
            wait_for(lambda: watcher.armed, "the watcher")
            write_jpeg(config.producer.watch / "live.jpg", width=32, height=24)
            wait_for(lambda: len(make_queue(redis_client, config, "live").job_ids) == 1, "the live photo's job")
            assert watcher.last_scan is None  # the start-up scan had still not finished
            release.set()
    finally:
        release.set()


def test_the_scan_takes_exactly_the_files_the_watcher_would(
    make_config: Callable[..., Config], redis_client: Redis
) -> None:
    """The walk's inlined name test agrees with `Eligibility`, which events and `depthq enqueue` use."""
    # Ends with jobs queued on purpose: which files the scan enqueued is the point, and no worker runs.
    config = make_config(producer={"settle_ms": 0})
    names = ["a.jpg", "B.JPEG", "c.heic", ".hidden.jpg", "._mac.jpg", "~lock.jpg", "x.jpg.part", "notes.txt",
             "noext", "d.tmp", "e.webp", "jpg", ".jpg", "f.Png", "g.jpg.crdownload"]  # fmt: skip
    for name in names:
        (config.producer.watch / name).write_bytes(name.encode())
    watcher = Watcher(config, Enqueuer(config, redis_client))
    watcher.rescan("start")
    took = sorted(
        Job.fetch(j, connection=redis_client, serializer=SERIALIZER).args[0]["source"]
        for j in jobs(Enqueuer(config, redis_client))
    )
    assert took == sorted(n for n in names if watcher.eligible(PurePath(n)))
    assert took == ["B.JPEG", "a.jpg", "c.heic", "e.webp", "f.Png"]
    watcher.index.close()
