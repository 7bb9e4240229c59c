"""A real small disk for the tests that fill one: a tmpfs of a given size (Linux, root).

Without root it skips, unless TEST_REQUIRE_TOOLS=1 (CI), which asks for every check: then it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _unavailable(why: str) -> None:
    if os.environ.get("TEST_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{why}, and TEST_REQUIRE_TOOLS=1 asks for every check")
    pytest.skip(why)


@contextmanager
def small_disk(folder: Path, size: str = "1m") -> Iterator[Path]:
    """`folder`, a tmpfs of `size` for as long as the block runs."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        _unavailable("mounting a small tmpfs needs root on Linux")
    folder.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if made.returncode != 0:
        _unavailable(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave_bytes: int = 2048) -> Path:
    """Take all the disk's free space but `leave_bytes`; remove the returned file to give it back."""
    filler = folder / "filler"
    with filler.open("wb") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(folder).free - leave_bytes))
    return filler
