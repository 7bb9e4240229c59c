"""producer/scan.py: the rescan's walk, on a real folder tree and a real SQLite index. What needs a
job is found, what is done is not, what the index learned spares the next walk its sidecar reads, and
a version given a job is passed over while that job is pending. (The watcher's rescans end to end are
in test_watcher.py; the walk at 100k photos in test_archive.py.)"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from depthq.contract import output_path, source_stamp
from producer.index import PhotoIndex, Queued
from producer.readiness import Eligibility
from producer.scan import FolderScanner, ScanStats, sort_entries


@pytest.fixture
def index(tmp_path: Path) -> Iterator[PhotoIndex]:
    index = PhotoIndex(tmp_path / "index.sqlite")
    yield index
    index.close()


def _photo(root: Path, rel: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8" + rel.encode())
    return path


def _done(out: Path, root: Path, rel: str) -> None:
    """The sidecar a worker leaves: it records the photo's stamp."""
    sidecar = output_path(out, rel, "json")
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    sidecar.write_text(json.dumps({"source": rel, "source_stat": source_stamp((root / rel).stat())}))


def _walk(scanner: FolderScanner) -> tuple[list[str], ScanStats]:
    stats = ScanStats()
    found = [f.path.relative_to(scanner.root).as_posix() for batch in scanner.walk(stats) for f in batch]
    return sorted(found), stats


def _scanner(root: Path, out: Path, index: PhotoIndex, pending: set[str] | None = None) -> FolderScanner:
    eligible = Eligibility(["jpg"], [".*", "*.part"])
    return FolderScanner(root, out, eligible, index, lambda jids: {j for j in jids if j in (pending or set())})


def test_new_photos_are_found_and_done_ones_are_not(tmp_path: Path, index: PhotoIndex) -> None:
    root, out = tmp_path / "inbox", tmp_path / "out"
    for rel in ("a.jpg", "day/b.jpg", "day/deep/c.jpg", "day/notes.txt", "day/.hidden.jpg", "d.jpg.part"):
        _photo(root, rel)
    _done(out, root, "day/b.jpg")
    found, stats = _walk(_scanner(root, out, index))
    assert found == ["a.jpg", "day/deep/c.jpg"]
    assert (stats.photos, stats.done, stats.found, stats.sidecars_read) == (3, 1, 2, 1)
    # The index learned b's sidecar: the next walk trusts it while the sidecar is still listed.
    _, again = _walk(_scanner(root, out, index))
    assert again.done == 1 and again.sidecars_read == 0


def test_a_deleted_output_or_a_replaced_photo_is_found_again(tmp_path: Path, index: PhotoIndex) -> None:
    root, out = tmp_path / "inbox", tmp_path / "out"
    for rel in ("a.jpg", "b.jpg"):
        _photo(root, rel)
        _done(out, root, rel)
    assert _walk(_scanner(root, out, index))[0] == []
    output_path(out, "a.jpg", "json").unlink()  # the user deleted a's result
    b = root / "b.jpg"
    b.write_bytes(b"\xff\xd8 a new, longer version")  # b replaced: another size
    assert _walk(_scanner(root, out, index))[0] == ["a.jpg", "b.jpg"]


def test_a_version_given_a_job_waits_while_its_job_is_pending(tmp_path: Path, index: PhotoIndex) -> None:
    root, out = tmp_path / "inbox", tmp_path / "out"
    photo = _photo(root, "a.jpg")
    st = photo.stat()
    pending = {"job-a"}
    scanner = _scanner(root, out, index, pending)
    scanner.record_queued([(photo, Queued(st.st_size, st.st_mtime_ns, "job-a"))])
    found, stats = _walk(scanner)
    assert found == [] and stats.pending == 1
    pending.clear()  # the job is over, and no output came of it: submitted again
    assert _walk(scanner)[0] == ["a.jpg"]


def test_temporary_files_a_dead_writer_left_are_removed_once_old_enough(tmp_path: Path, index: PhotoIndex) -> None:
    root, out = tmp_path / "inbox", tmp_path / "out"
    _photo(root, "a.jpg")
    out.mkdir()
    old, young = out / ".a.jpg.depth.npy.k1ll3d00.tmp", out / ".a.jpg.json.wr1t1ng0.tmp"
    for temp in (old, young):
        temp.write_bytes(b"half")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    scanner = _scanner(root, out, index)
    scanner.stale_temp_s = 600
    _, stats = _walk(scanner)
    assert stats.temps_removed == 1 and not old.exists() and young.exists()


def test_a_folders_listing_is_sorted_into_photos_and_folders_to_walk(tmp_path: Path) -> None:
    """Not symlinked folders (a loop, or out of the root), ignored names, or the output folder inside
    the watched one; only eligible regular files, each stat'ed."""
    root = tmp_path / "inbox"
    for rel in ("a.JPG", "b.png", ".c.jpg", "sub/d.jpg", "out/e.jpg", ".cache/f.jpg"):
        _photo(root, rel)
    (root / "loop").symlink_to(root)
    (root / "link.jpg").symlink_to(root / "sub" / "d.jpg")
    with os.scandir(root) as it:
        photos, folders = sort_entries(list(it), "", Eligibility(["jpg"], [".*"]), str(root / "out"))
    assert sorted(name for name, _ in photos) == ["a.JPG", "link.jpg"]
    assert folders == [(str(root / "sub"), "sub")]
