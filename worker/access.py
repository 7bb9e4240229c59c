"""Before a worker loads its model: can it read the watched folder and write the output at all?

A launchd agent does not inherit Terminal's privacy grants (macOS's TCC): a `depthq doctor` run from
Terminal passes, and the agent then meets "Operation not permitted" on `/Volumes/...` or in a
protected folder, for every photo. Such a worker would take each job only to postpone it. So it
looks once at start, before the minutes of a first model load, and exits 75 naming the folder and the
binary to grant access to; its service manager starts it again, and it works once access is given.

Only a refusal counts here (EPERM, EACCES). A full disk or a share not mounted yet is an outage the
jobs ride out with back-off; the worker starts. A folder that is not there is not made or judged: a
worker serving only the redis transport never has one (its jobs carry the photo and the result), and
one that is merely unmounted is the outage above.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tempfile
from pathlib import Path

from depthq.config import Config

REFUSED = (errno.EPERM, errno.EACCES)


class FolderAccessError(RuntimeError):
    """The worker may not read the watched folder or write the output: it cannot do any job here."""


def granted_binary() -> str:
    """The program macOS asks about: the interpreter the venv's `python` links to, not the link."""
    return os.path.realpath(sys.executable)


def _refusal(folder: Path, setting: str, doing: str, exc: OSError) -> FolderAccessError:
    hint = ""
    if sys.platform == "darwin":
        hint = (
            f"; on a Mac a launchd agent lacks Terminal's privacy grants: in System Settings > Privacy & "
            f"Security, give Full Disk Access (or Network Volumes) to {granted_binary()}"
        )
    return FolderAccessError(
        f"{setting} {folder}: cannot {doing} ({exc.strerror or exc}){hint}; the worker exits 75 and is "
        "started again, and takes jobs once it can"
    )


def check_folder_access(config: Config) -> None:
    """Raise FolderAccessError if a folder refuses this process; for the shared transport only (over
    the redis transport a worker touches neither folder)."""
    if config.transport.mode != "shared":
        return
    watch, output = config.producer.watch, config.output.dir
    try:
        with os.scandir(watch) as entries:
            next(entries, None)
    except OSError as exc:
        if exc.errno in REFUSED:
            raise _refusal(watch, "producer.watch", "list the photos", exc) from None
    try:
        if not stat.S_ISDIR(output.stat().st_mode):
            return
        # A temporary name (depthq.files): one left by a kill here is removed like any writer's.
        fd, probe = tempfile.mkstemp(dir=output, prefix=".depthq-access-probe.", suffix=".tmp")
    except OSError as exc:
        if exc.errno in REFUSED:
            raise _refusal(output, "output.dir", "write there", exc) from None
        return  # not there (see the module's docstring: nothing is made here), or an outage
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
