"""`depthq audit`: for a folder left alone for a month, what is not as it should be, and why.

It reads what the rescan reads (the watched folder, the output folder, the photo index) and asks Redis
about each photo without a result, then reports, for every eligible photo, one of:
- **done** or **errors**: its sidecar (or error file) records this very size and mtime;
- **stale**: a sidecar or error file records another version, and no job is pending for this one;
- **queued**, **running**, **retrying**, **collecting** (in flight) or **failed** (a failed job and no
  error file): the state of the job that will give it a result;
- **lost**: no result, and no job that will make one;

so these add up to `photos`. On top of that: **partial** (a result with data files missing, or data
files with no sidecar and no pending job), **both** (a sidecar and an error file), **orphans**
(outputs of photos that are gone), **temporary** (temporary files in the output tree, and clips'
staging folders no pending job may write to), **queued_nowhere** (jobs queued in no lane and taken by
no worker: lost too) and **duplicated** (a job id twice in the lanes, or a photo with two pending jobs).

A video clip (`depthq.clip_jobs`) counts among the photos. Its result is its sidecar, its `<clip>.depth/`
folder and its preview (partial without either), and its state is its assemble job's, found by the
clip's own ids (`clip_job_base`: content, model and name) rather than a photo's; while the assemble
waits, deferred and in no lane, for the clip's chunk jobs, the clip is running, retrying or queued by
the chunks nearest a result. The hidden folder its chunks stage frames in says nothing while a job of
the clip is pending; left behind, it is temporary.

What it costs, like the rescan: per folder, a listing of it and of its output folder (every one: the
audit must see data files, not only sidecars) and one index query; per photo, a stat. A sidecar is
read only where the index does not know the photo (or `--hash` asks). Only a photo with no result is
hashed, and only when the job the index names for its version is not pending. Redis is read in
bulk, once, before the walk: every job's status (SCAN, then HMGET in pipelined batches), each lane and
each taking list (LRANGE); only what then looks lost or queued nowhere is looked up again, fresh, at
the end (the audit runs beside a live service). A clip's deferred assemble adds its dependency set
(SMEMBERS); a staging folder that looks left behind, one more SCAN of the jobs, for all of them at once.
A clip's depth folder is seen in its output folder's listing, never listed itself.

It changes nothing unless asked (`repair`): then lost and stale photos go to the backfill lane by the
rescan's path, a job queued nowhere goes back onto its lane, and temporary files and staging folders
older than any job are removed (a staging folder only while no job of its clip is pending, looked at
again after the enqueueing: a lost clip made again keeps the chunks it staged). Outputs, orphans and
error files are never deleted; the index, the running watcher's, is only read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rich.console import Console
from rich.table import Table
from rq.exceptions import NoSuchJobError
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job, JobStatus

from depthq.clip_jobs import (
    assemble_job_id,
    clip_job_base,
    is_clip_job,
    is_staging_name,
    source_tag,
    staging_key,
    staging_parts,
)
from depthq.clip_sidecar import DEPTH_FOLDER_SUFFIX, PREVIEW_SUFFIX, ClipSidecar
from depthq.config import Config, ConfigError
from depthq.contract import (
    ERROR_SUFFIX,
    LANES,
    OUTPUT_SUFFIXES,
    SERIALIZER,
    aliases_key,
    file_sha256,
    job_id,
    make_queue,
    output_base,
    output_path,
    recorded_stamp,
    result_key,
    source_stamp,
    taking_pattern,
)
from depthq.files import is_temp_name, remove_stale_temps_in, stale_temp_age_s
from depthq.sidecar import Sidecar
from producer.enqueue import Enqueuer, SourceError, Submitted
from producer.index import INDEX_FILES, PhotoIndex
from producer.readiness import Eligibility, clip_extensions
from producer.scan import sort_entries
from producer.sending import sender_for

# Every kind the audit counts, in the order it reports them.
KINDS = (
    "done",
    "errors",
    "lost",
    "queued",
    "running",
    "retrying",
    "failed",
    "collecting",
    "orphans",
    "stale",
    "partial",
    "both",
    "temporary",
    "queued_nowhere",
    "duplicated",
)
# Any of these makes the audit fail (exit 1). In flight, failed (the user's to retry), orphans and
# temporary files do not.
FAILING = ("lost", "queued_nowhere", "stale", "partial", "both", "duplicated")
IN_FLIGHT = frozenset({"queued", "running", "retrying", "collecting"})
_STATE_OF_STATUS = {
    JobStatus.QUEUED.value: "queued",
    JobStatus.DEFERRED.value: "queued",
    JobStatus.STARTED.value: "running",
    JobStatus.SCHEDULED.value: "retrying",  # waiting out a back-off, a full output disk included
    JobStatus.FAILED.value: "failed",
}  # finished, stopped, canceled: over, and no result for this photo
_PENDING_STATUSES = frozenset({JobStatus.QUEUED.value, JobStatus.STARTED.value, JobStatus.SCHEDULED.value})
# A clip's assemble job waits for its chunks in rq's deferred status, in no lane: pending all the same.
_CLIP_PENDING_STATUSES = _PENDING_STATUSES | {JobStatus.DEFERRED.value}
# When two jobs speak for one photo, the one nearest a result.
_RANK = {"collecting": 5, "running": 4, "retrying": 3, "queued": 2, "failed": 1, "lost": 0}
# Photos whose jobs are looked up in one Redis round trip; rq jobs read per round trip.
_BATCH = 2000
_JOB_PREFIX = Job.redis_job_namespace_prefix
_DATA_KINDS = tuple(kind for kind in OUTPUT_SUFFIXES if kind != "json")
_ALL_SUFFIXES = (*OUTPUT_SUFFIXES.values(), ERROR_SUFFIX)
# What every clip's result has beside its sidecar: the folder of depth files and the preview.
_CLIP_DATA = {"depth": DEPTH_FOLDER_SUFFIX, "preview": PREVIEW_SUFFIX}
_CLIP_SUFFIXES = (OUTPUT_SUFFIXES["json"], ERROR_SUFFIX, *_CLIP_DATA.values())
# An output name's suffixes by its last extension, longest first: ".png" may be a preview or a png16.
_SUFFIXES_BY_EXTENSION: dict[str, list[str]] = {}
for _suffix in sorted({*_ALL_SUFFIXES, *_CLIP_SUFFIXES}, key=len, reverse=True):
    _SUFFIXES_BY_EXTENSION.setdefault(_suffix[_suffix.rfind(".") :], []).append(_suffix)
# `output_base`'s shortened form of a long name: `<start>~<16 hex digits><extension>`.
_SHORTENED = re.compile(r"~[0-9a-f]{16}(\.[^.]{1,15})?$")
# A temporary name is `.<output name>.<8 characters>.tmp` (depthq.files).
_TEMP_TAIL = len(".12345678.tmp")


@dataclass
class _Unfinished:
    """A photo with no result for its current version, until Redis says what will become of it."""

    source: str
    path: str
    st: os.stat_result
    # The job the index says this very version was given.
    given: str | None
    # What the sidecar or error file there records instead, when there is one.
    stale: dict[str, Any] | None = None
    # Data files of the photo in the listing, with neither sidecar nor error file.
    data_files: list[str] = field(default_factory=list)
    # --hash found another sha256 than the sidecar's: the enqueuer needs `force` to see it.
    force: bool = False
    sha256: str | None = None
    # A video clip: its jobs are an assemble job and its chunks (`depthq.clip_jobs`), not a photo's.
    clip: bool = False
    state: str = "lost"
    job: str | None = None
    lane: str | None = None
    why: str = ""
    # A clip whose assemble waits for its chunks: how many chunk jobs are in each rq status.
    chunks: dict[str, int] | None = None


@dataclass(frozen=True)
class _Staging:
    """A clip's staging folder (`depthq.clip_jobs.staging_folder`) that no pending job may write to."""

    path: str
    # Relative to the output folder, as the report shows it.
    file: str
    source: str
    # What the clip's jobs say of it (`staging_key`): its content's sha256 to 12 hex digits, and its
    # name's tag, None where a shortened output name hides the name (the clip is gone).
    sha12: str
    tag: str | None


@dataclass
class AuditReport:
    """What `audit` found: counts of every kind, the first `limit` of each, and what `repair` needs."""

    watch: str
    output: str
    limit: int
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("photos", *KINDS), 0))
    items: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: float = 0.0
    folders: int = 0
    sidecars_read: int = 0
    hashed: int = 0
    index: bool = False
    hash_checked: bool = False
    repair: dict[str, Any] | None = None
    # For `repair`: every lost and stale photo, every job queued nowhere (id -> lane queue name), every
    # temporary file (folder -> names), and every staging folder no pending job may write to.
    to_enqueue: list[_Unfinished] = field(default_factory=list, repr=False)
    nowhere: dict[str, str] = field(default_factory=dict, repr=False)
    temporary: dict[str, list[str]] = field(default_factory=dict, repr=False)
    staging: list[_Staging] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return not any(self.counts[kind] for kind in FAILING)

    def add(self, kind: str, item: dict[str, Any]) -> None:
        self.counts[kind] += 1
        if self.counts[kind] <= self.limit:
            self.items.setdefault(kind, []).append(item)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok,
            "counts": dict(self.counts),
            "items": {kind: self.items[kind] for kind in KINDS if self.items.get(kind)},
            "seconds": round(self.seconds, 3),
            "watch": self.watch,
            "output": self.output,
            "folders": self.folders,
            "sidecars_read": self.sidecars_read,
            "hashed": self.hashed,
            "index": self.index,
            "hash_checked": self.hash_checked,
        }
        if self.repair is not None:
            out["repair"] = self.repair
        return out


def _read_json(path: str) -> tuple[bool, dict[str, Any] | None]:
    """(whether there was a file to read, its JSON object or None)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return False, None
    try:
        data = json.loads(raw)
    except ValueError:
        return True, None
    return True, data if isinstance(data, dict) else None


def _stamp(st: os.stat_result) -> dict[str, int]:
    return source_stamp(st)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _unread_job(source: str, st: os.stat_result) -> str:
    """The job id `Enqueuer._refusal` gives a photo it must not read (keyed by name and version)."""
    return "unread-" + hashlib.sha256(f"{source}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:32]


def _copy_job(jid: str, source: str) -> str:
    """The id `Enqueuer._own_job` gives a copy of content whose job is another photo's."""
    return f"{jid}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"


def _job_ids(connection: Redis) -> Iterator[str]:
    """Every rq job's id in Redis, by SCAN (rq:job:<id>:dependents and the like are no jobs)."""
    for key in connection.scan_iter(match=_JOB_PREFIX + "*", count=1000):
        jid = key.decode("utf-8", "replace")[len(_JOB_PREFIX) :]
        if ":" not in jid:
            yield jid


def _in_use(keys: set[tuple[str, str]], staging: _Staging) -> bool:
    """Whether a pending clip job (its `staging_key` in `keys`) may still write to this staging folder."""
    if staging.tag is None:
        return any(sha12 == staging.sha12 for sha12, _ in keys)
    return (staging.sha12, staging.tag) in keys


def _pending_staging_keys(connection: Redis, lanes: Iterable[str]) -> set[tuple[str, str]]:
    """The staging folders that a clip job pending now in one of our lanes may write to, as
    `staging_key`s: one SCAN of the job keys and a status per clip job. Asked only where a staging
    folder looks left behind, so a clip in flight costs nothing more."""
    ours = set(lanes)
    ids = [jid for jid in _job_ids(connection) if is_clip_job(jid)]
    keys: set[tuple[str, str]] = set()
    for batch in _chunks(ids, _BATCH):
        with connection.pipeline(transaction=False) as pipe:
            for jid in batch:
                pipe.hmget(Job.key_for(jid), "status", "origin")
            replies = pipe.execute(raise_on_error=False)
        for jid, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                continue
            status, origin = (_text(v) for v in reply)
            key = staging_key(jid)
            if status in _CLIP_PENDING_STATUSES and origin in ours and key is not None:
                keys.add(key)
    return keys


class Auditor:
    """One audit of the watched folder against the output folder, the index and Redis."""

    def __init__(
        self, config: Config, connection: Redis, limit: int = 10, check_hash: bool = False, use_index: bool = True
    ):
        self.config = config
        self.connection = connection
        self.root = config.producer.watch.resolve()
        self.output_root = config.output.dir.resolve()
        self.check_hash = check_hash
        self.use_index = use_index
        self.eligible = Eligibility.of(config)
        self.name = config.queue.name
        self.model = config.model.path
        # Whether a finished job's result can be waiting in Redis for the collector: then it is looked for too.
        self.collected = sender_for(config, connection).collected
        # What every result has beside its sidecar. Not `output.formats`: a format added later is written
        # for new photos only, so an older result without it is complete for what it was asked.
        self.required = {kind: OUTPUT_SUFFIXES[kind] for kind in ("npy", "preview")}
        self.photo_data = {kind: OUTPUT_SUFFIXES[kind] for kind in _DATA_KINDS}
        # The clips the producer takes now (their jobs are a clip's), and every clip extension, taken or
        # not, by which a clip's outputs are told apart (still theirs where clips are no longer taken).
        self.clip_extensions = frozenset(clip_extensions(config))
        self.video_extensions = frozenset(e.lower().lstrip(".") for e in config.video.extensions)
        self.lanes = {make_queue(connection, config, lane).name: lane for lane in LANES}
        self.stale_temp_s = stale_temp_age_s(config.queue.job_timeout_s)
        self.report = AuditReport(str(self.root), str(self.output_root), limit)
        self._waiting: list[_Unfinished] = []
        # Every depthq job as the snapshot before the walk found it, and every list a job waits in.
        self._known: dict[str, tuple[str | None, str | None, str | None, bool]] = {}
        self._listed: dict[str, list[str]] = {}
        # Staging folders that pending clip jobs may write to, as the snapshot has them; and the staging
        # folders that then looked left behind, looked at again, fresh, at the end.
        self._staging_keys: set[tuple[str, str]] = set()
        self._staging_suspects: list[_Staging] = []
        self._now = time.time()

    # --- the walk --------------------------------------------------------------------------------

    def run(self) -> AuditReport:
        started = time.monotonic()
        if not self.root.is_dir():
            raise ConfigError(f"producer.watch: {self.root} is not a folder (not mounted?); nothing to audit")
        self._snapshot()
        index = PhotoIndex.open_reader(self.output_root) if self.use_index else None
        self.report.index = index is not None
        self.report.hash_checked = self.check_hash
        try:
            self._walk(index)
        finally:
            if index is not None:
                index.close()
        self._resolve_waiting()
        self._recheck()
        self._staging_left()
        self._jobs()
        self._error_details()
        self.report.seconds = time.monotonic() - started
        return self.report

    def _walk(self, index: PhotoIndex | None) -> None:
        stack: list[tuple[str, str]] = [(str(self.root), "")]
        exclude = str(self.output_root)
        while stack:
            path, rel = stack.pop()
            try:
                with os.scandir(path) as it:
                    entries = list(it)
            except OSError:
                continue
            self.report.folders += 1
            photos, subfolders = sort_entries(entries, rel, self.eligible, exclude)  # the rescan's rules
            photos.sort()
            stack.extend(reversed(subfolders))
            known = index.folder(rel) if index is not None else ({}, {}, None)
            watched = {p.rsplit("/", 1)[-1] for _, p in subfolders}
            self._folder(path, rel, photos, known[0], known[1], watched)
            if len(self._waiting) >= _BATCH:
                self._resolve_waiting()

    @staticmethod
    def _list_output(out_dir: str) -> set[str]:
        """An output folder's names (files and folders); none when it does not exist."""
        try:
            return set(os.listdir(out_dir))
        except OSError:
            return set()

    def _folder(
        self,
        path: str,
        rel: str,
        photos: list[tuple[str, os.stat_result]],
        done: dict[str, tuple[int, int, str]],
        queued: dict[str, Any],
        watched: set[str],
    ) -> None:
        report = self.report
        report.counts["photos"] += len(photos)
        prefix = f"{rel}/" if rel else ""
        out_dir = os.path.join(self.output_root, rel) if rel else str(self.output_root)
        names = self._list_output(out_dir)
        bases: dict[str, str] = {}
        outputs: set[str] = set()
        json_suffix = OUTPUT_SUFFIXES["json"]
        for name, st in photos:
            base = output_base(name)
            bases[base] = name
            clip = self._is_clip(name)
            outputs.update(base + suffix for suffix in (_CLIP_SUFFIXES if clip else _ALL_SUFFIXES))
            has_json, has_error = base + json_suffix in names, base + ERROR_SUFFIX in names
            size, mtime = st.st_size, int(st.st_mtime)
            kind: str | None = None
            sidecar: dict[str, Any] | None = None
            recorded: dict[str, Any] = {}
            row = done.get(name)
            if (
                row is not None
                and row[0] == size
                and row[1] == mtime
                and base + (json_suffix if row[2] == "json" else ERROR_SUFFIX) in names
            ):
                kind = row[2]  # the index's word, its file still listed: no read
            elif has_json or has_error:
                now = {"size": size, "mtime": mtime}
                if has_json:
                    sidecar = self._read(os.path.join(out_dir, base + json_suffix))
                    recorded["json"] = recorded_stamp(sidecar)
                    if recorded["json"] == now:
                        kind = "json"
                if kind is None and has_error:
                    error = self._read(os.path.join(out_dir, base + ERROR_SUFFIX))
                    recorded["error"] = recorded_stamp(error)
                    if recorded["error"] == now:
                        kind = "error"
            source = prefix + name
            if has_json and has_error:
                current = {"json": "the sidecar", "error": "the error file"}.get(kind or "", "neither")
                report.add("both", {"source": source, "records_this_version": current})
            if kind == "json" and self.check_hash:
                if sidecar is None:
                    sidecar = self._read(os.path.join(out_dir, base + json_suffix))
                said = (ClipSidecar if clip else Sidecar).from_dict(sidecar, source=prefix + name)
                photo = self._hash(os.path.join(path, name))
                if photo is not None and said is not None and said.sha256 and said.sha256 != photo:
                    stale = {
                        "file": "json",
                        "recorded": said.source_stat,
                        "now": _stamp(st),
                        "sha256_recorded": said.sha256,
                        "sha256_now": photo,
                    }
                    self._wait(
                        _Unfinished(
                            source, os.path.join(path, name), st, None, stale, force=True, sha256=photo, clip=clip
                        )
                    )
                    continue
            if kind == "json":
                report.counts["done"] += 1
                required = _CLIP_DATA if clip else self.required
                missing = [k for k, suffix in required.items() if base + suffix not in names]
                if missing:
                    report.add("partial", {"source": source, "missing": missing, "state": "done"})
                if report.counts["done"] <= report.limit:
                    report.items.setdefault("done", []).append({"source": source})
                continue
            if kind == "error":
                report.add("errors", {"source": source, "file": prefix + base + ERROR_SUFFIX})
                continue
            given = queued.get(name)
            unfinished = _Unfinished(
                source,
                os.path.join(path, name),
                st,
                given.job_id if given is not None and (given.size, given.mtime_ns) == (size, st.st_mtime_ns) else None,
                clip=clip,
            )
            if recorded:
                which = "json" if "json" in recorded else "error"
                unfinished.stale = {"file": which, "recorded": recorded[which], "now": _stamp(st)}
            else:
                data = _CLIP_DATA if clip else self.photo_data
                unfinished.data_files = [k for k, suffix in data.items() if base + suffix in names]
            self._wait(unfinished)
        # What is neither an output of a photo here nor the output folder of a watched folder.
        rest = names - outputs - watched - INDEX_FILES
        if rest:
            self._leftovers(out_dir, prefix, rest, bases, folder_exists=True)

    def _is_clip(self, name: str) -> bool:
        """Whether a file the walk found is a clip the producer takes (`Enqueuer.is_clip`'s rule)."""
        dot = name.rfind(".")
        return dot >= 0 and name[dot + 1 :].lower() in self.clip_extensions

    def _is_depth_folder(self, name: str) -> bool:
        """Whether a folder in the output tree is a clip's `<clip>.depth/`, by its name."""
        if not name.endswith(DEPTH_FOLDER_SUFFIX):
            return False
        clip = name[: -len(DEPTH_FOLDER_SUFFIX)]
        dot = clip.rfind(".")
        return dot >= 0 and clip[dot + 1 :].lower() in self.video_extensions

    def _orphan_tree(self, out_dir: str, rel: str) -> None:
        """An output folder whose watched folder is gone (or is not watched): all of it is orphaned."""
        if out_dir == str(self.root):
            return  # the watched folder inside the output folder: its photos are not outputs
        self._leftovers(out_dir, f"{rel}/", self._list_output(out_dir), {}, folder_exists=False)

    def _leftovers(
        self, out_dir: str, prefix: str, names: set[str], bases: dict[str, str], folder_exists: bool
    ) -> None:
        """Temporary files, clips' staging folders, orphaned folders, and outputs of no photo present,
        grouped by the photo they were for (a clip's depth folder with its other outputs)."""
        groups: dict[str, list[str]] = {}
        for name in sorted(names):
            path = os.path.join(out_dir, name)
            if is_staging_name(name) and self._staging(out_dir, prefix, name, bases):
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                if self._is_depth_folder(name):
                    groups.setdefault(name[: -len(DEPTH_FOLDER_SUFFIX)], []).append(name + "/")
                else:
                    self._orphan_tree(path, prefix + name)
                continue
            if is_temp_name(name):
                self._temporary(out_dir, prefix, name, bases)
                continue
            suffix = next((x for x in _SUFFIXES_BY_EXTENSION.get(name[name.rfind(".") :], ()) if name.endswith(x)), "")
            groups.setdefault(name[: -len(suffix)] if suffix else name, []).append(name)
        for base, files in sorted(groups.items()):
            source = prefix + base
            if _SHORTENED.search(base):
                for suffix in (OUTPUT_SUFFIXES["json"], ERROR_SUFFIX):
                    if base + suffix in files:
                        named = self._read(os.path.join(out_dir, base + suffix))
                        if named is not None and isinstance(named.get("source"), str):
                            source = named["source"]
                            break
            self.report.add("orphans", {"source": source, "files": sorted(files), "folder_gone": not folder_exists})

    def _temporary(self, out_dir: str, prefix: str, name: str, bases: dict[str, str]) -> None:
        path = os.path.join(out_dir, name)
        try:
            age = self._now - os.stat(path).st_mtime
        except OSError:
            return  # renamed into place or removed by its writer meanwhile
        output = name[1:-_TEMP_TAIL]
        photo = output
        for suffix in _SUFFIXES_BY_EXTENSION.get(output[output.rfind(".") :], ()):
            if output.endswith(suffix):
                photo = bases.get(output[: -len(suffix)], output[: -len(suffix)])
                break
        self.report.temporary.setdefault(out_dir, []).append(name)
        self.report.add(
            "temporary",
            {
                "source": prefix + photo,
                "file": prefix + name,
                "age_s": round(age, 1),
                "removable": age >= self.stale_temp_s,
            },
        )

    def _staging(self, out_dir: str, prefix: str, name: str, bases: dict[str, str]) -> bool:
        """A clip's staging folder: nothing to say while a pending job of the clip may write to it (as
        the snapshot has the jobs); else held for a fresh look at the end. False for a name that only
        looks like one."""
        parts = staging_parts(name)
        if parts is None:
            return False
        base, sha12 = parts
        clip = bases.get(base)
        if clip is None and _SHORTENED.search(base):
            source, tag = prefix + base, None  # a long name's clip that is gone: its name is unknown
        else:
            source = prefix + (clip if clip is not None else base)
            tag = source_tag(source)
        staging = _Staging(os.path.join(out_dir, name), prefix + name + "/", source, sha12, tag)
        if not _in_use(self._staging_keys, staging):
            self._staging_suspects.append(staging)
        return True

    def _staging_left(self) -> None:
        """Staging folders that looked left behind, again, now that the walk is over: a clip's jobs
        may have been made meanwhile. Those that no pending job may write to are temporary: the
        assemble that removes one died after it, or never ran (the clip is gone or lost). Removable,
        as a temporary file is, once older than any job could run."""
        suspects, self._staging_suspects = self._staging_suspects, []
        if not suspects:
            return
        in_use = _pending_staging_keys(self.connection, self.lanes)
        for staging in suspects:
            if _in_use(in_use, staging):
                continue
            try:
                age = self._now - os.stat(staging.path).st_mtime
            except OSError:
                continue  # removed by its assemble meanwhile
            self.report.staging.append(staging)
            self.report.add(
                "temporary",
                {
                    "source": staging.source,
                    "file": staging.file,
                    "age_s": round(age, 1),
                    "removable": age >= self.stale_temp_s,
                    "staging": True,
                },
            )

    def _read(self, path: str) -> dict[str, Any] | None:
        found, data = _read_json(path)
        self.report.sidecars_read += found
        return data

    def _hash(self, path: str) -> str | None:
        try:
            sha = file_sha256(Path(path))
        except OSError:
            return None
        self.report.hashed += 1
        return sha

    def _wait(self, unfinished: _Unfinished) -> None:
        self._waiting.append(unfinished)

    # --- what Redis says of the photos without a result ----------------------------------------

    def _snapshot(self) -> None:
        """Every depthq job's status, origin and photo, read once before the walk (SCAN, then HMGET in
        pipelined batches), and then every list a job waits in. A photo's job found pending here and
        its result not yet there when the walk reaches it is in flight still (a worker writes the
        sidecar before the job is over); what looks lost is looked at again, fresh, at the end."""
        ids = list(_job_ids(self.connection))
        known: dict[str, tuple[str | None, str | None, str | None, bool]] = {}
        for batch in _chunks(ids, _BATCH):
            with self.connection.pipeline(transaction=False) as pipe:
                for jid in batch:
                    pipe.hmget(Job.key_for(jid), "status", "origin", "description")
                replies = pipe.execute(raise_on_error=False)
            for jid, reply in zip(batch, replies, strict=True):
                if isinstance(reply, Exception) or reply[0] is None:
                    continue  # not a job's hash, or gone meanwhile
                status, origin, source = (_text(v) for v in reply)
                if origin in self.lanes:  # another rq queue's job on the same Redis is none of ours
                    known[jid] = (status, origin, source, False)
        if self.collected:
            prefix = result_key(self.name, "")
            for key in self.connection.scan_iter(match=result_key(self.name, "*"), count=1000):
                jid = key.decode("utf-8", "replace")[len(prefix) :]
                if jid in known:
                    known[jid] = (*known[jid][:3], True)
        self._known = known
        self._listed = self._lists()
        self._staging_keys = {
            key
            for jid, (status, *_) in known.items()
            if status in _CLIP_PENDING_STATUSES and (key := staging_key(jid)) is not None
        }

    def _from_snapshot(self, jids: Iterable[str]) -> dict[str, tuple[str | None, str | None, str | None, bool]]:
        return {jid: self._known[jid] for jid in jids if jid in self._known}

    def _look(self, jids: Iterable[str]) -> dict[str, tuple[str | None, str | None, str | None, bool]]:
        """Job id -> (status, origin, source, result waiting for the collector), now, in one round trip."""
        ids = list(dict.fromkeys(j for j in jids if j))
        if not ids:
            return {}
        with self.connection.pipeline(transaction=False) as pipe:
            for jid in ids:
                pipe.hmget(Job.key_for(jid), "status", "origin", "description")
                if self.collected:
                    pipe.exists(result_key(self.name, jid))
            replies = pipe.execute()
        step = 2 if self.collected else 1
        out = {}
        for i, jid in enumerate(ids):
            status, origin, source = (_text(v) for v in replies[i * step])
            out[jid] = (status, origin, source, bool(replies[i * step + 1]) if self.collected else False)
        return out

    def _judge(self, u: _Unfinished, jids: list[str], look: dict[str, Any], alias_of: str | None = None) -> bool:
        """Set the photo's state from the jobs that speak for it; True when one will give it a result."""
        best, best_job, best_lane = "lost", None, None
        u.why = ""
        for jid in jids:
            if jid not in look:
                continue
            status, origin, source, has_result = look[jid]
            if source != u.source and jid != alias_of:
                continue
            state = "collecting" if has_result else _STATE_OF_STATUS.get(status or "", "lost")
            if jid == alias_of and state not in IN_FLIGHT:
                continue  # an alias gets its result only from a job that is still to run
            if _RANK[state] > _RANK[best]:
                best, best_job, best_lane = state, jid, self.lanes.get(origin or "")
        u.state, u.job, u.lane = best, best_job, best_lane
        return best in IN_FLIGHT

    def _resolve_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for batch in _chunks(waiting, _BATCH):
            self._resolve(batch)
            for u in batch:
                self._settle(u)

    def _resolve(self, batch: list[_Unfinished], fresh: bool = False) -> None:
        """Each photo's state from its jobs: as the snapshot had them, or `fresh` from Redis."""
        clips = [u for u in batch if u.clip]
        if clips:
            self._resolve_clips(clips, fresh)
            batch = [u for u in batch if not u.clip]
        jobs = self._look if fresh else self._from_snapshot
        # First the job the index names for this very version: pending, it needs no hashing.
        look = jobs(u.given for u in batch if u.given)
        rest = [u for u in batch if not self._judge(u, [u.given] if u.given else [], look)]
        # Then by content (the photo's job, a copy's own job, or an alias on another photo's job), and
        # by name and version (the refusal job of a photo the producer would not read).
        hashed: list[tuple[_Unfinished, list[str], str]] = []
        for u in rest:
            if u.sha256 is None:
                u.sha256 = self._hash(u.path)
            jids = [u.given] if u.given else []
            jid = job_id(u.sha256, self.model) if u.sha256 is not None else ""
            jids += [_unread_job(u.source, u.st), *((jid, _copy_job(jid, u.source)) if jid else ())]
            hashed.append((u, jids, jid))
        if not hashed:
            return
        look.update(jobs(j for _, jids, _ in hashed for j in jids))
        # A copy that arrived while its content's job was pending for another photo is an alias of it.
        others = [
            (u, jid)
            for u, _, jid in hashed
            if jid in look and look[jid][2] != u.source and look[jid][0] in _PENDING_STATUSES
        ]
        aliased: set[int] = set()
        if others:
            with self.connection.pipeline(transaction=False) as pipe:
                for u, jid in others:
                    pipe.sismember(aliases_key(self.name, jid), u.source)
                aliased = {id(u) for (u, _), member in zip(others, pipe.execute(), strict=True) if member}
        for u, jids, jid in hashed:
            self._judge(u, jids, look, alias_of=jid if id(u) in aliased else None)
            if u.state == "lost" and u.job is None and jid:
                status, _, source, _ = look.get(jid, (None, None, None, False))
                u.job = jid
                if status is None:
                    u.why = "no job for this version"
                elif source == u.source:
                    u.why = f"its job is {status}, with no result for this version"
                else:
                    u.why = f"its content's job is {source}'s ({status})"
            elif u.state == "failed":
                u.why = "the job failed and left no error file"

    def _resolve_clips(self, batch: list[_Unfinished], fresh: bool) -> None:
        """Each clip's state from its jobs. A clip's job ids carry its name (`clip_job_base`): a copy
        is computed again, so no alias or copy job speaks for it. Its assemble job's id stands for the
        clip, as the index records it; the refusal of a clip the producer must not read is a photo's."""
        states = self._clip_states([u.given for u in batch if u.given], fresh)
        rest: list[_Unfinished] = []
        for u in batch:
            if u.given is not None and states[u.given][0] in IN_FLIGHT:
                self._judge_clip(u, [u.given], states, u.given)  # pending for this version: no hashing
            else:
                rest.append(u)
        wanted: dict[int, tuple[list[str], str | None]] = {}
        for u in rest:
            if u.sha256 is None:
                u.sha256 = self._hash(u.path)
            mine = assemble_job_id(clip_job_base(u.sha256, self.model, u.source)) if u.sha256 is not None else None
            jids = [j for j in (u.given, _unread_job(u.source, u.st), mine) if j]
            wanted[id(u)] = (jids, mine)
        states.update(self._clip_states([j for jids, _ in wanted.values() for j in jids if j not in states], fresh))
        for u in rest:
            jids, mine = wanted[id(u)]
            self._judge_clip(u, jids, states, mine or u.given)

    def _judge_clip(
        self,
        u: _Unfinished,
        jids: list[str],
        states: dict[str, tuple[str, str, str | None, dict[str, int] | None]],
        own: str | None,
    ) -> None:
        """The clip's state from the job nearest a result; lost, it names its own assemble job and why."""
        best: str | None = None
        for jid in jids:
            if best is None or _RANK[states[jid][0]] > _RANK[states[best][0]]:
                best = jid
        if best is not None and states[best][0] != "lost":
            u.state, why, origin, u.chunks = states[best]
            u.job, u.lane = best, self.lanes.get(origin or "")
            u.why = why if u.state == "failed" else ""
            return
        u.state, u.job, u.lane, u.chunks = "lost", own, None, None
        u.why = states[own][1] if own is not None and own in states else "its content could not be read"

    def _clip_states(
        self, jids: list[str], fresh: bool
    ) -> dict[str, tuple[str, str, str | None, dict[str, int] | None]]:
        """Job id -> (state, why, lane queue, chunk jobs by rq status) for a clip's jobs: as the
        snapshot had them, or `fresh`. An assemble job deferred waits for its chunks: the clip is
        running while one of them runs, and so on, by the chunks nearest a result; deferred with none
        of them pending, it will never run."""
        look = (self._look if fresh else self._from_snapshot)(jids)
        deferred = [jid for jid in dict.fromkeys(jids) if look.get(jid, (None,))[0] == JobStatus.DEFERRED.value]
        chunks: dict[str, list[str]] = {}
        if deferred:
            with self.connection.pipeline(transaction=False) as pipe:
                for jid in deferred:
                    pipe.smembers(Job(jid, connection=self.connection).dependencies_key)
                chunks = {
                    jid: sorted(v.decode() for v in members)
                    for jid, members in zip(deferred, pipe.execute(), strict=True)
                }
        of_chunks = (self._look if fresh else self._from_snapshot)(c for ids_ in chunks.values() for c in ids_)
        states: dict[str, tuple[str, str, str | None, dict[str, int] | None]] = {}
        for jid in jids:
            status, origin, _, _ = look.get(jid, (None, None, None, False))
            if jid in chunks:
                counted = Counter(of_chunks.get(c, (None,))[0] or "gone" for c in chunks[jid])
                pending = [_STATE_OF_STATUS[s] for s in counted if s in _PENDING_STATUSES]
                state = max(pending, key=_RANK.__getitem__) if pending else "lost"
                why = "its assemble job waits for chunk jobs none of which is pending: it will never run"
                states[jid] = (state, why, origin, dict(sorted(counted.items())))
            elif status is None:
                states[jid] = ("lost", "no job for this version", None, None)
            else:
                state = _STATE_OF_STATUS.get(status, "lost")
                why = (
                    "the job failed and left no error file"
                    if state == "failed"
                    else f"its job is {status}, with no result for this version"
                )
                states[jid] = (state, why, origin, None)
        return states

    def _settle(self, u: _Unfinished) -> None:
        """Count a resolved photo, or hold it for the re-check at the end (lost and stale ones)."""
        if u.state in IN_FLIGHT:
            item = {"source": u.source, "job_id": u.job, "lane": u.lane, "stale_output": u.stale is not None}
            if u.chunks is not None:
                item["chunks"] = u.chunks
            self.report.add(u.state, item)
            return
        if u.stale is not None or u.state == "lost":
            self.report.to_enqueue.append(u)
            return
        self.report.add("failed", {"source": u.source, "job_id": u.job, "lane": u.lane, "why": u.why})
        self._partial(u)

    def _partial(self, u: _Unfinished) -> None:
        if u.data_files:
            self.report.add("partial", {"source": u.source, "data_files": u.data_files, "state": u.state})

    def _recheck(self) -> None:
        """Lost and stale photos again, now that the walk is over: a result or a job may have come
        for one meanwhile (the audit runs beside a live service). Only those few are looked at twice."""
        suspects, self.report.to_enqueue = self.report.to_enqueue, []
        still: list[_Unfinished] = []
        for u in suspects:
            try:
                st = os.stat(u.path)
            except OSError:
                self.report.counts["photos"] -= 1  # gone meanwhile: no longer a photo
                continue
            if (st.st_size, st.st_mtime_ns) == (u.st.st_size, u.st.st_mtime_ns) and not u.force:
                kind = self._finished(u.source, st)
                if kind is not None:
                    self.report.counts["done" if kind == "json" else "errors"] += 1
                    continue
            still.append(u)
        for batch in _chunks(still, _BATCH):
            self._resolve(batch, fresh=True)
            for u in batch:
                if u.state in IN_FLIGHT or (u.state == "failed" and u.stale is None):
                    self._settle(u)
                    continue
                self.report.to_enqueue.append(u)
                if u.stale is not None:
                    self.report.add(
                        "stale", {"source": u.source, **u.stale, "state": u.state, "job_id": u.job, "why": u.why}
                    )
                else:
                    self.report.add("lost", {"source": u.source, "job_id": u.job, "why": u.why, "now": _stamp(u.st)})
                    self._partial(u)

    def _finished(self, source: str, st: os.stat_result) -> str | None:
        for kind in ("json", "error"):
            record = self._read(str(output_path(self.output_root, source, kind)))
            if recorded_stamp(record) == _stamp(st):
                return kind
        return None

    # --- the jobs themselves ----------------------------------------------------------------------

    def _lists(self) -> dict[str, list[str]]:
        """Every list a depthq job waits in: each lane, and what workers took and have not started
        (depthq's taking lists, and rq's own intermediate list of each lane)."""
        keys: list[str] = []
        for lane in LANES:
            key = make_queue(self.connection, self.config, lane).key
            keys += [key, IntermediateQueue.get_intermediate_queue_key(key)]
        keys += sorted(k.decode() for k in self.connection.scan_iter(match=taking_pattern(self.name), count=1000))
        with self.connection.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.lrange(key, 0, -1)
            replies = pipe.execute(raise_on_error=False)
        return {
            key: [v.decode() for v in reply]
            for key, reply in zip(keys, replies, strict=True)
            if not isinstance(reply, Exception)
        }

    def _jobs(self) -> None:
        """Queued jobs in no list, and jobs twice over, from the snapshot."""
        jobs, lists = self._known, self._listed
        listed = Counter(jid for ids_ in lists.values() for jid in ids_)
        suspects = [jid for jid, (status, *_) in jobs.items() if status == "queued" and jid not in listed]
        if suspects:
            # Statuses were read before the lists: a job may have moved on meanwhile. Look again.
            again = self._look(suspects)
            listed_now = {jid for ids_ in self._lists().values() for jid in ids_}
            suspects = [j for j in suspects if again[j][0] == "queued" and j not in listed_now]
        for jid in suspects:
            _, origin, source, _ = jobs[jid]
            self.report.nowhere[jid] = origin or ""
            self.report.add(
                "queued_nowhere",
                {"source": source, "job_id": jid, "lane": self.lanes.get(origin or ""), "queue": origin},
            )
        for item in self.report.items.get("queued", []):
            item["queued_nowhere"] = item["job_id"] in self.report.nowhere
        where: dict[str, list[str]] = {}
        for key, ids_ in lists.items():
            for jid in ids_:
                where.setdefault(jid, []).append(key)
        for jid, count in sorted(listed.items()):
            if count > 1:
                source = jobs[jid][2] if jid in jobs else None
                self.report.add("duplicated", {"source": source, "job_id": jid, "lists": where[jid]})
        # Two pending jobs for one photo's same content (a job id starts with the content's hash) would
        # compute it twice; for two contents (a photo rewritten while its old job waits) they would not:
        # the older one's result is dropped as superseded.
        pending: dict[tuple[str, str], list[str]] = {}
        for jid, (status, _, source, _) in jobs.items():
            if status in _PENDING_STATUSES and source is not None:
                pending.setdefault((source, jid.split("-", 1)[0]), []).append(jid)
        for (source, _), jids in sorted(pending.items()):
            if len(jids) > 1:
                self.report.add("duplicated", {"source": source, "job_ids": sorted(jids)})

    def _error_details(self) -> None:
        """What the error files shown say: read for the first few only."""
        for item in self.report.items.get("errors", []):
            record = self._read(os.path.join(self.output_root, item["file"])) or {}
            error = record.get("error") if isinstance(record.get("error"), dict) else {}
            item["error"] = f"{error.get('type', '?')}: {error.get('message', '')}".strip()


def audit(
    config: Config, connection: Redis, limit: int = 10, check_hash: bool = False, use_index: bool = True
) -> AuditReport:
    """Audit the watched folder, its outputs, the index and Redis (see the module's docstring)."""
    return Auditor(config, connection, limit, check_hash, use_index).run()


# --- repair ---------------------------------------------------------------------------------------

_ENQUEUE_BATCH = 500


def repair(config: Config, connection: Redis, report: AuditReport) -> dict[str, Any]:
    """Put right what can be put right without deleting anything of value: lost and stale photos
    through the rescan's path (backfill lane), jobs queued nowhere back onto their lane, temporary
    files and clips' staging folders older than any job could still be writing. Returns what it did."""
    started = time.monotonic()
    done: dict[str, Any] = {
        "enqueued": {},
        "requeued_jobs": [],
        "temporary_removed": 0,
        "temporary_left": 0,
        "staging_removed": 0,
        "staging_left": 0,
    }
    problems: list[str] = []
    older_than = stale_temp_age_s(config.queue.job_timeout_s)
    for folder, names in sorted(report.temporary.items()):
        removed, young = remove_stale_temps_in(Path(folder), names, older_than, time.time())
        done["temporary_removed"] += removed
        done["temporary_left"] += young
    queues = {make_queue(connection, config, lane).name: make_queue(connection, config, lane) for lane in LANES}
    for jid, origin in sorted(report.nowhere.items()):
        try:
            job = Job.fetch(jid, connection=connection, serializer=SERIALIZER)
            if job.get_status(refresh=False) != JobStatus.QUEUED:
                continue  # it moved on since the audit
            queues[origin].enqueue_job(job)
            done["requeued_jobs"].append(jid)
        except NoSuchJobError:
            continue
        except RedisError as exc:
            problems.append(f"job {jid}: {exc}")
    enqueuer = Enqueuer(config, connection, lane="backfill")
    outcomes: Counter[str] = Counter()

    def one(path: Path, force: bool = False) -> None:
        try:
            result = enqueuer.submit(path, force=force)
        except FileNotFoundError:
            outcomes["gone"] += 1
            return
        except (SourceError, OSError, RedisError) as exc:
            outcomes["not enqueued"] += 1
            problems.append(f"{path}: {exc}")
            return
        outcomes[result.outcome] += 1

    plain = [Path(u.path) for u in report.to_enqueue if not u.force]
    for chunk in (plain[i : i + _ENQUEUE_BATCH] for i in range(0, len(plain), _ENQUEUE_BATCH)):
        try:
            results: list[tuple[Path, Submitted | None]] = enqueuer.submit_many(chunk)
        except RedisError as exc:
            outcomes["not enqueued"] += len(chunk)
            problems.append(f"{len(chunk)} photo(s): {exc}")
            continue
        for path, result in results:
            if result is None:
                one(path)
            else:
                outcomes[result.outcome] += 1
    for u in report.to_enqueue:
        if u.force:
            one(Path(u.path), force=True)  # same size and mtime, other content: only --force sees it
    done["enqueued"] = dict(sorted(outcomes.items()))
    if report.staging:
        # After the enqueueing: a lost clip made again keeps the chunks it staged, and runs only the rest.
        removed, left = _remove_staging(connection, queues, report.staging, older_than, problems)
        done["staging_removed"], done["staging_left"] = removed, left
    done["errors"] = problems
    done["seconds"] = round(time.monotonic() - started, 3)
    report.repair = done
    return done


def _remove_staging(
    connection: Redis, queues: Iterable[str], staging: list[_Staging], older_than: float, problems: list[str]
) -> tuple[int, int]:
    """Remove the staging folders that no clip job pending now may write to and that no writer has
    touched for longer than any job could run (a job made since the audit, or running with its record
    gone from Redis, keeps its folder). Returns (removed, left)."""
    in_use = _pending_staging_keys(connection, queues)
    removed = left = 0
    now = time.time()
    for folder in staging:
        if not is_staging_name(os.path.basename(folder.path)):
            continue  # never anything else, whatever the report says
        try:
            if _in_use(in_use, folder) or now - os.stat(folder.path).st_mtime < older_than:
                left += 1
                continue
            shutil.rmtree(folder.path)
            removed += 1
        except FileNotFoundError:
            continue  # removed by its assemble meanwhile
        except OSError as exc:
            problems.append(f"{folder.path}: {exc}")
    return removed, left


# --- rendering ------------------------------------------------------------------------------------

_MEANING = {
    "errors": "an error file records this version",
    "lost": "no result, and no job that will make one",
    "queued": "waiting in a lane",
    "running": "a worker has it",
    "retrying": "waiting out a back-off before its next attempt",
    "failed": "the job failed and left no error file (`depthq failed list`)",
    "collecting": "its result waits in Redis for the collector",
    "orphans": "outputs of photos that are gone: listed, never deleted",
    "stale": "a sidecar or error file of another version, and no job for this one",
    "partial": "a result with files missing, or data files with no sidecar",
    "both": "a sidecar and an error file",
    "temporary": "temporary files and clips' staging folders; removable: older than any job could run",
    "queued_nowhere": "queued in no lane and taken by no worker: it will never run",
    "duplicated": "a job twice in the lanes, or a photo with two pending jobs",
}


# The columns each kind's table shows (the JSON has every field), when any row has something to say.
_COLUMNS = {
    "errors": ("source", "error"),
    "lost": ("source", "why", "job_id"),
    "failed": ("source", "why", "lane", "job_id"),
    "orphans": ("source", "files", "folder_gone"),
    "stale": ("source", "recorded", "now", "sha256_recorded", "sha256_now", "state"),
    "partial": ("source", "missing", "data_files", "state"),
    "both": ("source", "records_this_version"),
    "temporary": ("file", "age_s", "removable"),
    "queued_nowhere": ("source", "lane", "job_id"),
    "duplicated": ("source", "job_id", "job_ids", "lists"),
}
_IN_FLIGHT_COLUMNS = ("source", "lane", "job_id", "chunks", "stale_output", "queued_nowhere")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, dict):
        if set(value) == {"size", "mtime"}:
            return f"{value['size']} B, {datetime.fromtimestamp(value['mtime']):%Y-%m-%d %H:%M}"
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, str) and _SHA256.match(value):
        return value[:16] + "..."
    return str(value)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def render(report: AuditReport, console: Console) -> None:
    console.print(f"audit of {report.watch} against {report.output}")
    summary = Table(show_header=False)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_row("photos", str(report.counts["photos"]))
    for kind in KINDS:
        count = report.counts[kind]
        shown = str(count)
        if count and kind in FAILING:
            shown = f"[red]{count}[/red]"
        elif count and kind in ("failed", "orphans", "temporary"):
            shown = f"[yellow]{count}[/yellow]"
        summary.add_row(kind, shown)
    console.print(summary)
    how = "the index" if report.index else "no index"
    hashed = f", {report.hashed} photo(s) hashed" + (" (--hash: every done photo)" if report.hash_checked else "")
    console.print(
        f"{report.folders} folder(s) in {report.seconds:.2f} s; {how}, {report.sidecars_read} sidecar(s) read{hashed}"
    )
    for kind in KINDS:
        items = report.items.get(kind)
        if not items or kind == "done":
            continue
        count = report.counts[kind]
        more = f", the first {len(items)}" if count > len(items) else ""
        table = Table(title=f"{kind}: {count} ({_MEANING[kind]}){more}", title_justify="left")
        shown = _COLUMNS.get(kind, _IN_FLIGHT_COLUMNS)
        columns = [c for c in shown if any(_cell(i.get(c)) for i in items)]
        for column in columns:
            header = "age" if column == "age_s" else column.replace("_", " ")
            table.add_column(header, overflow="fold", no_wrap=column.startswith("job_id"))
        for item in items:
            table.add_row(*(_age(item[c]) if c == "age_s" else _cell(item.get(c)) for c in columns))
        console.print(table)
    if report.repair is not None:
        r = report.repair
        enqueued = ", ".join(f"{n} {outcome}" for outcome, n in r["enqueued"].items()) or "none"
        console.print(f"repair: lost and stale photos sent to the backfill lane: {enqueued}")
        if r["requeued_jobs"]:
            console.print(f"repair: {len(r['requeued_jobs'])} job(s) queued nowhere pushed back onto their lane")
        if r["temporary_removed"] or r["temporary_left"]:
            console.print(
                f"repair: {r['temporary_removed']} temporary file(s) removed, {r['temporary_left']} younger "
                "left for their writer"
            )
        if r["staging_removed"] or r["staging_left"]:
            console.print(
                f"repair: {r['staging_removed']} clip staging folder(s) removed, {r['staging_left']} left "
                "(a job of the clip pending, or written to lately)"
            )
        for problem in r["errors"]:
            console.print(f"[red]repair: {problem}[/red]")
    if report.ok:
        console.print("[green]ok[/green]: nothing lost, stale, partial or duplicated")
        return
    wrong = ", ".join(f"{report.counts[k]} {k}" for k in FAILING if report.counts[k])
    console.print(f"[red]not ok[/red]: {wrong}")
    if report.repair is None and (report.counts["lost"] or report.counts["stale"] or report.counts["queued_nowhere"]):
        console.print("`depthq audit --repair` enqueues the lost and stale photos and requeues the jobs queued nowhere")
    if report.counts["partial"] or report.counts["both"]:
        console.print("partial or both: `depthq enqueue --force PHOTO` computes the photo again")
