"""Polling for folders that give no events (SMB and NFS shares), at a cost that grows with folders.

watchdog's PollingObserver keeps a snapshot of every file and stats them all on every poll: 257 MB
and 28 % of a core, idle, at 100k photos, and a poll that cannot keep up at a million. Here the
state is one mtime per folder. A poll stats each folder the last walk saw; only a folder whose mtime
moved (a file created, renamed in or deleted) is listed again, through the rescan's own per-folder
step (`FolderScanner.scan_folder`), and what it finds is a live drop.

What a folder's mtime does not show: a photo rewritten in place under the same name. The periodic
rescan (`producer.rescan_s`) finds that one.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Protocol

from producer.readiness import SettleTracker
from producer.scan import FolderScanner, ScanStats

log = logging.getLogger(__name__)


class Polled(Protocol):
    """What the poller uses of the watcher that starts it. Named here, rather than importing the
    `Watcher` that imports this module, so the two modules do not import each other."""

    @property
    def root(self) -> Path: ...

    @property
    def scanner(self) -> FolderScanner: ...

    @property
    def tracker(self) -> SettleTracker: ...


class FolderPoller(threading.Thread):
    """Started and stopped like a watchdog observer, so the watcher arms either the same way."""

    def __init__(self, watcher: Polled, interval_s: float) -> None:
        super().__init__(name="depthq-poller", daemon=True)
        self.watcher = watcher
        self.interval_s = interval_s
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            try:
                self.poll_once()
            except Exception:
                log.exception("a poll of %s failed; the next one tries again", self.watcher.root)

    def stop(self) -> None:
        self._halt.set()

    def poll_once(self) -> int:
        """One stat per known folder; the folders that changed are listed again. Returns photos found."""
        scanner = self.watcher.scanner
        stats = ScanStats()
        for rel, seen in list(scanner.folder_mtimes.items()):
            if self._halt.is_set():
                break
            path = os.path.join(scanner.root, rel) if rel else str(scanner.root)
            try:
                mtime = os.stat(path).st_mtime_ns
            except OSError:
                scanner.folder_mtimes.pop(rel, None)  # gone: its photos went with it
                continue
            if mtime != seen:
                self._list(path, rel, stats)
        return stats.found

    def _list(self, path: str, rel: str, stats: ScanStats) -> None:
        """A changed folder, and any folder new inside it, through the rescan's per-folder step."""
        scanner = self.watcher.scanner
        stack = [(path, rel)]
        while stack:
            folder_path, folder_rel = stack.pop()
            folder = scanner.scan_folder(folder_path, folder_rel, stats)
            if folder is None:
                continue
            for found in folder.found + scanner.not_pending(folder.awaiting, stats):
                stats.found += 1
                self.watcher.tracker.saw_change(found.path)
            stack.extend(sub for sub in folder.subfolders if sub[1] not in scanner.folder_mtimes)
