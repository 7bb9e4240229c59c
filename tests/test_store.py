"""The output store (worker.store) against real disks: what a full one, and a name too long, do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from depthq.contract import MAX_KEPT_NAME, output_base
from depthq.sidecar import Sidecar
from tests import disk
from tests.endstate import temporary_files
from worker.errors import OutputUnavailableError
from worker.store import OutputStore


def _preview() -> bytes:
    return b"\x89PNG fake preview"


def test_a_short_write_on_a_full_disk_is_the_disks_fault_not_the_photos(tmp_path: Path) -> None:
    """numpy reports a write cut short by a full disk as "N requested and M written", with no errno:
    that was taken for the photo's fault, spent its retries, and left a good photo with an error file."""
    with disk.small_disk(tmp_path / "out", "1m") as out:
        disk.fill(out, leave_bytes=300 * 1024)  # room for part of the map only
        store = OutputStore(out)
        with pytest.raises(OutputUnavailableError) as raised:
            store.write_data("a.jpg", np.zeros((1000, 1000), np.float32), _preview(), [])
        cause = raised.value.cause
        assert isinstance(cause, OSError) and cause.errno is None and "requested and" in str(cause)
        assert "output.dir" in str(raised.value) and "MiB free" in str(raised.value)
        assert temporary_files(out) == []  # the part written is gone, and so is anything staged before


def test_a_later_file_that_fails_takes_the_files_staged_before_it_along(tmp_path: Path) -> None:
    """The map staged, then no room for the preview: the map's temporary file must not stay behind
    (it did, once per try, until a later file's failure discarded what was staged before it)."""
    with disk.small_disk(tmp_path / "out", "1m") as out:
        disk.fill(out, leave_bytes=4096)  # one page: the small map fits, the preview after it does not
        store = OutputStore(out)
        with pytest.raises(OutputUnavailableError):
            store.write_data("a.jpg", np.ones((4, 4), np.float32), b"\x89PNG" + bytes(8192), [])
        assert temporary_files(out) == []
        assert sorted(p.name for p in out.iterdir()) == ["filler"]


@pytest.mark.parametrize("length", [MAX_KEPT_NAME - 4, MAX_KEPT_NAME - 3, 240, 251])
def test_every_name_the_filesystem_takes_gets_its_outputs(tmp_path: Path, length: int) -> None:
    """A name of 230 bytes or more (UTF-8) got "File name too long" (an error file, at 230) or no
    output at all (above). Names up to MAX_KEPT_NAME keep their outputs' names whole; longer ones
    get a shortened, documented form, the same on every host."""
    stem = ("é" * length)[: (length - 4) // 2] + "x" * ((length - 4) % 2)
    name = stem + ".jpg"
    assert len(name.encode()) == length
    store = OutputStore(tmp_path)
    store.write_data(f"day/{name}", np.ones((4, 4), np.float32), _preview(), ["tiff", "png16"])
    sidecar = Sidecar.from_dict({"source": f"day/{name}"})
    assert sidecar is not None
    store.write_sidecar(f"day/{name}", sidecar)
    written = sorted(p.name for p in (tmp_path / "day").iterdir())
    base = output_base(name)
    assert (base == name) == (length <= MAX_KEPT_NAME)
    assert written == sorted(f"{base}{s}" for s in (".depth.npy", ".depth.png", ".depth.tiff", ".json", ".preview.png"))
    assert json.loads((tmp_path / "day" / f"{base}.json").read_text())["source"] == f"day/{name}"
    if base != name:
        assert base.endswith(".jpg") and "~" in base and name.startswith(base.split("~")[0])
