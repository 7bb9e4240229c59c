from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from depthq.config import ProducerConfig
from producer.readiness import Eligibility, SettleTracker


def _eligible() -> Eligibility:
    cfg = ProducerConfig()
    return Eligibility(cfg.extensions, cfg.ignore)


def test_extensions_case_insensitive_and_temp_files_ignored() -> None:
    ok = _eligible()
    for name in ["a.jpg", "B.JPG", "c.Heic", "d.tiff", "e.webp", "sub/dir/f.png", "my photo é.jpeg"]:
        assert ok(PurePosixPath(name)), name
    for name in [
        ".hidden.jpg",
        "._a.jpg",
        "~a.jpg",
        "a.jpg.part",
        "a.jpg.crdownload",
        "a.tmp",
        ".DS_Store",
        "a.txt",
        "a.jpg.xmp",
        ".trash/a.jpg",
        "noext",
    ]:
        assert not ok(PurePosixPath(name)), name


def test_scan_skips_ignored_folders(tmp_path: Path) -> None:
    for rel in ["a.jpg", "sub/b.png", ".cache/c.jpg", "sub/d.part", "sub/e.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "dir.jpg").mkdir()
    found = sorted(p.relative_to(tmp_path).as_posix() for p in _eligible().scan(tmp_path))
    assert found == ["a.jpg", "sub/b.png"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_settle_releases_only_after_a_quiet_window(tmp_path: Path) -> None:
    clock = FakeClock()
    tracker = SettleTracker(1.0, clock=clock)
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"12")
    tracker.saw_change(photo)
    clock.now = 0.9
    assert tracker.pop_ready() == []
    with photo.open("ab") as f:  # still growing: the window restarts
        f.write(b"34")
    os.utime(photo, ns=(1, 2_000_000_000))
    assert tracker.pop_ready() == []
    clock.now = 1.8
    assert tracker.pop_ready() == []
    clock.now = 1.95
    assert tracker.pop_ready() == [photo]
    assert tracker.pop_ready() == []  # released once


def test_settle_forgets_deleted_files(tmp_path: Path) -> None:
    clock = FakeClock()
    tracker = SettleTracker(0.5, clock=clock)
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"1")
    tracker.saw_change(photo)
    photo.unlink()
    clock.now = 5
    assert tracker.pop_ready() == []
    assert tracker.next_due_in() is None  # nothing left pending
