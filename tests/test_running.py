"""A running `depthq up`'s record of its settings, as the other commands read it: what wins, what is
trusted, and a record that cannot be written. (`depthq up` and other commands run for real together:
tests/test_supervisor.py.)"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from depthq.config import Config, load_config
from depthq.running import RECORD_FILE, adopt, read, record, remove
from tests.disk import fill, small_disk

URL = "redis://127.0.0.1:6390/0"


def up_config(tmp_path: Path, **sections: dict[str, object]) -> Config:
    """What a `depthq up --model DIR --watch photos` would run with; its data folder under tmp_path."""
    base: dict[str, dict[str, object]] = {
        "redis": {"data_dir": str(tmp_path / "data")},
        "model": {"path": "/srv/models/depthpro"},
        "producer": {"watch": str(tmp_path / "photos")},
        "output": {"dir": str(tmp_path / "results")},
    }
    for section, keys in sections.items():
        base.setdefault(section, {}).update(keys)
    empty = tmp_path / "up.yaml"
    empty.write_text("{}\n")
    return load_config(empty, base, environ={})


def own(tmp_path: Path, text: str = "", **flags: dict[str, object]) -> tuple[Config, Path]:
    """Another command's own config: its file (the same data folder), no variables, `flags`."""
    path = tmp_path / "own.yaml"
    path.write_text(f"redis:\n  data_dir: {tmp_path / 'data'}\n" + text)
    return load_config(path, flags, environ={}), path


def test_what_the_command_is_not_told_comes_from_the_running_up_and_its_own_wins(tmp_path: Path) -> None:
    assert record(up_config(tmp_path), None, URL) == tmp_path / "data" / RECORD_FILE
    config, file = own(tmp_path, "queue:\n  name: mine\n", output={"dir": str(tmp_path / "flagged")})
    shared, sharing = adopt(config, file, {"output": {"dir": str(tmp_path / "flagged")}})
    assert shared.model.path == "/srv/models/depthpro" and shared.producer.watch == tmp_path / "photos"
    assert shared.queue.name == "mine"  # its file
    assert shared.output.dir == tmp_path / "flagged"  # its flag
    assert sharing.taken == ("model.path", "producer.watch") and sharing.ignored is None
    # Its DEPTHQ_ variables win too (load_config reads the environment the command runs in).
    assert load_config(file, environ={"DEPTHQ_MODEL_PATH": "mine"}, base={"model": {"path": "x"}}).model.path == "mine"


def test_a_record_on_another_redis_or_from_a_process_that_is_gone_is_not_used(tmp_path: Path) -> None:
    record(up_config(tmp_path), None, URL)
    elsewhere = {"redis": {"url": "redis://elsewhere:6379/0"}}
    config, file = own(tmp_path, **elsewhere)
    same, sharing = adopt(config, file, elsewhere)
    assert same is config and sharing.ignored is not None and "uses another Redis" in sharing.ignored

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = tmp_path / "data" / RECORD_FILE
    body = json.loads(path.read_text())
    # A pid the system handed out again is not it either: the start time differs.
    for stamp in (f"{gone.pid} {body['process'].split()[1]}", f"{body['pid']} 12345.000"):
        path.write_text(json.dumps({**body, "process": stamp}))
        config, file = own(tmp_path)
        same, sharing = adopt(config, file, {})
        assert same is config and sharing.ignored is not None and "is gone" in sharing.ignored


def test_stopping_removes_only_its_own_record(tmp_path: Path) -> None:
    config = up_config(tmp_path)
    path = record(config, None, URL)
    assert path is not None
    body = json.loads(path.read_text())
    path.write_text(json.dumps({**body, "pid": body["pid"] + 1}))  # another depthq up wrote it since
    remove(config)
    assert path.exists()
    record(config, None, URL)
    remove(config)
    assert not path.exists()
    assert read(path) is None


def test_a_full_disk_is_logged_once_and_nothing_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with small_disk(tmp_path / "data", "1m") as data:
        filler = fill(data, leave_bytes=0)
        config = up_config(tmp_path)
        with caplog.at_level(logging.WARNING, logger="depthq.running"):
            assert record(config, None, URL) is None
        remove(config)  # nothing there: nothing to do, nothing raised
        filler.unlink()
    (warning,) = caplog.records
    assert "could not record this depthq up's settings" in warning.getMessage()
    assert "No space left on device" in warning.getMessage() and "--model" in warning.getMessage()
    assert list(data.glob(".up.json.*")) == []  # no temporary file left behind


def test_a_record_that_cannot_be_renamed_into_place_is_logged_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder where the file should be (nothing depthq writes; a hand's mistake): the same path."""
    (tmp_path / "data" / RECORD_FILE).mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="depthq.running"):
        assert record(up_config(tmp_path), None, URL) is None
    assert len(caplog.records) == 1
    config, file = own(tmp_path)
    assert adopt(config, file, {})[1].running is None
