"""`depthq doctor`: why a machine will not take jobs, in one command, one line per check.

Each check says ok, warn (works, but will bite), or FAIL, with the fix (a warning always has one). It
looks at what a worker or a watcher needs on this host: the config (and whether a running `depthq up`
filled it in), Redis (reachable, and set up not to drop jobs), the folders, inotify's limits, the
backend `auto` would pick, the model (present, its licence, and one warm-up prediction), Core ML's
cache on a Mac, the clock against Redis, and workers on the queue that are not depthq's. It downloads
nothing. Exit 1 when a check fails, so an installer can run it last.

Only the CLI imports this; it reaches into `worker` inside the model checks alone.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from redis import Redis

from depthq.config import Config, ConfigError
from depthq.connection import connect, redact, resolve_url
from depthq.contract import WORKER_FIELDS, make_queue
from depthq.running import Sharing

State = Literal["ok", "warn", "FAIL"]
# Clocks further apart than this make job ages, heartbeats and `depthq status` lie.
MAX_SKEW_S = 2.0
# Free space under which the output folder gets a warning: a few hundred 12 MP results.
LOW_FREE_BYTES = 2 * 2**30


@dataclass(frozen=True)
class Check:
    name: str
    state: State
    detail: str
    # What to do about it. A warning without one would only worry the reader, so it cannot be made;
    # a FAIL's fix is mostly in its detail already (a ConfigError's message names the key and the fix).
    fix: str = ""

    def __post_init__(self) -> None:
        if self.state == "warn" and not self.fix:
            raise ValueError(f"doctor: the warning {self.detail!r} has no fix; give it one or make it no warning")

    def line(self) -> str:
        text = f"{self.detail}; {self.fix}" if self.fix else self.detail
        return f"{self.state:<4}  {self.name:<9} {text}"


def _config(config: Config, config_file: Path | None) -> Iterator[Check]:
    yield Check("config", "ok", f"{config_file or 'no file: defaults'} + DEPTHQ_* variables + flags")


def _settings(sharing: Sharing | None) -> Iterator[Check]:
    """Whose settings the checks below use: a running depthq up's fill what this command is not told."""
    if sharing is None:
        return
    up = sharing.running
    if up is None:
        yield Check("settings", "ok", f"this command's own (no depthq up runs here: no {sharing.path})")
    elif sharing.ignored is not None:
        yield Check("settings", "ok", f"this command's own; {sharing.path} is ignored: {sharing.ignored}")
    elif sharing.taken:
        keys = ", ".join(sharing.taken)
        yield Check("settings", "ok", f"those of the running depthq up ({up.who()}) for {keys}, from {sharing.path}")
    else:
        yield Check("settings", "ok", f"this command's own, the same as the running depthq up's ({up.who()})")


def _redis(config: Config) -> tuple[list[Check], Redis | None]:
    try:
        url = resolve_url(config)
        connection = connect(url, config.redis)
    except ConfigError as exc:
        return [Check("redis", "FAIL", str(exc))], None
    # No redis.url: resolve_url found the Redis a `depthq up` runs here, whose settings are depthq's to fix.
    embedded = not config.redis.url
    info = connection.info()
    checks = [Check("redis", "ok", f"{redact(url)}: Redis {info.get('redis_version', '?')}")]
    policy, limit = info.get("maxmemory_policy", "?"), int(info.get("maxmemory", 0))
    if policy != "noeviction":
        checks.append(
            Check(
                "redis",
                "FAIL",
                f"maxmemory-policy is {policy}: Redis would silently drop queued jobs when full; "
                "set maxmemory-policy noeviction (deploy/redis/redis.conf does)",
            )
        )
    elif limit == 0:
        fix = (
            "restart depthq up: it now starts its Redis with a limit (redis.maxmemory)"
            if embedded
            else "set `maxmemory 2gb` (size it to the machine: a job takes about 2 KB) in its redis.conf, as "
            "deploy/redis/redis.conf does, or now: `redis-cli CONFIG SET maxmemory 2gb`, then "
            "`redis-cli CONFIG REWRITE`"
        )
        checks.append(Check("redis", "warn", "no maxmemory: a long backlog can take all the host's memory", fix))
    else:
        checks.append(Check("redis", "ok", f"maxmemory {limit / 2**20:.0f} MiB, noeviction"))
    if str(info.get("aof_enabled", 0)) != "1":
        checks.append(
            Check(
                "redis",
                "warn",
                "AOF is off: a Redis restart loses the queue",
                "set `appendonly yes` in its redis.conf, as deploy/redis/redis.conf does, or now: "
                "`redis-cli CONFIG SET appendonly yes`, then `redis-cli CONFIG REWRITE`",
            )
        )
    else:
        checks.append(Check("redis", "ok", "AOF on: the queue survives a Redis restart"))
    return checks, connection


def _writable(folder: Path) -> str | None:
    """None if a file can be created in `folder` (which is created if missing), else why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".depthq-doctor-"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _folders(config: Config) -> Iterator[Check]:
    watch, output = config.producer.watch, config.output.dir
    if not watch.is_dir():
        yield Check("folders", "FAIL", f"producer.watch {watch} is not a folder; create it or point the setting at one")
    elif not os.access(watch, os.R_OK | os.X_OK):
        yield Check("folders", "FAIL", f"producer.watch {watch} cannot be read by this user")
    else:
        yield Check("folders", "ok", f"producer.watch {watch} readable")
    why = _writable(output)
    if why is not None:
        yield Check("folders", "FAIL", f"output.dir {output} is not writable ({why}); fix its permissions or mount")
        return
    free = shutil.disk_usage(output).free
    if free < LOW_FREE_BYTES:
        fix = "free space there, or point output.dir at a larger disk (when it is full, photos wait)"
        yield Check("folders", "warn", f"output.dir {output} writable, {free / 2**30:.1f} GiB free", fix)
    else:
        yield Check("folders", "ok", f"output.dir {output} writable, {free / 2**30:.1f} GiB free")


def _inotify(config: Config) -> Iterator[Check]:
    if not sys.platform.startswith("linux") or config.producer.polling or not config.producer.watch.is_dir():
        return
    folders = sum(1 for _ in os.walk(config.producer.watch))
    try:
        limit = int(Path("/proc/sys/fs/inotify/max_user_watches").read_text().strip())
    except (OSError, ValueError):
        yield Check(
            "inotify",
            "warn",
            "cannot read fs.inotify.max_user_watches",
            "see `sysctl fs.inotify.max_user_watches`, or set producer.polling: true (--polling), which needs none",
        )
        return
    if folders > limit // 2:
        yield Check(
            "inotify",
            "warn" if folders <= limit else "FAIL",
            f"{folders} folders to watch, fs.inotify.max_user_watches {limit} (shared by every program)",
            f"sudo sysctl fs.inotify.max_user_watches={max(2 * folders, 524288)}",
        )
    else:
        yield Check("inotify", "ok", f"{folders} folder(s) to watch, limit {limit}")


def _backend_and_model(config: Config) -> Iterator[Check]:
    from worker.backends import choose_backend, create_backend
    from worker.errors import BackendNotReadyError, BackendUnavailableError, ModelUnavailableError

    name = choose_backend(config)
    if config.worker.backend != "auto":
        why = "worker.backend says so"
    elif name == "coreml":
        why = "an Apple Silicon Mac with a Core ML model in model.cache_dir"
    else:
        why = "not an Apple Silicon Mac with a Core ML model" if sys.platform == "darwin" else f"{sys.platform}"
    yield Check("backend", "ok", f"{name} ({why})")
    if name == "torch":
        from worker.models import licence_of, resolve_model_dir

        offline = config.model.model_copy(update={"offline": True})  # the doctor downloads nothing
        try:
            folder = resolve_model_dir(offline)
        except ModelUnavailableError as exc:
            why = str(exc).replace("model.offline is on, so nothing is downloaded", "depthq doctor downloads nothing")
            yield Check("model", "FAIL", why)
            return
        yield Check("model", "ok", f"{config.model.path} in {folder}; licence: {licence_of(folder)}")
    import numpy as np

    try:
        backend = create_backend(config)
        started = time.perf_counter()
        backend.load()
        loaded = time.perf_counter()
        backend.predict(np.zeros((backend.input_size, backend.input_size, 3), dtype=np.uint8))
        predicted = time.perf_counter()
    except (ModelUnavailableError, BackendUnavailableError) as exc:
        yield Check("model", "FAIL", str(exc))
        return
    except BackendNotReadyError as exc:  # may pass: the worker's service manager starts it again
        yield Check("model", "FAIL", f"{exc} (a worker would exit 75 and be started again)")
        return
    yield Check(
        "model",
        "ok",
        f"{backend.model_name} loaded on {backend.device} in {loaded - started:.1f} s; one warm-up prediction "
        f"at {backend.input_size}x{backend.input_size} took {predicted - loaded:.2f} s",
    )
    if name == "coreml":
        from worker.backends.coreml_backend import compiled_cache_path

        package = Path(backend.model_info["path"])  # type: ignore[attr-defined]
        cached = compiled_cache_path(package, config.model.cache_dir / ".compiled").is_dir()
        yield Check(
            "coreml",
            "ok",
            f"compute units {config.model.compute_units}; compiled model "
            + ("cached: later starts take seconds" if cached else "not cached yet: the first start compiles it"),
        )


def _clock(connection: Redis) -> Iterator[Check]:
    before = time.time()
    seconds, micros = connection.time()
    after = time.time()
    skew = seconds + micros / 1e6 - (before + after) / 2
    state: State = "ok" if abs(skew) <= MAX_SKEW_S else "warn"
    fix = "" if state == "ok" else "turn on NTP on both machines"
    yield Check("clock", state, f"{skew:+.3f} s against the Redis server", fix)


def _foreign_workers(connection: Redis, config: Config) -> Iterator[Check]:
    from rq import Worker

    from depthq.contract import SERIALIZER

    workers = Worker.all(connection=connection, queue=make_queue(connection, config), serializer=SERIALIZER)
    foreign = []
    for w in workers:
        if connection.hget(w.key, WORKER_FIELDS["backend"]) is None:
            foreign.append(w.name)
    if foreign:
        yield Check(
            "workers",
            "FAIL",
            f"{len(foreign)} worker(s) on queue {config.queue.name} are not depthq's: {', '.join(sorted(foreign))}; "
            "stop them (a plain `rq worker` fails every depthq job it takes)",
        )
    else:
        yield Check("workers", "ok", f"{len(workers)} depthq worker(s) on queue {config.queue.name}")


def _video(config: Config) -> Iterator[Check]:
    """Whether dropped clips will be taken, and with what: PyAV's FFmpeg and its H.264 encoder."""
    if not config.video.enabled:
        yield Check("video", "ok", "clips are left alone (video.enabled: false)")
        return
    try:
        import av
    except ImportError as exc:
        yield Check("video", "FAIL", f"PyAV cannot be imported ({exc}); reinstall depthq (pip install -e .)")
        return
    found = f"PyAV {av.__version__}, FFmpeg {av.ffmpeg_version_info}"
    if "libx264" not in av.codecs_available:
        yield Check(
            "video",
            "warn",
            f"{found} has no libx264: clip previews are MPEG-4 Part 2, which browsers do not play",
            "install PyAV's own wheel (pip install --force-reinstall --no-binary :none: av), which has libx264",
        )
        return
    extensions = " ".join(config.video.extensions)
    yield Check("video", "ok", f"clips ({extensions}) taken: {found}, H.264 previews")


def run_checks(
    config: Config, config_file: Path | None, model: bool = True, sharing: Sharing | None = None
) -> list[Check]:
    checks: list[Check] = [*_config(config, config_file), *_settings(sharing)]
    redis_checks, connection = _redis(config)
    checks += redis_checks
    checks += _folders(config)
    checks += _inotify(config)
    checks += _video(config)
    if model:
        checks += _backend_and_model(config)
    if connection is not None:
        checks += _clock(connection)
        checks += _foreign_workers(connection, config)
        connection.close()
    return checks


def doctor(
    config: Config,
    config_file: Path | None,
    out: Callable[[str], None] = print,
    model: bool = True,
    sharing: Sharing | None = None,
) -> int:
    """Print one line per check; 1 if any failed."""
    checks = run_checks(config, config_file, model=model, sharing=sharing)
    for check in checks:
        out(check.line())
    failed = [c for c in checks if c.state == "FAIL"]
    out(f"{len(failed)} failed, {sum(c.state == 'warn' for c in checks)} warning(s), {len(checks)} checks")
    return 1 if failed else 0
