"""worker/access.py: a worker whose folders refuse it exits 75 at start, naming the folder, before it
loads a model. The refusal is real: the output folder made immutable (chattr +i), which gives even
root the "Operation not permitted" (EPERM) that macOS's privacy checks give a launchd agent."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from redis import Redis

from depthq.config import Config
from tests.disk import _unavailable
from tests.endstate import assert_end_state
from tests.environ import worker_env


@contextmanager
def immutable(folder: Path) -> Iterator[Path]:
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        _unavailable(f"chattr +i is refused here: {made.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def _work(config: Config, redis_url: str, tiny_model: Path) -> subprocess.CompletedProcess[str]:
    env = worker_env(config, redis_url, tiny_model)
    return subprocess.run(
        [sys.executable, "-m", "worker", "--burst"], env=env, capture_output=True, text=True, timeout=120
    )


def test_an_output_folder_that_refuses_the_worker_ends_it_with_75_and_the_folder_named(
    make_config: Callable[..., Config], redis_url: str, redis_client: Redis, tiny_model: Path
) -> None:
    config = make_config()
    config.output.dir.mkdir(parents=True, exist_ok=True)
    with immutable(config.output.dir):
        refused = _work(config, redis_url, tiny_model)
    assert refused.returncode == 75, refused.stderr
    assert f"output.dir {config.output.dir}: cannot write there (Operation not permitted)" in refused.stderr
    assert "ready in" not in refused.stderr  # it stopped before loading the model
    assert not redis_client.keys("rq:worker:*")  # and never registered
    # Once the folder takes writes, the same worker starts; its probe leaves nothing behind.
    allowed = _work(config, redis_url, tiny_model)
    assert allowed.returncode == 0, allowed.stderr
    assert "ready in" in allowed.stderr
    assert_end_state(config, redis_client)


@pytest.mark.macos
def test_a_folder_privacy_protects_names_the_binary_to_grant_on_macos(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """~/Library/Mail is protected by macOS's privacy checks (TCC): a process without Full Disk Access
    is refused it with EPERM, as a launchd agent is refused a network volume."""
    from worker.access import FolderAccessError, check_folder_access, granted_binary

    protected = Path.home() / "Library" / "Mail"
    if not protected.is_dir():
        pytest.skip(f"{protected} is not here")
    try:
        os.listdir(protected)
    except PermissionError:
        pass
    else:
        pytest.skip("this process has Full Disk Access: nothing is refused to it")
    config = make_config(producer={"watch": str(protected)})
    with pytest.raises(FolderAccessError) as refused:
        check_folder_access(config)
    assert f"producer.watch {protected}: cannot list the photos" in str(refused.value)
    assert granted_binary() in str(refused.value) and "Full Disk Access" in str(refused.value)


def test_a_folder_that_is_not_there_is_neither_made_nor_judged(make_config: Callable[..., Config]) -> None:
    """A worker serving only the redis transport has no output folder, and a share not mounted yet is
    an outage its jobs ride out: neither stops the worker, and the check makes nothing."""
    from worker.access import check_folder_access

    config = make_config()
    assert not config.output.dir.exists()
    check_folder_access(config)
    assert not config.output.dir.exists()
