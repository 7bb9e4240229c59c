"""The watcher in this process: native events and polling, against a real Redis."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from redis import Redis
from rq.job import Job
from watchdog.events import FileClosedEvent, FileCreatedEvent, FileModifiedEvent, FileMovedEvent

from depthq.config import Config
from depthq.contract import LANES, SERIALIZER, make_queue
from producer.enqueue import Enqueuer
from producer.metrics import ProducerMetrics
from producer.watcher import Watcher, _Handler
from testkit.photos import write_jpeg
from testkit.waiting import wait_for
from testkit.watching import watching


@contextmanager
def running(config: Config, redis_client: Redis) -> Iterator[Enqueuer]:
    enqueuer = Enqueuer(config, redis_client)
    with watching(Watcher(config, enqueuer)):
        yield enqueuer


def jobs(enqueuer: Enqueuer) -> list[str]:
    """Job ids in both lanes: what events sent (live) and what scans found (backfill)."""
    return [jid for lane in LANES for jid in make_queue(enqueuer.connection, enqueuer.config, lane).job_ids]


def wait_count(enqueuer: Enqueuer, n: int) -> None:
    wait_for(lambda: len(jobs(enqueuer)) >= n, f"{n} jobs", 30)


@pytest.mark.parametrize("polling", [False, True], ids=["native", "polling"])
def test_new_photos_are_enqueued_once(make_config: Callable[..., Config], redis_client: Redis, polling: bool) -> None:
    config = make_config(producer={"polling": polling, "poll_interval_s": 0.2, "settle_ms": 200})
    with running(config, redis_client) as enqueuer:
        write_jpeg(config.producer.watch / "a.jpg")
        (config.producer.watch / "sub").mkdir()
        write_jpeg(config.producer.watch / "sub" / "b.JPG", seed=2)
        (config.producer.watch / "notes.txt").write_text("not a photo")
        (config.producer.watch / ".hidden.jpg").write_bytes(b"x")
        wait_count(enqueuer, 2)


def test_missing_watch_folder_is_a_clear_error(make_config: Callable[..., Config], redis_client: Redis) -> None:
    config = make_config()
    config.producer.watch.rmdir()
    with pytest.raises(FileNotFoundError, match=r"producer\.watch"):
        Watcher(config, Enqueuer(config, redis_client)).run(threading.Event())


def test_output_inside_the_watched_folder_is_not_fed_back(
    make_config: Callable[..., Config], redis_client: Redis
) -> None:
    config = make_config(producer={"settle_ms": 0})
    config.output.dir = config.producer.watch / "depth-out"
    enqueuer = Enqueuer(config, redis_client)
    watcher = Watcher(config, enqueuer)
    preview = write_jpeg(config.output.dir / "x.jpg.preview.jpg")  # eligible anywhere else
    write_jpeg(config.producer.watch / "real.jpg", seed=4)
    watcher.consider(preview, finished=True)
    watcher.consider(preview, finished=False)
    assert watcher._ready.empty() and watcher.tracker.next_due_in() is None
    assert watcher.rescan() == 1
    assert [Job.fetch(j, connection=redis_client, serializer=SERIALIZER).args[0]["source"] for j in jobs(enqueuer)] == [
        "real.jpg"
    ]


def test_events_mark_files_ready_only_when_written(make_config: Callable[..., Config], redis_client: Redis) -> None:
    """created/modified wait for the settle window; close-after-write and renames into place do not."""
    config = make_config()
    watcher = Watcher(config, Enqueuer(config, redis_client))
    handler = _Handler(watcher)
    inbox = config.producer.watch
    growing = write_jpeg(inbox / "growing.jpg")
    handler.on_any_event(FileCreatedEvent(str(growing)))
    handler.on_any_event(FileModifiedEvent(str(growing)))
    assert watcher._ready.empty() and watcher.tracker.next_due_in() is not None
    handler.on_any_event(FileClosedEvent(str(growing)))
    assert watcher._ready.get_nowait() == growing
    assert watcher.tracker.next_due_in() is None  # not enqueued a second time after it settles
    done = write_jpeg(inbox / "done.jpg", seed=1)
    handler.on_any_event(FileMovedEvent(str(inbox / "done.jpg.part"), str(done)))
    assert watcher._ready.get_nowait() == done
    for ignored in (inbox / ".x.jpg", inbox / "x.jpg.part", inbox / "notes.txt"):
        ignored.write_bytes(b"x")
        handler.on_any_event(FileClosedEvent(str(ignored)))
        handler.on_any_event(FileCreatedEvent(str(ignored)))
    assert watcher._ready.empty() and watcher.tracker.next_due_in() is None


@pytest.mark.parametrize("polling", [True, False], ids=["polling", "native"])
def test_watched_share_going_away_and_back_is_rearmed(
    make_config: Callable[..., Config], redis_client: Redis, tmp_path, polling: bool
) -> None:
    config = make_config(producer={"polling": polling, "poll_interval_s": 0.2, "settle_ms": 100})
    enqueuer = Enqueuer(config, redis_client)
    watcher = Watcher(config, enqueuer)
    with watching(watcher):
        inbox = config.producer.watch
        write_jpeg(inbox / "before.jpg")
        wait_count(enqueuer, 1)
        parked = tmp_path / "unmounted"
        inbox.rename(parked)  # the share goes away
        wait_for(lambda: not watcher.armed, "the watcher to notice")
        write_jpeg(parked / "during.jpg", seed=1)  # arrives where no watcher sees it
        parked.rename(inbox)  # the share comes back: the re-arm's rescan must find it
        wait_count(enqueuer, 2)
        write_jpeg(inbox / "after.jpg", seed=2)  # and events flow again
        wait_count(enqueuer, 3)
        assert watcher.armed


def test_photos_that_arrived_while_the_producer_was_down(
    make_config: Callable[..., Config], redis_client: Redis, tiny_model
) -> None:
    """100 photos arrive with no producer running; 10 of them were already done before. On start, the
    90 new ones are enqueued and nothing done is computed again."""
    from depthq.config import load_config
    from worker.worker import build_worker, load_backend

    config = make_config(producer={"settle_ms": 0})
    backend = load_backend(load_config(environ={}, overrides={"model": {"path": str(tiny_model)}}))[0]
    inbox = config.producer.watch
    for i in range(10):
        write_jpeg(inbox / "old" / f"{i}.jpg", seed=i)
    with running(config, redis_client) as enqueuer:
        wait_count(enqueuer, 10)
    build_worker(config, redis_client, backend).work(burst=True)
    done_before = {p: p.stat().st_mtime_ns for p in (config.output.dir / "old").glob("*.json")}
    assert len(done_before) == 10
    for i in range(90):  # the producer is down
        write_jpeg(inbox / "new" / f"{i}.jpg", seed=100 + i)
    with running(config, redis_client) as enqueuer:
        wait_count(enqueuer, 90)
        assert len(jobs(enqueuer)) == 90
    build_worker(config, redis_client, backend).work(burst=True)
    assert len(list((config.output.dir / "new").glob("*.json"))) == 90
    assert {p: p.stat().st_mtime_ns for p in (config.output.dir / "old").glob("*.json")} == done_before


def test_periodic_rescan_finds_what_events_missed(make_config: Callable[..., Config], redis_client: Redis) -> None:
    # A polling observer that never polls again stands in for an inotify queue overflow: no events.
    config = make_config(producer={"polling": True, "poll_interval_s": 3600, "rescan_s": 0.3, "settle_ms": 0})
    enqueuer = Enqueuer(config, redis_client)
    watcher = Watcher(config, enqueuer)
    scans: list[int] = []
    start_up_scan = watcher.rescan

    def rescan(cause: str = "periodic") -> int:
        found = start_up_scan(cause)
        scans.append(found)
        if len(scans) == 1:  # photos land right after the start-up scan, and no event reports them
            for i in range(5):
                write_jpeg(config.producer.watch / f"missed-{i}.jpg", seed=i)
        return found

    watcher.rescan = rescan  # type: ignore[method-assign]
    with watching(watcher):
        wait_count(enqueuer, 5)
        # A scan hands its photos over while it walks: its count is in once the walk is over.
        wait_for(lambda: sum(scans[1:]) >= 5, "the later scans' count")
        assert scans[0] == 0


def test_a_burst_seen_by_events_and_the_start_up_scan_is_enqueued_once(
    make_config: Callable[..., Config], redis_client: Redis
) -> None:
    """Photos renamed into place while the watcher starts: many are seen twice, each becomes one job."""
    config = make_config(producer={"settle_ms": 100})
    inbox = config.producer.watch
    count = 300
    for i in range(count):
        (inbox / f"{i:03d}.jpg.part").write_bytes(b"\xff\xd8\xff" + i.to_bytes(2, "big") * 100)
    enqueuer = Enqueuer(config, redis_client)
    metrics = ProducerMetrics(enqueuer.queue)

    def outcome(name: str) -> float:
        return metrics.registry.get_sample_value("depthq_producer_files_total", {"outcome": name}) or 0

    with watching(Watcher(config, enqueuer, metrics)):
        for i in range(count):
            os.replace(inbox / f"{i:03d}.jpg.part", inbox / f"{i:03d}.jpg")
        wait_count(enqueuer, count)
        time.sleep(0.5)  # what the start-up scan also found comes due after settle_ms, to be turned away
    ids = jobs(enqueuer)
    assert len(ids) == len(set(ids)) == count
    assert len(list(redis_client.scan_iter(match="rq:job:*"))) == count
    assert outcome("enqueued") == count


def test_an_inotify_overflow_rescans_at_once(make_config: Callable[..., Config], redis_client: Redis) -> None:
    """watchdog only logs that the kernel dropped events; the watcher rescans then, not after rescan_s."""
    # A polling observer that never polls: photos written after the start-up scan make no event.
    config = make_config(producer={"polling": True, "poll_interval_s": 3600, "rescan_s": 3600, "settle_ms": 0})
    enqueuer = Enqueuer(config, redis_client)
    watcher = Watcher(config, enqueuer)
    with watching(watcher):
        wait_for(lambda: watcher.last_scan is not None, "the start-up scan")
        for i in range(3):
            write_jpeg(config.producer.watch / f"lost-{i}.jpg", seed=i)
        assert jobs(enqueuer) == []
        logging.getLogger("watchdog.observers.inotify_c").warning(
            "Inotify queue overflowed; filesystem events were lost"
        )
        wait_count(enqueuer, 3)
    assert not logging.getLogger("watchdog.observers.inotify_c").handlers  # the watcher's alarm left with it


def test_a_photo_with_a_job_is_not_submitted_again_by_a_rescan_that_also_saw_it(
    make_config: Callable[..., Config], redis_client: Redis
) -> None:
    """An event queued a photo, a rescan found it too, then the event's submit gave it a job: the
    rescan's copy is dropped instead of coming due as a duplicate."""
    config = make_config()
    enqueuer = Enqueuer(config, redis_client)
    metrics = ProducerMetrics(enqueuer.queue)
    watcher = Watcher(config, enqueuer, metrics)
    photo = write_jpeg(config.producer.watch / "a.jpg")
    _Handler(watcher).on_any_event(FileClosedEvent(str(photo)))
    assert watcher.rescan() == 1  # found, and waiting out the settle time in the backfill lane
    watcher.submit_many(watcher._take_ready())
    watcher.found.settle_s = 0
    watcher._submit_found(wait=True)  # the scan's copy comes due: its job exists already
    assert len(jobs(enqueuer)) == 1
    assert [metrics.files.labels(o)._value.get() for o in ("enqueued", "duplicate")] == [1, 1]


def test_a_rescan_passes_over_photos_whose_job_is_pending(
    make_config: Callable[..., Config], redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog waiting for workers is neither re-hashed nor re-submitted by every rescan; a photo whose
    job is gone (deleted from the dashboard, say) without an output is submitted again."""
    config = make_config(producer={"settle_ms": 0})
    enqueuer = Enqueuer(config, redis_client)
    watcher = Watcher(config, enqueuer)
    queued = write_jpeg(config.producer.watch / "queued.jpg", seed=1)
    changed = write_jpeg(config.producer.watch / "changed.jpg", seed=2)
    watcher.submit_many([queued, changed])
    write_jpeg(changed, seed=3)  # a new version after its job: it needs one of its own
    write_jpeg(config.producer.watch / "lost.jpg", seed=4)  # its events were lost
    hashed: list[str] = []
    monkeypatch.setattr("producer.sending.file_sha256", lambda path: hashed.append(path.name) or "0" * 64)
    assert watcher.rescan() == 2
    assert watcher.last_scan is not None and watcher.last_scan.pending == 1
    assert sorted(hashed) == ["changed.jpg", "lost.jpg"]
    fetched = [Job.fetch(j, connection=redis_client, serializer=SERIALIZER) for j in jobs(enqueuer)]
    (queued_job,) = [job for job in fetched if job.args[0]["source"] == "queued.jpg"]
    queued_job.delete()
    hashed.clear()
    assert watcher.rescan() == 1  # only queued.jpg: the others' jobs are pending
    assert hashed == ["queued.jpg"]


def test_one_photos_surprise_in_submit_never_stops_the_watcher(
    make_config: Callable[..., Config], redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any exception from rq or Redis for one photo is logged and counted; the others still go."""
    config = make_config(producer={"settle_ms": 50})
    enqueuer = Enqueuer(config, redis_client)
    metrics = ProducerMetrics(enqueuer.queue)
    submit = Enqueuer.submit

    def cursed(self: Enqueuer, path: Path, force: bool = False):  # type: ignore[no-untyped-def]
        if path.name == "cursed.jpg":
            raise ValueError("Execution 1234 not found in Redis")  # what rq's job.delete() raised
        return submit(self, path, force)

    monkeypatch.setattr(Enqueuer, "submit", cursed)  # both lanes' enqueuers
    with watching(Watcher(config, enqueuer, metrics)) as watcher:
        wait_for(lambda: watcher.last_scan is not None, "the start-up scan")
        write_jpeg(config.producer.watch / "cursed.jpg")
        wait_for(lambda: metrics.files.labels("error")._value.get() >= 1, "the surprise to be counted")
        write_jpeg(config.producer.watch / "fine.jpg", seed=1)
        wait_count(enqueuer, 1)
    assert len(jobs(enqueuer)) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's; macOS uses FSEvents")
def test_five_thousand_folders_raise_no_rescan_storm(make_config: Callable[..., Config], redis_client: Redis) -> None:
    """Each rescan walks 5,000 folders. Had inotify been asked for opens and no-write closes, each walk
    would raise ~20,000 events, overflow the kernel's 16,384, and trigger the next rescan, for ever."""
    config = make_config(producer={"rescan_s": 1.0})
    for i in range(5000):
        (config.producer.watch / f"day{i // 100:03d}" / f"card{i % 100:02d}").mkdir(parents=True)
    enqueuer = Enqueuer(config, redis_client)
    metrics = ProducerMetrics(enqueuer.queue)

    def rescans(cause: str) -> float:
        return metrics.rescans.labels(cause)._value.get()

    with watching(Watcher(config, enqueuer, metrics)):
        # A window of several rescan_s: each periodic walk had its chance to overflow the queue.
        wait_for(lambda: rescans("periodic") >= 4, "four periodic rescans", 120)
        # What the kernel was asked for, watch by watch (/proc/self/fdinfo): never opens or no-write closes.
        masks = _inotify_masks()
    assert rescans("start") == 1
    assert rescans("overflow") == 0
    assert len(masks) == 5000 + 50 + 1  # every folder is watched
    assert not [m for m in masks if m & (IN_OPEN | IN_CLOSE_NOWRITE)]


IN_CLOSE_NOWRITE, IN_OPEN = 0x10, 0x20


def _inotify_masks() -> list[int]:
    """The event mask of every inotify watch this process holds, as the kernel reports it."""
    masks = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("inotify wd:"):
                    masks.append(int(line.split(" mask:")[1].split()[0], 16))
    return masks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's; macOS uses FSEvents")
def test_folders_the_kernel_refused_to_watch_are_reported_with_the_fix(
    make_config: Callable[..., Config], redis_client: Redis, redis_url: str, tmp_path: Path
) -> None:
    """A real watcher in a user namespace whose inotify watch limit is 20, over 40 folders."""
    import shutil
    import subprocess

    from depthq.ops.status import gather

    unshare = shutil.which("unshare")
    cannot = pytest.fail if os.environ.get("TEST_REQUIRE_TOOLS") == "1" else pytest.skip
    if unshare is None:
        cannot("needs unshare (util-linux) for a user namespace with a low inotify limit")
    probe = subprocess.run([unshare, "--user", "--map-root-user", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        cannot(f"cannot make a user namespace here: {probe.stderr.strip()}")
    config = make_config()
    for i in range(40):
        (config.producer.watch / f"folder{i:02d}").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
    env.update(
        DEPTHQ_REDIS_URL=redis_url,
        DEPTHQ_PRODUCER_WATCH=str(config.producer.watch),
        DEPTHQ_OUTPUT_DIR=str(config.output.dir),
    )
    script = f'echo 20 > /proc/sys/user/max_inotify_watches && exec "{sys.executable}" -m producer'
    log = tmp_path / "watch.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [unshare, "--user", "--map-root-user", "sh", "-c", script], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: "are watched" in log.read_text() or proc.poll() is not None, f"the report ({log})")
        text = log.read_text()
        assert proc.poll() is None, text
        assert "of the 41 folders under" in text and "sudo sysctl fs.inotify.max_user_watches=524288" in text
        assert text.count("are watched") == 1
        ((watches, folders),) = gather(redis_client, config).watches.values()
        assert watches < folders == 41
    finally:
        proc.terminate()
        proc.wait(30)
