"""What a running `depthq up` tells the other depthq commands on its machine: the settings it runs with.

`depthq up` already writes its embedded Redis's URL into `redis.data_dir`, so that `depthq enqueue` in
a second shell finds that Redis. Its settings were left out: started as `depthq up --model DIR`, or
with DEPTHQ_MODEL_PATH set in its own shell only, it ran DIR while `depthq doctor` in a second shell
checked the hub model (FAIL), and `depthq enqueue --force` there made jobs asking for the hub model:
every result then carried "the job asked for model ...", and a later copy of the photo had another
job id, so it was computed again instead of copied. So `depthq up` writes `redis.data_dir/up.json`
too (`record`), and the other commands on the machine take from it what they are not told
themselves (`adopt`). Precedence, highest first:

    flags > DEPTHQ_* variables > the command's config file > the running depthq up's > defaults

The record is trusted only while the process that wrote it runs (its pid and start time, as
`ps` shows them, so a pid reused since is not it), and only by a command on the same Redis.
`depthq up` removes it when it stops; a `depthq up` killed outright leaves it behind, ignored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from depthq.config import Config, ConfigError, load_config
from depthq.connection import redact
from depthq.files import atomic_bytes, json_bytes

log = logging.getLogger(__name__)

RECORD_FILE = "up.json"

# The settings that make a job what it is, so a command that differs from `depthq up` on any of them
# makes jobs its workers and its watcher disagree with: the model the payload asks for, which also
# keys the job id (a copy of a photo is copied, not computed, only under the same id); the queue;
# the watch root, which names the photo in the payload; the output folder, where "done" is looked
# for; the outputs asked for; the transport and its root name. The rest (a worker's device, ports,
# timeouts) is each process's own. redis.url is not among them: it may carry a password, and the
# embedded Redis is found through its own file (depthq.connection.URL_FILE).
SHARED_KEYS: dict[str, tuple[str, ...]] = {
    "model": ("path",),
    "producer": ("watch",),
    "output": ("dir", "formats"),
    "queue": ("name",),
    "transport": ("mode", "root"),
}


def record_path(config: Config) -> Path:
    return config.redis.data_dir / RECORD_FILE


def process_stamp(pid: int) -> str:
    """A process as `<pid> <start time>`: a pid the system has since given to another process differs."""
    return f"{pid} {psutil.Process(pid).create_time():.3f}"


def stamp_alive(stamp: str) -> bool:
    """Whether the process stamped so still runs: the same pid, started at the same time, not a zombie."""
    try:
        process = psutil.Process(int(stamp.split()[0]))
        return process_stamp(process.pid) == stamp and process.status() != psutil.STATUS_ZOMBIE
    except (ValueError, IndexError, psutil.Error):
        return False


def _plain(value: Any) -> Any:
    """A setting as JSON holds it; a folder absolute, so a command started elsewhere finds the same one."""
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def shared_settings(config: Config) -> dict[str, dict[str, Any]]:
    return {
        section: {key: _plain(getattr(getattr(config, section), key)) for key in keys}
        for section, keys in SHARED_KEYS.items()
    }


def record(config: Config, config_file: Path | None, redis_url: str) -> Path | None:
    """Write this `depthq up`'s settings for the other commands here; None if it could not.

    A full disk, a read-only data folder: the service runs as well without the record, and only the
    other commands lose their defaults, so it is logged, once, and depthq up goes on."""
    path = record_path(config)
    pid = os.getpid()
    body = {
        "pid": pid,
        "process": process_stamp(pid),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(psutil.Process(pid).create_time())),
        "cwd": os.getcwd(),
        "config_file": str(config_file.resolve()) if config_file is not None else None,
        "redis": redact(redis_url),
        "settings": shared_settings(config),
    }
    try:
        atomic_bytes(path, json_bytes(body))
    except OSError as exc:
        log.warning(
            "could not record this depthq up's settings in %s (%s); it runs on, but other depthq commands "
            "here use only their own settings: give them the same --model, --watch, --output",
            path,
            exc.strerror or exc,
        )
        return None
    return path


def remove(config: Config) -> None:
    """Remove the record if it is this process's: another depthq up (on an external Redis, which
    nothing stops sharing a data folder) may have written its own since."""
    path = record_path(config)
    found = read(path)
    if found is not None and found.pid == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()


@dataclass(frozen=True)
class RunningUp:
    """A record as read: who wrote it, whether it still runs, and its settings."""

    path: Path
    pid: int
    started: str
    redis: str
    alive: bool
    settings: dict[str, dict[str, Any]]

    def who(self) -> str:
        return f"pid {self.pid}, started {self.started}"


def read(path: Path) -> RunningUp | None:
    """The record at `path`; None if there is none, or it is not one (a half-written file cannot be:
    it is renamed into place whole)."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        settings = {
            section: {key: body["settings"][section][key] for key in keys if key in body["settings"].get(section, {})}
            for section, keys in SHARED_KEYS.items()
        }
        return RunningUp(
            path=path,
            pid=int(body["pid"]),
            started=str(body["started"]),
            redis=str(body["redis"]),
            alive=stamp_alive(str(body["process"])),
            settings=settings,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass(frozen=True)
class Sharing:
    """Where a command's settings came from, for `depthq doctor` to say."""

    path: Path
    running: RunningUp | None = None
    # The keys the running depthq up's record changed, as section.key.
    taken: tuple[str, ...] = ()
    # Why a record that is there was not used.
    ignored: str | None = None


def adopt(
    config: Config,
    config_file: str | os.PathLike[str] | None,
    overrides: Mapping[str, Mapping[str, Any]],
) -> tuple[Config, Sharing]:
    """`config` (the command's own: file, DEPTHQ_* variables, flags) with the running depthq up's
    shared settings under it, where the command sets none of them itself."""
    path = record_path(config)
    running = read(path)
    if running is None:
        return config, Sharing(path)
    if not running.alive:
        return config, Sharing(path, running, ignored=f"the depthq up that wrote it ({running.who()}) is gone")
    if config.redis.url and redact(config.redis.url) != running.redis:
        why = f"the depthq up that wrote it ({running.who()}) uses another Redis, {running.redis}"
        return config, Sharing(path, running, ignored=why)
    try:
        shared = load_config(config_file, overrides=overrides, base=running.settings)
    except ConfigError as exc:
        raise ConfigError(f"{exc}\n(with the running depthq up's settings ({running.who()}), from {path})") from None
    taken = tuple(
        f"{section}.{key}"
        for section, keys in SHARED_KEYS.items()
        for key in keys
        if getattr(getattr(shared, section), key) != getattr(getattr(config, section), key)
    )
    return shared, Sharing(path, running, taken)
