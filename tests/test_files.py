"""depthq/files.py: atomic output files, readable by whoever the umask allows, as open() would make them."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from redis import Redis

from depthq.config import Config
from producer.enqueue import Enqueuer
from testkit.photos import write_jpeg
from worker.backends import Backend
from worker.worker import build_worker

REPO = Path(__file__).resolve().parent.parent

_WRITE_UNDER_UMASK = """
import os, sys
os.umask(int(sys.argv[2], 8))
from pathlib import Path
from depthq.files import write_outputs
write_outputs(Path(sys.argv[1]), "sub/a.jpg", {"npy": b"d", "preview": b"p", "json": b"{}"})
"""


@pytest.mark.parametrize(("umask", "mode"), [("022", 0o644), ("027", 0o640), ("002", 0o664)])
def test_outputs_take_the_umasks_mode(tmp_path: Path, umask: str, mode: int) -> None:
    subprocess.run([sys.executable, "-c", _WRITE_UNDER_UMASK, str(tmp_path), umask], cwd=REPO, check=True)
    written = sorted((tmp_path / "sub").iterdir())
    assert [p.name for p in written] == ["a.jpg.depth.npy", "a.jpg.json", "a.jpg.preview.png"]
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_a_workers_results_are_readable_by_others_under_the_usual_umask(
    make_config: Callable[..., Config], redis_client: Redis, tiny_backend: Backend
) -> None:
    config = make_config()
    Enqueuer(config, redis_client).submit(write_jpeg(config.producer.watch / "a.jpg"))
    build_worker(config, redis_client, tiny_backend).work(burst=True, with_scheduler=False)
    written = sorted(config.output.dir.iterdir())
    assert json.loads((config.output.dir / "a.jpg.json").read_text())["source"] == "a.jpg"
    umask_mode = 0o666 & ~_umask_of_this_process()
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == umask_mode, path


def _umask_of_this_process() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask line in /proc/self/status")
