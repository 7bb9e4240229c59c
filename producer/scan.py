"""The rescan's walk: every photo under the watch root that needs a job, for a walk and a stat each.

A folder at a time: one listing of the folder, one stat per photo, one listing of its output folder
and one index query. A photo is done when the index says its sidecar recorded this very size and
mtime *and* that sidecar is still listed; only what the index does not know is read from the
sidecar. A photo whose version was given a job is passed over while that job is still pending (one
bulk status look in Redis for many), so a backlog is neither re-hashed nor re-submitted.

The same per-folder step serves the poller (`producer.poller`), which re-lists only the folders whose
mtime moved.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from depthq.contract import finished_kind, output_name
from depthq.files import remove_stale_temps_in
from producer.index import Done, PhotoIndex, Queued
from producer.readiness import Eligibility

# Photos whose job status is looked up in one Redis round trip.
_STATUS_BATCH = 2000
# An output folder whose mtime is younger than this is listed again next time, whatever it says: a
# change within the same mtime tick as our listing would not move it.
_RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class Found:
    """A photo that needs a job, as stat'ed by the walk."""

    path: Path
    size: int
    mtime_ns: int


@dataclass
class ScanStats:
    folders: int = 0
    photos: int = 0
    done: int = 0
    pending: int = 0  # given a job that is still queued or running
    found: int = 0  # needs a job
    sidecars_read: int = 0
    temps_removed: int = 0  # temporary files a writer that died left behind
    folder_names: set[str] = field(default_factory=set)


@dataclass
class _Folder:
    found: list[Found]
    awaiting: list[tuple[Found, str]]  # a job was given to this version: is it still pending?
    subfolders: list[tuple[str, str]]  # (absolute path, relative name)


def sort_entries(
    entries: list[os.DirEntry[str]], rel: str, eligible: Eligibility, exclude: str
) -> tuple[list[tuple[str, os.stat_result]], list[tuple[str, str]]]:
    """One folder's listing (`rel` under the root), sorted into its eligible photos, each stat'ed, and the
    subfolders to walk (absolute path, relative name): not symlinks, ignored names or `exclude` (the
    output folder, when it lies inside the watched one). Eligibility's rules for a name in a folder
    already walked, inlined: this loop sees every file of the archive, in the rescan and the audit."""
    subfolders: list[tuple[str, str]] = []
    photos: list[tuple[str, os.stat_result]] = []
    extensions, ignored_match = eligible.extensions, eligible.ignored_pattern.match
    for entry in entries:
        name = entry.name
        try:
            if entry.is_dir():
                if not entry.is_symlink() and not ignored_match(name) and entry.path != exclude:
                    subfolders.append((entry.path, f"{rel}/{name}" if rel else name))
                continue
            dot = name.rfind(".")
            if dot < 0 or name[dot + 1 :].lower() not in extensions or ignored_match(name) or not entry.is_file():
                continue
            photos.append((name, entry.stat()))
        except OSError:
            continue  # gone between the listing and the stat
    subfolders.sort()
    return photos, subfolders


class FolderScanner:
    """Walks the watch root against the index. `pending_jobs(ids)` says which job ids are still pending."""

    def __init__(
        self,
        root: Path,
        output_root: Path,
        eligible: Eligibility,
        index: PhotoIndex,
        pending_jobs: Callable[[list[str]], set[str]],
        stale_temp_s: float = float("inf"),
    ):
        """`stale_temp_s`: how old a temporary file in the output must be to be one a dead writer left."""
        self.root = root
        self.stale_temp_s = stale_temp_s
        self.output_root = output_root
        self.eligible = eligible
        self.index = index
        self.pending_jobs = pending_jobs
        self._exclude = str(output_root)
        # Folder (relative) -> its mtime_ns when last listed: what the poller compares against.
        self.folder_mtimes: dict[str, int] = {}

    def walk(self, stats: ScanStats, stop: threading.Event | None = None) -> Iterator[list[Found]]:
        """The photos that need a job, a few folders' worth at a time, while the walk goes on."""
        stack: list[tuple[str, str]] = [(str(self.root), "")]
        awaiting: list[tuple[Found, str]] = []
        while stack:
            if stop is not None and stop.is_set():
                return
            path, rel = stack.pop()
            folder = self.scan_folder(path, rel, stats)
            if folder is None:
                continue
            stack.extend(reversed(folder.subfolders))
            awaiting.extend(folder.awaiting)
            if len(awaiting) >= _STATUS_BATCH:
                folder.found.extend(self.not_pending(awaiting, stats))
                awaiting = []
            if folder.found:
                stats.found += len(folder.found)
                yield folder.found
        last = self.not_pending(awaiting, stats)
        if last:
            stats.found += len(last)
            yield last
        if stop is None or not stop.is_set():
            self.index.forget_folders_except(stats.folder_names)

    def not_pending(self, awaiting: list[tuple[Found, str]], stats: ScanStats) -> list[Found]:
        """Of these photos with a job, those whose job is over or gone without an output: submit again."""
        if not awaiting:
            return []
        pending = self.pending_jobs(sorted({jid for _, jid in awaiting}))
        again = [found for found, jid in awaiting if jid not in pending]
        stats.pending += len(awaiting) - len(again)
        return again

    def scan_folder(self, path: str, rel: str, stats: ScanStats) -> _Folder | None:
        """One folder: its photos that need a job (or whose job may still be pending), and its subfolders."""
        try:
            folder_mtime = os.stat(path).st_mtime_ns  # before the listing: a later change is seen next time
            with os.scandir(path) as it:
                entries = list(it)
        except OSError:
            self.folder_mtimes.pop(rel, None)
            return None
        self.folder_mtimes[rel] = folder_mtime
        stats.folders += 1
        stats.folder_names.add(rel)
        photos, subfolders = sort_entries(entries, rel, self.eligible, self._exclude)
        stats.photos += len(photos)
        done, queued, listed_at = self.index.folder(rel)
        outputs: set[str] | None = set()
        out_dir = os.path.join(self.output_root, rel) if rel else str(self.output_root)
        out_mtime: int | None = None
        if photos:
            try:
                out_mtime = os.stat(out_dir).st_mtime_ns
            except OSError:
                out_mtime = None
            if out_mtime is not None and out_mtime == listed_at:
                outputs = None  # unchanged since every output in it was checked: no listing needed
            elif out_mtime is not None:
                with contextlib.suppress(OSError):
                    outputs = set(os.listdir(out_dir))
        found: list[Found] = []
        awaiting: list[tuple[Found, str]] = []
        learned: list[tuple[str, str, Done]] = []
        contradicted: list[tuple[str, str]] = []
        for name, st in photos:
            known = done.get(name)
            if (
                known is not None
                and known[0] == st.st_size
                and known[1] == int(st.st_mtime)
                and (outputs is None or output_name(name, known[2]) in outputs)
            ):
                stats.done += 1
                continue
            # Unknown to the index, or contradicted by it: the sidecar decides (without a listing to
            # say whether there is one, the read finds out).
            if (outputs is None and known is None) or (
                outputs is not None and (output_name(name, "json") in outputs or output_name(name, "error") in outputs)
            ):
                stats.sidecars_read += 1
                kind = finished_kind(self.output_root, f"{rel}/{name}" if rel else name, st)
                if kind is not None:
                    learned.append((rel, name, Done(st.st_size, int(st.st_mtime), kind)))
                    stats.done += 1
                    continue
            if known is not None:
                contradicted.append((rel, name))  # its output was deleted, or the photo replaced
            photo = Found(Path(path, name), st.st_size, st.st_mtime_ns)
            given = queued.get(name)
            if given is not None and (given.size, given.mtime_ns) == (st.st_size, st.st_mtime_ns):
                awaiting.append((photo, given.job_id))
            else:
                found.append(photo)
        if done or queued:
            names = {name for name, _ in photos}
            contradicted.extend((rel, name) for name in (done.keys() | queued.keys()) - names)  # photos gone
        temps = 0
        if outputs:
            # A writer killed mid-write leaves its temporary file; once older than any job can run, no
            # one will finish it. A younger one keeps the folder from counting as checked, so the next
            # rescan lists it again and removes the file once it is old enough.
            removed, young = remove_stale_temps_in(Path(out_dir), outputs, self.stale_temp_s, time.time())
            stats.temps_removed += removed
            temps = removed + young
        checked = outputs is not None and out_mtime is not None and not temps and time.time_ns() - out_mtime > _RACY_NS
        self.index.update_folder(rel, contradicted, learned, out_mtime if checked else None)
        found.sort(key=lambda f: f.path)
        return _Folder(found, awaiting, subfolders)

    def record_queued(self, given: list[tuple[Path, Queued]]) -> None:
        """These versions of these photos have jobs: rescans leave them alone while the jobs are pending."""
        rows: list[tuple[str, str, Queued]] = []
        for path, queued in given:
            with contextlib.suppress(ValueError):
                rel = path.relative_to(self.root)
                folder = rel.parent.as_posix()
                rows.append(("" if folder == "." else folder, rel.name, queued))
        self.index.record_queued(rows)
