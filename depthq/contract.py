"""The job contract between producer and worker: payload, job id, queue, and output file names.

Both sides import this module, so the names a producer checks for ("is this photo done?") are the
names a worker writes. Keep it free of numpy and friends: the producer imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from depthq.config import Config

# The only function a depthq worker will run. Jobs naming anything else are refused unrun.
JOB_FUNCTION = "worker.job.process"
# The only payload version a worker takes: at 0.x, producer and workers are upgraded together.
PAYLOAD_VERSION = 2
SERIALIZER = JSONSerializer

# Files every job writes; `output.formats` adds to these.
BASE_OUTPUTS = ("npy", "preview", "json")
OUTPUT_SUFFIXES = {
    "npy": ".depth.npy",
    "preview": ".preview.png",
    "json": ".json",
    "tiff": ".depth.tiff",
    "png16": ".depth.png",
    "ply": ".points.ply",
    "exr": ".depth.exr",
}
ERROR_SUFFIX = ".error.json"


class PayloadError(ValueError):
    """A job payload that does not follow the contract (hand-made, stale, or hostile)."""


def safe_relative(source: str) -> PurePosixPath:
    """Refuse absolute paths and `..`, so a payload can never point outside a root."""
    if not isinstance(source, str) or not source or "\x00" in source or "\\" in source:
        raise PayloadError(f"source {source!r} is not a relative POSIX path")
    rel = PurePosixPath(source)
    # Only the canonical spelling is accepted, so "a//b" or "./a" cannot alias another output.
    if rel.is_absolute() or ".." in rel.parts or rel.as_posix() != source:
        raise PayloadError(f"source {source!r} must be a plain relative path inside the watch root")
    return rel


@dataclass(frozen=True)
class JobPayload:
    """What a job carries. `source` is relative to the watch root; sizes in bytes, mtime in epoch seconds."""

    source: str
    size: int
    mtime: float
    sha256: str
    model: str
    outputs: list[str] = field(default_factory=lambda: list(BASE_OUTPUTS))
    # Set when this photo is a byte-identical copy of one whose depth is already in the store:
    # the worker copies that result instead of running the model again.
    same_as: str | None = None
    # The named root `source` is under (transport.roots maps it to a folder on each host).
    root: str = "inbox"
    # shared: the worker reads the photo from its mount of `root` and writes to output.dir.
    # redis: the photo's bytes are in Redis (photo_key), and the outputs go back through Redis.
    transport: str = "shared"
    # A video clip's job: which part of the clip (`depthq.clip_jobs.ClipPart`, checked by the worker);
    # None for a photo.
    clip: dict[str, Any] | None = None
    v: int = PAYLOAD_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> JobPayload:
        if not isinstance(data, dict):
            raise PayloadError(f"job payload must be a JSON object, got {type(data).__name__}")
        if data.get("v") != PAYLOAD_VERSION:
            raise PayloadError(
                f"job payload version {data.get('v')!r} is not {PAYLOAD_VERSION}; "
                "upgrade the worker or re-enqueue with this producer"
            )
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise PayloadError(f"job payload has unknown fields {sorted(unknown)}")
        try:
            payload = cls(**data)
        except TypeError as exc:
            raise PayloadError(f"job payload is incomplete: {exc}") from None
        safe_relative(payload.source)
        if payload.same_as is not None:
            safe_relative(payload.same_as)
        if payload.transport not in TRANSPORTS:
            raise PayloadError(f"job payload names transport {payload.transport!r}; known: {list(TRANSPORTS)}")
        if payload.transport == "redis" and payload.same_as is not None:
            raise PayloadError("job payload copies a stored result (same_as), which the redis transport has not")
        bad = [o for o in payload.outputs if o not in OUTPUT_SUFFIXES]
        if bad:
            raise PayloadError(f"job payload asks for unknown outputs {bad}; known: {sorted(OUTPUT_SUFFIXES)}")
        return payload


TRANSPORTS = ("shared", "redis")


def root_folder(config: Config, name: str) -> Path:
    """This host's folder for a named root: transport.roots, else producer.watch for the watched root."""
    folder = config.transport.roots.get(name)
    if folder is not None:
        return folder
    if name == config.transport.root:
        return config.producer.watch
    raise PayloadError(
        f"the job's photo is under root {name!r}, which this host does not map; "
        f"add transport.roots.{name}: <this host's mount of it> to its config"
    )


def short_hostname() -> str:
    """This machine's name as workers report it (and `depthq up` finds its own workers by)."""
    return socket.gethostname().split(".")[0] or "localhost"


def job_id(sha256: str, model: str) -> str:
    """Same photo content + same model = same job, so copies, repeated events and restarts dedupe."""
    model_tag = hashlib.sha256(model.encode("utf-8")).hexdigest()[:8]
    return f"{sha256[:32]}-{model_tag}"


def aliases_key(queue_name: str, jid: str) -> str:
    """Set of other sources with the same content that arrived while `jid` was pending."""
    return f"depthq:{queue_name}:aliases:{jid}"


def done_key(queue_name: str, jid: str) -> str:
    """Set by the worker when `jid`'s outputs are in the store; holds the source they were written for."""
    return f"depthq:{queue_name}:done:{jid}"


def photo_key(queue_name: str, jid: str) -> str:
    """redis transport: the photo's bytes, put by the producer, deleted once its result is collected."""
    return f"depthq:{queue_name}:photo:{jid}"


def result_key(queue_name: str, jid: str) -> str:
    """redis transport: a hash of the job's output files (kind -> bytes), put by the worker."""
    return f"depthq:{queue_name}:result:{jid}"


def results_stream(queue_name: str) -> str:
    """redis transport: one entry per result waiting for a collector (fields: job, source)."""
    return f"depthq:{queue_name}:results"


def inflight_key(queue_name: str) -> str:
    """redis transport: job id -> bytes it holds in Redis (photo, then result), until collected.

    The producer reads it to hold new photos back once Redis holds enough, which bounds its memory.
    """
    return f"depthq:{queue_name}:inflight"


def taking_key(queue_name: str, worker_name: str) -> str:
    """List of the job ids a worker took from the lanes and has not yet started (moved there by the same
    command that took them, so a worker stopped or killed in between loses none: `worker.dequeue`)."""
    return f"depthq:{queue_name}:taking:{worker_name}"


def taking_pattern(queue_name: str) -> str:
    """SCAN pattern for every worker's `taking_key`."""
    return f"depthq:{queue_name}:taking:*"


COLLECTOR_GROUP = "collectors"
# Output kinds a result carries zstd-compressed (raw float32 maps and points); the others are PNG,
# ZIP-compressed EXR or JSON, compressed already.
COMPRESSED_KINDS = frozenset({"npy", "tiff", "ply"})
# The hash field of a result that failed: its error record, written as <photo>.error.json.
ERROR_KIND = "error"


# Fields a depthq worker adds to rq's worker record (rq:worker:<name>), read back by `depthq status`.
WORKER_FIELDS = {"backend": "depthq_backend", "device": "depthq_device", "model": "depthq_model"}


# Conditions of the environment that hold every photo back, set by whoever meets them and shown by
# `depthq status` until they expire or clear: name -> what to tell the user.
ALERTS = ("output", "redis")


def alert_key(queue_name: str, name: str) -> str:
    """A condition that holds photos back (`ALERTS`), with what to do about it; expires if nobody renews it."""
    return f"depthq:{queue_name}:alert:{name}"


def watches_key(queue_name: str) -> str:
    """Hash: watcher host -> "<inotify watches> <folders>" at its last rescan, for `depthq status`."""
    return f"depthq:{queue_name}:watches"


def completions_key(queue_name: str) -> str:
    """Sorted set of recent completions, scored by end time, that `depthq status` summarizes."""
    return f"depthq:{queue_name}:completions"


# How far back `depthq status` looks; workers trim older completions as they add new ones.
COMPLETIONS_WINDOW_S = 3600


@dataclass(frozen=True)
class Completion:
    """One finished photo, as `depthq status` needs it. Times in seconds; `ended_at` is epoch seconds."""

    job_id: str
    host: str
    backend: str
    ended_at: float
    queue_wait_s: float
    total_s: float

    def member(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_member(cls, raw: bytes | str) -> Completion:
        return cls(**json.loads(raw))


def record_completion(pipe: Any, queue_name: str, completion: Completion) -> None:
    """Add to the window and drop what fell out of it, so the set stays bounded by an hour's throughput."""
    key = completions_key(queue_name)
    pipe.zadd(key, {completion.member(): completion.ended_at})
    pipe.zremrangebyscore(key, "-inf", completion.ended_at - COMPLETIONS_WINDOW_S)
    pipe.expire(key, COMPLETIONS_WINDOW_S)


def error_record(
    source: str, job_id: str, kind: str, message: str, stamp: dict[str, int] | None = None
) -> dict[str, Any]:
    """`<photo>.error.json`: what went wrong with which photo, as the job, the producer (refusals) and
    the collector (results it cannot write) all record it. `stamp` is the photo's `source_stamp`, which
    makes the error "done" for exactly this version of the photo."""
    record: dict[str, Any] = {
        "source": source,
        "job_id": job_id,
        "error": {"type": kind, "message": message},
        "created_at": datetime.now(UTC).isoformat(),
    }
    if stamp is not None:
        record["source_stat"] = stamp
    return record


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def requested_outputs(config: Config) -> list[str]:
    return [*BASE_OUTPUTS, *(f for f in config.output.formats if f not in BASE_OUTPUTS)]


# A file name's limit: 255 bytes on Linux (ext4, xfs, btrfs, tmpfs), 255 UTF-8 bytes on APFS and SMB.
NAME_MAX = 255
# What a temporary name adds to its output's name: "." + "." + 8 random characters + ".tmp" (depthq.files).
TEMP_NAME_OVERHEAD = 14
_LONGEST_SUFFIX = max(len(s.encode()) for s in (*OUTPUT_SUFFIXES.values(), ERROR_SUFFIX))
# The longest photo name (UTF-8 bytes) whose outputs, and their temporary names, keep it whole: 229.
MAX_KEPT_NAME = NAME_MAX - _LONGEST_SUFFIX - TEMP_NAME_OVERHEAD
_NAME_HASH_CHARS = 16
_MAX_KEPT_EXTENSION = 16


def output_base(name: str) -> str:
    """What a photo's output names start with: its full name, as long as that leaves room for the
    longest suffix and a temporary name within NAME_MAX. A longer name (230 to 255 bytes, which the
    photo's own filesystem took) is shortened the same way on every host: its start, cut at a
    character, then `~`, 16 hex digits of the full name's SHA-256, then its extension
    (`<start>~1f3a...9c.jpg.json`). The sidecar's `source` names the photo in full.
    """
    if len(name) * 4 <= MAX_KEPT_NAME:  # no name of this many characters is too long in UTF-8
        return name
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_KEPT_NAME:
        return name
    dot = raw.rfind(b".")
    extension = raw[dot:] if dot > 0 and len(raw) - dot <= _MAX_KEPT_EXTENSION else b""
    tail = b"~" + hashlib.sha256(raw).hexdigest()[:_NAME_HASH_CHARS].encode() + extension
    room = MAX_KEPT_NAME - len(tail)
    while room > 0 and raw[room] & 0xC0 == 0x80:  # never cut a character in two
        room -= 1
    return (raw[:room] + tail).decode("utf-8", "surrogateescape")


def output_name(name: str, kind: str) -> str:
    """The file name of one output of the photo called `name` (no folder): see `output_path`."""
    suffix = ERROR_SUFFIX if kind == "error" else OUTPUT_SUFFIXES[kind]
    return output_base(name) + suffix


def output_path(output_root: Path, source: str, kind: str) -> Path:
    """`<output>/<rel dir>/<full input name><suffix>`: IMG_1.HEIC gives IMG_1.HEIC.json (a name too long
    for that keeps a shortened form, `output_base`)."""
    rel = safe_relative(source)
    return output_root.joinpath(*rel.parts[:-1], output_name(rel.name, kind))


# A photo's stamp as a sidecar or an error file records it: {size, mtime}.
Stamp = dict[str, int]


def recorded_stamp(record: Any) -> Stamp | None:
    """The `source_stat` a sidecar or an error file records: which version of the photo it is for."""
    stamp = record.get("source_stat") if isinstance(record, dict) else None
    return stamp if isinstance(stamp, dict) else None


def source_stamp(st: os.stat_result) -> Stamp:
    """What a sidecar records of the photo it describes. Whole seconds, because shares (SMB, NFS)
    report mtimes at different precisions on different hosts."""
    return {"size": st.st_size, "mtime": int(st.st_mtime)}


def finished_kind(output_root: Path, source: str, st: os.stat_result) -> str | None:
    """ "json" or "error" when the sidecar or error file records exactly this file (same size and
    mtime): done, successfully or with a recorded error. None when it is not done.

    Comparing the recorded stamp, not "output newer than photo", catches a photo replaced by another
    that keeps an older mtime (cp -p, rsync, Finder).
    """
    stamp = source_stamp(st)
    for kind in ("json", "error"):
        try:
            recorded = recorded_stamp(json.loads(output_path(output_root, source, kind).read_bytes()))
        except (OSError, ValueError):
            continue
        if recorded == stamp:
            return kind
    return None


def is_finished(output_root: Path, source: str, st: os.stat_result) -> bool:
    return finished_kind(output_root, source, st) is not None


# Photos seen by an event go to the live queue (`queue.name`); what a start-up scan or a rescan finds
# (a first import, an archive, events the kernel dropped) goes to the backfill queue. Workers take the
# live queue first, so a photo dropped during a 100k-photo import waits for a few jobs, not the import.
Lane = Literal["live", "backfill"]
LANES: tuple[Lane, ...] = ("live", "backfill")


def lane_queue_name(queue_name: str, lane: Lane) -> str:
    return queue_name if lane == "live" else f"{queue_name}-backfill"


def make_queue(connection: Redis, config: Config, lane: Lane = "live") -> Queue:
    return Queue(
        lane_queue_name(config.queue.name, lane),
        connection=connection,
        serializer=SERIALIZER,
        default_timeout=config.queue.job_timeout_s,
    )


def make_queues(connection: Redis, config: Config) -> list[Queue]:
    """Both lanes, live first: the order a worker takes them in."""
    return [make_queue(connection, config, lane) for lane in LANES]


def recent_key(queue_name: str) -> str:
    """List of the newest outputs, newest first, capped at RECENT_MAX: what the gallery shows without
    listing an output tree of a million files."""
    return f"depthq:{queue_name}:recent"


RECENT_MAX = 1000


def record_recent(pipe: Any, queue_name: str, source: str) -> None:
    """One more photo with a new result or error file (a photo may appear more than once)."""
    pipe.lpush(recent_key(queue_name), source)
    pipe.ltrim(recent_key(queue_name), 0, RECENT_MAX - 1)
