"""The collector (redis transport): results that workers sent through Redis become files on this host.

Workers that share no disk with the producer put each job's output files in a Redis hash and an entry
on the results stream. Here a consumer group reads the stream; each entry's files are written into
`output.dir` atomically (data first, the sidecar last), and only then is the entry acknowledged and
the job's photo and result deleted from Redis, in one transaction. A collector that dies mid-write
leaves its entry pending: it reads its own pending entries first when it comes back, and any collector
claims entries left idle for `transport.claim_after_s`. Writing a file twice is harmless (each write
replaces the whole file), so nothing is lost and nothing is half-written.

A result that cannot be written is judged one at a time (`depthq.environment`): a full or failing disk
leaves it pending, to be written once the disk takes writes again, while the others are still tried; a
result that can never be written (a name or folder the filesystem refuses) is that photo's failure: it
gets an error file saying so, and is acknowledged. No single result holds up the ones behind it.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import zstandard
from redis import Redis
from redis.exceptions import RedisError, ResponseError

from depthq.clip_jobs import ASSEMBLE_KIND, parse_staged_kind, staging_folder
from depthq.config import Config
from depthq.contract import (
    COLLECTOR_GROUP,
    COMPRESSED_KINDS,
    ERROR_KIND,
    OUTPUT_SUFFIXES,
    JobPayload,
    PayloadError,
    alert_key,
    error_record,
    inflight_key,
    photo_key,
    result_key,
    results_stream,
    root_folder,
    safe_relative,
)
from depthq.environment import describe, free_space, is_environment_failure
from depthq.files import atomic_bytes, json_bytes, remove_stale_temps, write_outputs
from depthq.outage import Outage

log = logging.getLogger(__name__)

# Entries taken per read: enough to keep the disk busy, few enough that a claim moves little at once.
_BATCH = 16
# How long one blocking read waits for new results; bounds how fast a stop is noticed.
_BLOCK_MS = 1000
_KNOWN_KINDS = frozenset(OUTPUT_SUFFIXES) | {ERROR_KIND}
# While the output disk refuses writes, the results held back are tried again after this long, doubling.
_RETRY_FIRST_S = 1.0
_RETRY_MAX_S = 30.0
# `depthq assemble-clip`'s "ask again later" (sysexits' TEMPFAIL), as `worker.clip_assembly` returns it.
EXIT_LATER = 75
# How long `depthq status` shows that the output refuses writes after the last refusal.
_ALERT_TTL_S = 900


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Collector:
    def __init__(self, config: Config, connection: Redis, name: str | None = None, role: str = "collector"):
        self.config = config
        self.connection = connection
        self.queue_name = config.queue.name
        self.stream = results_stream(self.queue_name)
        self.output_root = config.output.dir
        # Stable across restarts on one host, so a restarted collector finds its own pending entries;
        # by role, so `depthq collect` beside `depthq watch` never takes the other's entries as its own.
        self.name = name or f"{role}@{socket.gethostname().split('.')[0] or 'localhost'}"
        self.claim_after_ms = config.transport.claim_after_s * 1000
        self.decompressor = zstandard.ZstdDecompressor()
        self.collected = 0
        # Whether the last write met a full or failing disk: the outage and its end are said once each.
        self.disk_failing = Outage()

    def ensure_group(self) -> None:
        try:
            self.connection.xgroup_create(self.stream, COLLECTOR_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def run(self, stop: threading.Event) -> None:
        """Collect until `stop`; a Redis outage is waited out, then this collector's pending entries
        (read, maybe half-written, before the outage) are taken first. Entries the disk would not take
        are tried again on a back-off while new ones keep coming. Nothing stops it but `stop`: the
        watcher beside it would otherwise go on filling Redis with nobody taking results out."""
        log.info("collecting results from %s into %s as %s", self.stream, self.output_root, self.name)
        next_pending = 0.0  # when to go over the entries held back (now: at start, a restart may have left some)
        retry_s = _RETRY_FIRST_S
        next_claim = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() >= next_pending:
                    held_back = self.collect_pending()
                    next_pending = time.monotonic() + retry_s if held_back else float("inf")
                    retry_s = min(retry_s * 2, _RETRY_MAX_S) if held_back else _RETRY_FIRST_S
                if time.monotonic() >= next_claim:
                    self.claim_abandoned()
                    next_claim = time.monotonic() + self.config.transport.claim_after_s / 2
                if self.collect_new(block_ms=_BLOCK_MS) and self.disk_failing:
                    next_pending = min(next_pending, time.monotonic() + retry_s)  # new ones held back too
            except RedisError as exc:
                log.warning("collector: redis unavailable (%s); retrying", exc)
                next_pending = 0.0
                stop.wait(1.0)
            except Exception:
                log.exception("collector: unexpected error; retrying in 5 s")
                next_pending = 0.0
                stop.wait(5.0)

    def collect_pending(self) -> int:
        """This collector's own entries, read and not yet written (it stopped mid-write, or the disk
        refused them), a page at a time, each tried once. Returns how many are still held back."""
        held_back = 0
        after = "0"
        while True:
            entries = self._read(after)
            for entry_id, fields in entries:
                after = _text(entry_id)
                if not self.collect(entry_id, fields, taken_over=True):
                    held_back += 1
            if len(entries) < _BATCH:
                return held_back

    def claim_abandoned(self) -> int:
        """Entries another collector read and then went silent on for claim_after_s: ours now."""
        claimed = 0
        start = "0-0"
        while True:
            reply = self.connection.xautoclaim(
                self.stream, COLLECTOR_GROUP, self.name, self.claim_after_ms, start_id=start, count=_BATCH
            )
            start, entries = _text(reply[0]), reply[1]
            for entry_id, fields in entries:
                log.warning("collector: taking over result %s, left unfinished by another collector", _text(entry_id))
                self.collect(entry_id, fields, taken_over=True)
                claimed += 1
            if start == "0-0" or not entries:
                return claimed

    def collect_new(self, block_ms: int | None = None) -> int:
        """New entries, each tried once; those the disk refuses stay pending (`collect_pending`)."""
        entries = self._read(">", block_ms)
        for entry_id, fields in entries:
            self.collect(entry_id, fields)
        return len(entries)

    def _read(self, from_id: str, block_ms: int | None = None) -> list[tuple[Any, dict[Any, Any] | None]]:
        """Entries for this collector. The group is made on first need, and made again after a
        Redis that lost it (restarted without its AOF): from id 0, so no result is skipped."""
        try:
            reply = self.connection.xreadgroup(
                COLLECTOR_GROUP, self.name, {self.stream: from_id}, count=_BATCH, block=block_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()
            return self._read(from_id, block_ms)
        return list(reply[0][1]) if reply else []

    def collect(self, entry_id: Any, fields: dict[Any, Any] | None, taken_over: bool = False) -> bool:
        """Write one result's files, then forget it in Redis. False if the disk refused them: the entry
        stays pending, to be tried again. A result that can never be written becomes an error file.

        `taken_over`: a collector was here before and may have died mid-write; its temporary files go.
        """
        if not fields:
            self._forget(entry_id, None)  # deleted meanwhile: pending, with nothing left to read
            return True
        jid = _text(fields.get(b"job", b""))
        source = _text(fields.get(b"source", b""))
        try:
            safe_relative(source)
        except PayloadError as exc:
            log.error("collector: result %s refused, not written: %s", _text(entry_id), exc)
            self._forget(entry_id, None)
            return True
        stored = self.connection.hgetall(result_key(self.queue_name, jid))
        if not stored:
            # Another collector finished it, or a retried job sent it twice: already written.
            log.debug("collector: result of job %s (%s) is already collected", jid, source)
            self._forget(entry_id, None)
            return True
        try:
            files = self._decode(source, stored)
        except zstandard.ZstdError as exc:
            # Never better on a second read: the photo gets an error file saying so, and is freed.
            message = (
                f"{source}: the worker's result could not be decompressed ({exc}); is a worker running "
                "another depthq version? The producer's next rescan sends the photo again"
            )
            log.error("collector: %s", message)
            files = {ERROR_KIND: json_bytes(error_record(source, jid, "unreadable_result", message))}
        if not self._write(source, jid, files, taken_over):
            return False
        self._forget(entry_id, jid)
        self.collected += 1
        what = "error file" if ERROR_KIND in files else f"{len(files)} file(s)"
        # A clip's staged frames come one result each: said at DEBUG, its assembly at INFO (worker.clip_assembly).
        staged_only = all(parse_staged_kind(kind) is not None for kind in files)
        log.log(logging.DEBUG if staged_only else logging.INFO, "collected %s: %s (job %s)", source, what, jid)
        return True

    def _write(self, source: str, jid: str, files: dict[str, bytes], taken_over: bool) -> bool:
        """The files, or, if this result can never be written here, an error file naming why. False if
        the disk refuses writes for now (full, read-only, failing): nothing is the photo's fault then."""
        if ASSEMBLE_KIND in files:
            return self._assemble(source, jid, files[ASSEMBLE_KIND])
        try:
            staged = {kind: data for kind, data in files.items() if parse_staged_kind(kind) is not None}
            for kind, data in staged.items():
                sha, name = parse_staged_kind(kind) or ("", "")
                atomic_bytes(staging_folder(self.output_root, source, sha) / name, data)
            outputs = {kind: data for kind, data in files.items() if kind not in staged}
            if taken_over and remove_stale_temps(self.output_root, source, outputs):
                log.info("collector: removed the temporary files of an interrupted write of %s", source)
            if outputs:
                write_outputs(self.output_root, source, outputs)
        except OSError as exc:
            if is_environment_failure(exc):
                self._disk_trouble(exc)
                return False
            if ERROR_KIND in files and len(files) == 1:
                # Not even its error file can be written: say so here, and let the result go.
                log.error("collector: %s: not even its error file can be written (%s); result dropped", source, exc)
                return True
            message = (
                f"{source}: its result cannot be written into {self.output_root} ({describe(exc)}); "
                "nothing is wrong with the disk, so this is not retried: rename the photo or the folder "
                "that is in the way, and it is computed again"
            )
            log.error("collector: %s", message)
            record = error_record(source, jid, "unwritable_result", message)
            return self._write(source, jid, {ERROR_KIND: json_bytes(record)}, taken_over=False)
        self._disk_trouble(None)
        return True

    def _assemble(self, source: str, jid: str, request: bytes) -> bool:
        """A clip's assembly, asked for by its assemble job: here, where its staging folder and outputs
        are, in a child process (`depthq assemble-clip`), so the watcher beside this collector never
        loads numpy. False to be asked again (the disk refuses writes, or a chunk's files are not all
        collected yet); a child that fails otherwise gives the clip an error file saying so."""
        try:
            payload = JobPayload.from_dict(json.loads(request)["payload"])
            clip = root_folder(self.config, payload.root).joinpath(*safe_relative(payload.source).parts)
        except (ValueError, LookupError, TypeError, PayloadError) as exc:
            log.error("collector: %s: an assemble request that is not one (%s); dropped", source, exc)
            return True
        command = [
            sys.executable,
            "-m",
            "depthq",
            "assemble-clip",
            "--into",
            str(self.output_root),
            "--clip",
            str(clip),
        ]
        timeout = 2 * self.config.queue.job_timeout_s
        try:
            # Its log goes where this collector's goes (stderr, inherited): one log for the whole host.
            done = subprocess.run(command, input=request, stdout=subprocess.DEVNULL, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            log.error("collector: %s: its assembly ran past %d s; asked again later", source, timeout)
            return False
        if done.returncode == EXIT_LATER:
            return False
        if done.returncode != 0:
            message = (
                f"{source}: the clip could not be assembled (depthq assemble-clip exited {done.returncode}; its "
                "log says why); `depthq failed retry` it once fixed"
            )
            log.error("collector: %s", message)
            stamp = {"size": payload.size, "mtime": int(payload.mtime)}
            record = error_record(source, jid, "assembly_failed", message, stamp)
            return self._write(source, jid, {ERROR_KIND: json_bytes(record)}, taken_over=False)
        return True

    def _disk_trouble(self, exc: OSError | None) -> None:
        """Say once that the output disk refuses writes, and once that it takes them again; meanwhile
        `depthq status` shows it (the same alert workers raise with the shared transport)."""
        key = alert_key(self.queue_name, "output")
        try:
            if exc is not None:
                message = f"output disk full or unwritable: output.dir {self.output_root}: {describe(exc)}"
                self.connection.set(key, f"{message} ({free_space(self.output_root)})", ex=_ALERT_TTL_S)
            elif self.disk_failing:
                self.connection.delete(key)
        except RedisError as redis_exc:
            log.warning("collector: could not record the output folder's state for depthq status (%s)", redis_exc)
        if exc is not None and self.disk_failing.begins():
            log.error(
                "collector: cannot write into %s (%s, %s); the results wait in Redis and are written once "
                "it takes writes again: free space there (or fix the mount)",
                self.output_root,
                describe(exc),
                free_space(self.output_root),
            )
        elif exc is None and self.disk_failing.ends():
            log.warning("collector: %s takes writes again; the results held back follow", self.output_root)

    def _decode(self, source: str, stored: dict[Any, Any]) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        for raw_kind, data in stored.items():
            kind = _text(raw_kind)
            staged = parse_staged_kind(kind)
            if kind not in _KNOWN_KINDS and staged is None and kind != ASSEMBLE_KIND:
                log.warning("collector: %s: result has an unknown file kind %r; skipped", source, kind)
                continue
            packed = kind in COMPRESSED_KINDS or (staged is not None and staged[1].endswith(".npy"))
            files[kind] = self.decompressor.decompress(data) if packed else data
        return files

    def _forget(self, entry_id: Any, jid: str | None) -> None:
        """Acknowledge the entry and free what the job held in Redis, together."""
        with self.connection.pipeline(transaction=True) as tx:
            tx.xack(self.stream, COLLECTOR_GROUP, entry_id)
            tx.xdel(self.stream, entry_id)
            if jid is not None:
                tx.delete(result_key(self.queue_name, jid), photo_key(self.queue_name, jid))
                tx.hdel(inflight_key(self.queue_name), jid)
            tx.execute()


def start_collector(config: Config, connection: Redis, stop: threading.Event) -> threading.Thread | None:
    """The collector beside the watcher, when photos travel through Redis; None for the shared transport."""
    if config.transport.mode != "redis":
        return None
    collector = Collector(config, connection)
    thread = threading.Thread(target=collector.run, args=(stop,), name="collector", daemon=True)
    thread.start()
    return thread
