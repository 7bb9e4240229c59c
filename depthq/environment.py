"""Failures of the environment told apart from failures of a photo.

A full disk, a quota, a read-only remount, an I/O error or a share that went away are the
environment's fault: whatever hit one, the next photo hits too, and everything works again once an
operator frees space or fixes the mount. Such a failure is waited out and retried, never recorded
against the photo. Anything else a write meets (a name the filesystem refuses, a folder where a file
should be) belongs to that one photo: it gets an error file, and the others go on.

A full disk does not always say ENOSPC. numpy's `tofile` reports a short write as
`OSError("N requested and M written")` with no errno; SQLite says "database or disk is full"
(SQLITE_FULL) or "disk I/O error" (SQLITE_IOERR). One function judges them all, so the worker's
store, the collector and the producer's index agree. Kept free of numpy: the producer imports it.
"""

from __future__ import annotations

import errno
import re
import shutil
import sqlite3
from pathlib import Path

# Errors a write meets because of the disk or the mount, not the data being written. EACCES and
# EPERM are here too: a folder made unwritable refuses every photo alike, until someone fixes it.
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EIO,
        errno.EACCES,
        errno.EPERM,
        errno.ESTALE,
        errno.ENOTCONN,
        errno.ETIMEDOUT,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.ECONNABORTED,
        errno.ECONNRESET,
    }
)

# numpy's `ndarray.tofile` (which `np.save` uses on a real file): "%d requested and %d written".
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")

# SQLite's primary result codes (the low byte of an extended code) that mean the disk or the mount.
_SQLITE_FULL = 13
_SQLITE_IOERR = 10
_SQLITE_READONLY = 8
_SQLITE_CANTOPEN = 14
_SQLITE_ENVIRONMENT = frozenset({_SQLITE_FULL, _SQLITE_IOERR, _SQLITE_READONLY, _SQLITE_CANTOPEN})


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and what it was raised from or during, without looping on a cycle."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def is_environment_failure(exc: BaseException) -> bool:
    """Whether a failed write was the disk's or the mount's fault (retry later), not the data's."""
    for cause in _causes(exc):
        if isinstance(cause, sqlite3.Error):
            code = getattr(cause, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in _SQLITE_ENVIRONMENT:
                return True
            if "disk is full" in str(cause) or "disk I/O error" in str(cause):
                return True
        elif isinstance(cause, OSError):
            if cause.errno in ENVIRONMENT_ERRNOS:
                return True
            if cause.errno is None and _SHORT_WRITE.search(str(cause)):
                return True
    return False


def free_space(folder: Path) -> str:
    """'12.3 MiB free of 1024 MiB', for messages that tell the operator what to free."""
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.0f} MiB"


def describe(exc: BaseException) -> str:
    """The most telling line of an environment failure: the OS's or SQLite's own words."""
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    return str(exc)
