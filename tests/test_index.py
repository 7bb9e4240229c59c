"""The photo index beside the output (producer.index) and the rescan's care of the output folder
(producer.scan): a full disk, a second reader, temporary files a dead writer left, a clean close."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from redis import Redis

from depthq.config import Config
from depthq.files import is_temp_name, staged_write, stale_temp_age_s
from producer.enqueue import Enqueuer
from producer.index import INDEX_NAME, Done, PhotoIndex, Queued
from producer.watcher import Watcher
from testkit.photos import write_jpeg
from testkit.waiting import wait_for
from testkit.watching import watching
from tests import disk


def _rows(n: int, start: int = 0) -> list[tuple[str, str, Done]]:
    return [("day", f"{i:05d}.jpg", Done(1000 + i, 1_700_000_000, "json")) for i in range(start, start + n)]


def test_a_full_disk_refuses_index_writes_once_loudly_and_the_index_carries_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The index shares the output's disk. A full disk used to raise SQLite's "database or disk is
    full" through the watcher and stop `depthq up`; and a restart on the still-full disk took the file
    for corrupt and deleted it."""
    with disk.small_disk(tmp_path / "out", "1m") as out:
        index = PhotoIndex.open_beside(out)
        assert index is not None
        assert index.record_done(_rows(50))
        filler = disk.fill(out, leave_bytes=0)
        with caplog.at_level(logging.WARNING, logger="producer.index"):
            refused = [index.record_done(_rows(400, start=100 + 400 * i)) for i in range(3)]
        assert refused == [False, False, False] and index.failing
        said = [r for r in caplog.records if "cannot be written" in r.getMessage()]
        assert len(said) == 1 and "database or disk is full" in said[0].getMessage()  # once, not per write
        assert len(index.folder("day")[0]) == 50  # what it held is still read
        index.close()

        # A restart while the disk is still full: the file is kept as it is, never taken for corrupt.
        while_full = PhotoIndex.open_beside(out)
        if while_full is not None:  # SQLite may still open it: then it holds what it held
            assert len(while_full.folder("day")[0]) == 50
            while_full.close()
        assert (out / INDEX_NAME).exists()
        filler.unlink()
        reopened = PhotoIndex.open_beside(out)
        assert reopened is not None and len(reopened.folder("day")[0]) == 50
        with caplog.at_level(logging.WARNING, logger="producer.index"):
            assert reopened.record_done(_rows(10, start=5000))
        reopened.close()


def test_the_rescan_goes_on_over_a_full_disk_and_the_watcher_stays_up(
    make_config: Callable[..., Config], redis_client: Redis, tmp_path: Path
) -> None:
    with disk.small_disk(tmp_path / "small-out", "1m") as out:
        config = make_config(output={"dir": str(out)}, producer={"settle_ms": 0, "rescan_s": 3600})
        write_jpeg(config.producer.watch / "before.jpg")
        watcher = Watcher(config, Enqueuer(config, redis_client))
        filler = disk.fill(out, leave_bytes=0)
        with watching(watcher):  # which also fails the test if the watcher stops by itself
            wait_for(lambda: watcher.last_scan is not None, "the start-up scan")
            wait_for(lambda: watcher.index.failing, "the index to meet the full disk")
            write_jpeg(config.producer.watch / "during.jpg", seed=1)
            queue = Enqueuer(config, redis_client, "live").queue
            wait_for(lambda: queue.count == 1, "the photo dropped while the disk is full, enqueued")
            filler.unlink()
            watcher.request_scan("periodic")
            wait_for(lambda: not watcher.index.failing, "the index to take writes again")


def test_the_watchers_index_is_read_beside_it_and_closed_clean(
    make_config: Callable[..., Config], redis_client: Redis
) -> None:
    config = make_config(producer={"settle_ms": 0, "rescan_s": 3600})
    write_jpeg(config.producer.watch / "a.jpg")
    watcher = Watcher(config, Enqueuer(config, redis_client))
    with watching(watcher):
        wait_for(lambda: watcher.last_scan is not None, "the start-up scan")
        reader = PhotoIndex.open_reader(config.output.dir)  # `depthq audit` beside the running watcher
        assert reader is not None
        assert set(reader.folder("")[1]) == {"a.jpg"}  # the job it gave the photo
        assert not reader.record_queued([("", "b.jpg", Queued(1, 1, "x"))])  # a reader never writes
        reader.close()
        assert PhotoIndex.open_beside(config.output.dir) is None  # a second writer is refused
    # A clean stop closes the database: its write-ahead log is checkpointed and gone.
    assert (config.output.dir / INDEX_NAME).exists()
    assert not (config.output.dir / f"{INDEX_NAME}-wal").exists()


def test_the_rescan_removes_temporary_files_a_dead_writer_left_and_only_those(
    make_config: Callable[..., Config], redis_client: Redis
) -> None:
    """A worker killed between writing a temporary file and renaming it left it for good. Once it is
    older than any job can run, the rescan removes it; a younger one may still be written, so it
    stays, and keeps its folder from counting as checked until it is gone."""
    config = make_config(producer={"settle_ms": 0}, queue={"job_timeout_s": 30})
    write_jpeg(config.producer.watch / "day" / "a.jpg")
    out = config.output.dir / "day"
    old = staged_write(out / "a.jpg.depth.npy", lambda f: f.write(b"half"))
    young = staged_write(out / "a.jpg.preview.png", lambda f: f.write(b"half"))
    assert is_temp_name(old.name) and is_temp_name(young.name)
    long_ago = time.time() - stale_temp_age_s(30) - 1
    os.utime(old, (long_ago, long_ago))
    (out / "notes.tmp").write_text("not ours")  # a name of another kind stays whatever its age
    os.utime(out / "notes.tmp", (long_ago, long_ago))
    watcher = Watcher(config, Enqueuer(config, redis_client))
    watcher.rescan("start")
    assert watcher.last_scan is not None and watcher.last_scan.temps_removed == 1
    assert not old.exists() and young.exists() and (out / "notes.tmp").exists()
    assert watcher.index.folder("day")[2] is None  # not counted as checked: listed again next time
    os.utime(young, (long_ago, long_ago))
    watcher.rescan("periodic")
    assert not young.exists() and watcher.last_scan.temps_removed == 1
    watcher.index.close()


def test_temporary_names_fit_for_every_name_a_filesystem_takes(tmp_path: Path) -> None:
    from depthq.contract import NAME_MAX, OUTPUT_SUFFIXES, output_path

    for name in ("a.jpg", "é" * 114 + ".jpg", "x" * 251 + ".jpg", "字" * 83 + ".jpg"):
        assert len(name.encode()) <= NAME_MAX
        for kind in (*OUTPUT_SUFFIXES, "error"):
            path = output_path(tmp_path, f"day/{name}", kind)
            tmp = staged_write(path, lambda f: f.write(b"x"))
            assert len(tmp.name.encode()) <= NAME_MAX and is_temp_name(tmp.name)
            tmp.replace(path)
