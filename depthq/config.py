"""depthq's settings: one YAML file, overridden by DEPTHQ_<SECTION>_<KEY> env vars, then by CLI flags.

Both the producer and the worker read their settings through `load_config`, so a key means the same
thing on every host. Settings are read once at start-up; nothing re-reads them in the middle of a job.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "DEPTHQ_"
CONFIG_ENV = "DEPTHQ_CONFIG"
LOG_LEVEL_ENV = "DEPTHQ_LOG_LEVEL"
# Set by `depthq up` for its workers: a pipe whose other end only it holds, so they notice its death.
PARENT_PIPE_ENV = "DEPTHQ_PARENT_PIPE"
# install.sh's choice of torch build: one exported for the install must not stop depthq after it.
INSTALL_TORCH_ENV = "DEPTHQ_TORCH"
# DEPTHQ_ variables that are not DEPTHQ_<SECTION>_<KEY> settings.
_NOT_SETTINGS = {CONFIG_ENV, LOG_LEVEL_ENV, PARENT_PIPE_ENV, INSTALL_TORCH_ENV}
DEFAULT_CONFIG_NAME = "config.yaml"
REDIS_SCHEMES = ("redis", "rediss", "unix")


class ConfigError(Exception):
    """A setting is missing or wrong; the message names the key and what it accepts."""


# How a command ends on a ConfigError (or a model that cannot load): retrying cannot fix it, so
# `depthq up` stops on it, and so do systemd (RestartPreventExitStatus) and launchd (`depthq work
# --final-exit-code 0` with KeepAlive {SuccessfulExit: false}).
EXIT_FINAL = 2
# Redis unreachable at start: it may pass by itself, so service managers retry (sysexits' EX_TEMPFAIL).
EXIT_RETRY = 75


class _Section(BaseModel):
    # Unknown keys are typos more often than not: refuse them instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Redis's own units (redis.conf): k, m, g are powers of 1000; kb, mb, gb powers of 1024.
_REDIS_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}


def redis_size_bytes(size: str) -> int | None:
    """`2gb` as Redis reads it, in bytes; None if it is no size, or 0, which Redis reads as no limit."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-z]*)\s*", size.lower())
    if match is None or match.group(2) not in _REDIS_UNITS or int(match.group(1)) == 0:
        return None
    return int(match.group(1)) * _REDIS_UNITS[match.group(2)]


class RedisConfig(_Section):
    url: str | None = None
    # Credentials kept out of the URL (and so out of `ps` and shell history).
    username: str | None = None
    password_file: Path | None = None
    # For rediss:// (TLS): the CA that signed the server's certificate.
    ca_file: Path | None = None
    data_dir: Path = Path(".depthq/redis")
    server_bin: Path | None = None
    startup_timeout_s: float = Field(10.0, gt=0)
    # The embedded Redis's memory limit: a size as Redis writes it (512mb, 2gb) or auto (see
    # depthq.redis_server.auto_maxmemory). Past it, writes wait (noeviction) instead of the host swapping.
    maxmemory: str = "auto"

    @field_validator("url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        """Refused here, naming the key, rather than by redis-py deep inside the first command."""
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in REDIS_SCHEMES:
            raise ValueError(
                f"{url!r} is not a Redis URL; write redis://host:6379/0 (rediss:// for TLS, unix:///path.sock)"
            )
        db = parts.path.strip("/") if parts.scheme != "unix" else dict(parse_qsl(parts.query)).get("db", "0")
        if db and not db.isdigit():
            raise ValueError(f"the database in {url!r} must be a number, as in redis://host:6379/0")
        return url

    @field_validator("maxmemory", mode="before")
    @classmethod
    def _maxmemory(cls, size: object) -> str:
        """A plain number is bytes, as in redis.conf (YAML and DEPTHQ_REDIS_MAXMEMORY=1000000 give an int)."""
        text = str(size).strip().lower() if isinstance(size, (str, int)) and not isinstance(size, bool) else ""
        if text != "auto" and redis_size_bytes(text) is None:
            raise ValueError(
                f"{size!r} is not a size; write one as Redis does (512mb, 2gb), or auto. Not 0: Redis reads "
                "it as no limit, and a long backlog could then take all the host's memory"
            )
        return text


class QueueConfig(_Section):
    name: str = Field("depthq", min_length=1)
    job_timeout_s: int = Field(600, gt=0)
    result_ttl_s: int = Field(86400, ge=0)
    failure_ttl_s: int = Field(7 * 86400, ge=0)


class ProducerConfig(_Section):
    watch: Path = Path("inbox")
    polling: bool = False
    poll_interval_s: float = Field(2.0, gt=0)
    settle_ms: int = Field(1000, ge=0)
    rescan_s: float = Field(300.0, gt=0)
    extensions: list[str] = Field(
        default_factory=lambda: ["jpg", "jpeg", "png", "heic", "heif", "tif", "tiff", "webp"], min_length=1
    )
    ignore: list[str] = Field(
        default_factory=lambda: [".*", "._*", "~*", "*.part", "*.crdownload", "*.tmp", ".DS_Store"]
    )
    # Prometheus /metrics on this port; null: off.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # Loopback unless asked: 0.0.0.0 for a remote Prometheus, with the port firewalled to it.
    metrics_bind: str = "127.0.0.1"


class WorkerConfig(_Section):
    backend: Literal["auto", "torch", "coreml"] = "auto"
    retries: int = Field(3, ge=0)
    retry_backoff_s: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [10, 60, 300], min_length=1)
    warmup: bool = True
    max_image_pixels: int = Field(100_000_000, gt=0)
    # Decode a JPEG at least twice the model's side reduced in libjpeg's DCT (48 MP: ~90 ms less). Off:
    # the model then sees an averaged image where ml-depth-pro's reference sees its plain bilinear resize.
    fast_decode: bool = False
    # A worker silent this long is dead: its job goes back to the queue (heartbeats every third of it).
    dead_after_s: int = Field(30, ge=10)
    # Prometheus /metrics on this port; `depthq up` gives its Nth worker this port + N. null: off.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # Loopback unless asked: 0.0.0.0 for a remote Prometheus, with the port firewalled to it.
    metrics_bind: str = "127.0.0.1"


class ModelConfig(_Section):
    path: str = Field("apple/DepthPro-hf", min_length=1)
    cache_dir: Path = Path("models")
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    # auto: float16 on CUDA, float32 elsewhere. bfloat16 (Ampere and later) cannot overflow as float16
    # can, but measured a larger depth error against float32 (bench/RESULTS.md, GPU section).
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # torch.compile mode for the torch backend, or false for eager. The compile happens in the worker's
    # load, before it takes a job, and costs start-up time (logged). reduce-overhead adds CUDA graphs
    # (the input is always 1 x 3 x S x S). Off by default until bench/RESULTS.md has CUDA figures.
    compile: Literal[False, "default", "reduce-overhead", "max-autotune"] = False
    offline: bool = False
    # Core ML (macOS): an .mlpackage; null picks the best metric model present in cache_dir.
    coreml_path: Path | None = None
    compute_units: Literal["all", "cpu_and_ne", "cpu_and_gpu", "cpu_only"] = "all"


class OutputConfig(_Section):
    dir: Path = Path("depth-out")
    formats: list[Literal["tiff", "png16", "ply", "exr"]] = Field(default_factory=list)
    # The PLY point cloud: at most this many points (the model's output grid, coarsened to fit), and
    # none farther than this many meters along the optical axis (sky, haze, the model's far clamp).
    ply_max_points: int = Field(default=2_500_000, ge=1)
    ply_max_depth_m: float = Field(default=100.0, gt=0)


class DashboardConfig(_Section):
    # Loopback unless asked: the dashboard can delete and requeue jobs.
    bind: str = "127.0.0.1"
    port: int = Field(9181, ge=1, le=65535)
    # HTTP basic auth; required to bind anywhere but loopback.
    username: str | None = None
    password_file: Path | None = None
    # Results the gallery page shows, newest first, and how often it looks for new ones.
    gallery_size: int = Field(48, ge=1, le=500)
    refresh_s: float = Field(5.0, gt=0)


class VideoConfig(_Section):
    """Video clips in the watched folder (issue 25): each becomes chunk jobs of `chunk_frames` frames and one
    assemble job that writes the clip's outputs once every chunk is done."""

    enabled: bool = True
    extensions: list[str] = Field(default_factory=lambda: ["mp4", "mov", "m4v", "mkv", "webm", "avi"])
    # Frames per chunk job: one seek, then decoding forward. Larger chunks seek less; smaller ones spread
    # a short clip over more workers.
    chunk_frames: int = Field(16, ge=1)
    # A clip with more frames than this is refused with an error file (18,000: 10 minutes at 30 fps).
    max_frames: int = Field(18_000, ge=1)
    # Compute every n-th frame (1: all of them).
    every_nth: int = Field(1, ge=1)


class TransportConfig(_Section):
    """How a photo reaches a worker, and its outputs come back.

    shared: jobs name a photo by a root name and a path under it, and each host maps root names to
    its own mount of the same share. redis: the photo's bytes travel through Redis, and a collector
    on the producer's host writes the outputs that come back.
    """

    mode: Literal["shared", "redis"] = "shared"
    # The name the watched folder (producer.watch) goes by in jobs.
    root: str = Field("inbox", pattern=r"^[A-Za-z0-9_.-]+$")
    # Root name -> this host's folder for it. A root not listed here is producer.watch.
    roots: dict[str, Path] = Field(default_factory=dict)
    # redis: the largest photo sent; a bigger one gets an error file saying so.
    max_photo_bytes: int = Field(64 * 2**20, gt=0)
    # redis: photos and results in Redis at once, in jobs and in bytes; beyond either, the producer
    # holds new photos back (on disk) until the collector has taken results out.
    max_inflight_jobs: int = Field(32, ge=1)
    max_inflight_bytes: int = Field(2**30, gt=0)
    # redis: a photo or result nobody collects is dropped after this long; the producer's rescan
    # then sends the photo again.
    blob_ttl_s: int = Field(7 * 86400, ge=60)
    # redis: a result a collector read but did not finish writing is taken by another after this long.
    claim_after_s: int = Field(60, ge=1)
    # redis: zstd level for the depth map (lossless). A float32 map gains little past 1: a 12 MP map
    # compresses to 0.84 of its size in 0.13 s at level 1, and 0.83 in 0.34 s at level 3.
    zstd_level: int = Field(1, ge=1, le=19)


class UpConfig(_Section):
    workers: int = Field(1, ge=1)


class LoggingConfig(_Section):
    """Where depthq's own log lines go.

    A service manager that keeps stdout in a file without rotating it (launchd) fills the disk over
    months; a file named here is rotated by depthq itself. Null: stderr, for a terminal, `depthq up`'s
    interleaved output, or systemd's journal, which rotates by itself.
    """

    # One process per file: each process rotates on its own, so several sharing a file shuffle lines
    # between the backups. `depthq up`'s children inherit it: leave it null there.
    file: Path | None = None
    # Rotate when the file would pass this size: file -> file.1 -> ... -> file.<backups>, the oldest dropped.
    max_bytes: int = Field(10 * 2**20, gt=0)
    # At least 1: with 0 the standard library never rotates, and the file grows for ever again.
    backups: int = Field(5, ge=1)


class Config(_Section):
    redis: RedisConfig = Field(default_factory=RedisConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    producer: ProducerConfig = Field(default_factory=ProducerConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    up: UpConfig = Field(default_factory=UpConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Map DEPTHQ_<SECTION>_<KEY> to nested keys; values are YAML so lists and booleans work."""
    out: dict[str, dict[str, Any]] = {}
    sections = Config.model_fields
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in _NOT_SETTINGS:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError(
                f"environment variable {name}: no config section matches; expected "
                f"DEPTHQ_<SECTION>_<KEY> with SECTION one of {', '.join(s.upper() for s in sections)}"
            )
        key = rest[len(section) + 1 :]
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment variable {name}: not a valid value: {exc}") from exc
        out.setdefault(section, {})[key] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _describe(errors: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in errors.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against config.yaml)"
        got = err.get("input")
        shown = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f"; got {got!r}"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def read_password_file(path: Path, key: str) -> str:
    """The first line of a secret file, so passwords stay out of config files, URLs and `ps`."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc.strerror})") from None
    if not lines or not lines[0]:
        raise ConfigError(f"{key}: {path} is empty; put the password on line 1")
    return lines[0]


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The file named on the command line, else $DEPTHQ_CONFIG, else ./config.yaml if present."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing file to --config")
        return path
    env = os.environ.get(CONFIG_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV}={env} does not exist; point it at a config.yaml or unset it")
        return path
    local = Path(DEFAULT_CONFIG_NAME)
    return local if local.is_file() else None


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    base: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """File, then env vars, then `overrides` (CLI flags, as {section: {key: value}}), validated together.

    `base` lies under the file: a running depthq up's settings (depthq.running), which count only
    where the file, the variables and the flags say nothing."""
    file = find_config_file(path)
    data: dict[str, Any] = {}
    if file is not None:
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {file} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {file} must hold sections (redis:, producer:, ...) at top level")
        data = loaded or {}
    if base:
        data = _merge({section: dict(keys) for section, keys in base.items()}, data)
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, {s: {k: v for k, v in kv.items() if v is not None} for s, kv in overrides.items()})
    source = f"{file}" if file else "defaults"
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source + " + DEPTHQ_* env vars + flags")) from None
    _check_folders(config)
    return config


def _check_folders(config: Config) -> None:
    """Outputs must never come back in as photos.

    With output.dir equal to producer.watch, or the watch folder inside the output folder, every
    preview would be a new photo: one generation per rescan (a.png.preview.png.preview.png...). An
    output folder inside the watch folder is fine: the watcher skips it.
    """
    watch, output = config.producer.watch.resolve(), config.output.dir.resolve()
    if watch == output:
        raise ConfigError(
            f"output.dir and producer.watch are the same folder ({watch}); outputs would come back in as "
            "photos. Point output.dir elsewhere, or at a folder inside producer.watch"
        )
    if watch.is_relative_to(output):
        raise ConfigError(
            f"producer.watch ({watch}) is inside output.dir ({output}); outputs would come back in as "
            "photos. Keep the watch folder out of the output folder"
        )


def ensure_folder(path: Path, key: str) -> Path:
    """Create a configured folder if it is missing; a file (or anything else) in its place names the key."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{key}: {path} exists and is not a folder; point {key} at a folder") from None
    except NotADirectoryError:
        raise ConfigError(f"{key}: {path} lies under a file, not a folder; point {key} at a folder") from None
    except PermissionError:
        raise ConfigError(
            f"{key}: cannot create {path} (permission denied); create it or point {key} elsewhere"
        ) from None
    return path
