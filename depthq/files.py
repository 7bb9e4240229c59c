"""Atomic output files, shared by the worker's store and the collector (which must not import numpy).

Every file is written to a temporary name in its own folder, then renamed into place, so a reader,
and the producer's "is it done?" check, sees either nothing or a whole file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from depthq.contract import ERROR_KIND, output_path


def _process_umask() -> int:
    """The umask, read once at import (single-threaded then): os.umask can only be read by setting it."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files 0600, and os.replace keeps that mode: results on a shared output folder would
# be unreadable to other users, the dashboard's user and share clients. A result gets what open()
# would give it: 0666 less the umask (0644 under the usual 022).
FILE_MODE = 0o666 & ~_process_umask()


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


# `.<output name>.<8 random characters>.tmp`: mkstemp's characters. An output name leaves room for
# this within NAME_MAX (contract.TEMP_NAME_OVERHEAD), so a temporary name is never too long.
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# Every temporary file is renamed or removed by its writer within one job (queue.job_timeout_s, after
# which a worker's own watchdog ends it) or one collector write: one older than that by this margin
# was left by a writer that died, and no one will ever finish it.
STALE_TEMP_MARGIN_S = 60


def is_temp_name(name: str) -> bool:
    """Whether a file in the output folder is one of depthq's temporary files."""
    return name.startswith(".") and name.endswith(".tmp") and _TEMP_NAME.match(name) is not None


def stale_temp_age_s(job_timeout_s: float) -> float:
    """How old a temporary file must be before nothing can still be writing it."""
    return job_timeout_s + STALE_TEMP_MARGIN_S


def remove_stale_temps_in(folder: Path, names: Iterable[str], older_than_s: float, now: float) -> tuple[int, int]:
    """Of these names in `folder`, remove the temporary files older than `older_than_s`, left by a
    writer that died mid-write. Returns (removed, younger ones left for their writer)."""
    removed = young = 0
    for name in names:
        if not is_temp_name(name):
            continue
        path = folder / name
        try:
            if now - path.stat().st_mtime < older_than_s:
                young += 1
                continue
            path.unlink()
            removed += 1
        except FileNotFoundError:
            continue  # renamed into place or removed by its writer meanwhile
    return removed, young


def staged_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """The whole file under a temporary name beside `path`, synced; rename it into place to publish it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    tmp = staged_write(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def json_bytes(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def remove_stale_temps(root: Path, source: str, kinds: Iterable[str]) -> int:
    """Temporary files a killed writer left for these outputs; call it only when no other writer can
    be at work on them (a result taken over from a dead collector). Returns how many went."""
    removed = 0
    for kind in kinds:
        path = output_path(root, source, kind)
        if path.parent.is_dir():
            for stale in path.parent.glob(glob.escape(_temp_prefix(path)) + "*.tmp"):
                stale.unlink(missing_ok=True)
                removed += 1
    return removed


def write_outputs(root: Path, source: str, files: Mapping[str, bytes]) -> None:
    """One photo's files: data first, then its sidecar, whose presence says the set is whole.

    A sidecar supersedes an earlier error file of the same photo. An error file comes alone.
    """
    for kind, data in files.items():
        if kind not in ("json", ERROR_KIND):
            atomic_bytes(output_path(root, source, kind), data)
    if ERROR_KIND in files:
        atomic_bytes(output_path(root, source, ERROR_KIND), files[ERROR_KIND])
    if "json" in files:
        atomic_bytes(output_path(root, source, "json"), files["json"])
        output_path(root, source, ERROR_KIND).unlink(missing_ok=True)
