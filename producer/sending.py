"""How a photo reaches a worker: the transport-specific half of enqueueing, behind one small interface.

`Enqueuer` owns what every transport shares (job ids, dedupe, aliases, lanes); a `Sender` owns what
differs between them:
- shared (`SharedSender`): the worker reads the photo from the share and writes its outputs there, so
  the producer only hashes the file, and a copy can be an alias or copy a stored result;
- redis (`RedisSender`): the photo's bytes travel beside the job and the result comes back for the
  collector, so the producer reads and caps the bytes, admits a photo only while Redis has room, frees
  what no job will, and records its own refusals, since no worker can read what it did not send.

`Enqueuer` asks a sender what it can do (`can_alias`, `copies_results`, `batches`), never which one
it is; `sender_for` is the one place that looks at `transport.mode`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job, JobStatus

from depthq.config import Config
from depthq.contract import (
    error_record,
    file_sha256,
    inflight_key,
    photo_key,
    record_recent,
    result_key,
    source_stamp,
)
from depthq.files import json_bytes, write_outputs

log = logging.getLogger(__name__)

# A job in one of these is done with its photo: it will take no bytes from Redis again.
OVER = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}
# Rescans hash only what changed: (source, size, mtime_ns) -> sha256, for this many photos.
_HASH_CACHE_SIZE = 100_000
# Once Redis is found full, photos are held back without asking it again for this long, so thousands
# of waiting photos cost one look, not thousands.
_FULL_RECHECK_S = 0.5
# How long a photo's bytes may wait for their job before they count as orphaned.
_ORPHAN_GRACE_S = 60


class Sender(Protocol):
    """What `Enqueuer` needs of a transport: how a photo is read, admitted, sent and refused."""

    @property
    def can_alias(self) -> bool:
        """Whether a copy under another name may ride on its original's pending job (the worker
        writes the copy's outputs too). Only where the worker can read and write the copy's name."""
        ...

    @property
    def copies_results(self) -> bool:
        """Whether a copy's job may copy the result stored for its original (`same_as`) instead of
        computing it. Only where the worker can read the original's outputs."""
        ...

    @property
    def batches(self) -> bool:
        """Whether `Enqueuer.submit_many` may enqueue new photos in one transaction; False leaves every
        photo to `submit`."""
        ...

    @property
    def collected(self) -> bool:
        """Whether a finished job's result comes back through Redis for the producer's collector."""
        ...

    def cannot_send(self, st: os.stat_result) -> str | None:
        """Why this transport will not carry a photo of this size (None: it will)."""
        ...

    def has_room(self, size: int) -> bool:
        """Whether one more photo of `size` bytes may go now; False holds it on disk for later."""
        ...

    def read(self, path: Path, source: str, st: os.stat_result) -> tuple[str, bytes | None]:
        """The photo's sha256, and its bytes when they travel beside the job. Raises PermissionError."""
        ...

    def put(self, jid: str, data: bytes) -> None:
        """Put a photo's bytes where the job `jid` will find them, before the job exists."""
        ...

    def drop_orphans(self, jids: list[str], grace: bool = True) -> list[str]:
        """Free what these jobs hold that no job will take any more; returns the freed job ids."""
        ...

    def result_waiting(self, jid: str) -> bool:
        """Whether the job's result is done and waits for the collector (so the photo needs nothing)."""
        ...

    def refuse_here(self, source: str, st: os.stat_result, why: str) -> bool:
        """Record a refusal where the user looks, if only the producer can. False: a worker records it,
        from a refusal job."""
        ...


def sender_for(config: Config, connection: Redis) -> Sender:
    """The sender `transport.mode` names."""
    if config.transport.mode == "redis":
        return RedisSender(config, connection)
    return SharedSender()


class SharedSender:
    """transport.mode shared: producer and workers see the same folders, so only the job travels."""

    can_alias = True
    copies_results = True
    batches = True
    collected = False

    def __init__(self) -> None:
        self._hashes: OrderedDict[tuple[str, int, int], str] = OrderedDict()

    def cannot_send(self, st: os.stat_result) -> str | None:
        return None

    def has_room(self, size: int) -> bool:
        """The photo stays on the share until a worker reads it: nothing to run out of."""
        return True

    def read(self, path: Path, source: str, st: os.stat_result) -> tuple[str, bytes | None]:
        key = (source, st.st_size, st.st_mtime_ns)
        sha = self._hashes.get(key)
        if sha is None:
            sha = file_sha256(path)
            self._hashes[key] = sha
            if len(self._hashes) > _HASH_CACHE_SIZE:
                self._hashes.popitem(last=False)
        else:
            self._hashes.move_to_end(key)
        return sha, None

    def put(self, jid: str, data: bytes) -> None:
        """Nothing travels beside a shared job: the worker reads the photo from the share."""

    def drop_orphans(self, jids: list[str], grace: bool = True) -> list[str]:
        """Nothing is held for a shared job: there are no orphans."""
        return []

    def result_waiting(self, jid: str) -> bool:
        """The worker writes results to the share itself: none waits."""
        return False

    def refuse_here(self, source: str, st: os.stat_result, why: str) -> bool:
        """The worker, which decides what it may read, computes the photo or writes the error file."""
        return False


class RedisSender:
    """transport.mode redis: the photo's bytes go through Redis beside the job, and the result comes
    back for the collector, so no worker needs the producer's disk."""

    can_alias = False  # a worker cannot read a copy's file here, so a copy gets its own job
    copies_results = False  # nor the original's outputs, which only the collector writes
    batches = False  # each photo's bytes must find room in Redis first
    collected = True

    def __init__(self, config: Config, connection: Redis):
        self.config = config
        self.connection = connection
        self.name = config.queue.name
        self._full_until = 0.0

    def cannot_send(self, st: os.stat_result) -> str | None:
        cap = self.config.transport.max_photo_bytes
        if st.st_size <= cap:
            return None
        return (
            f"{st.st_size / 2**20:.1f} MiB, over transport.max_photo_bytes ({cap / 2**20:.1f} MiB) "
            "that the redis transport sends; raise it (Redis needs the room) and run "
            "`depthq enqueue --force` on the photo, or use the shared transport"
        )

    def has_room(self, size: int) -> bool:
        """Whether Redis may take one more photo (transport.max_inflight_*).

        Always when nothing is in flight, so one photo larger than max_inflight_bytes still goes.
        When full, entries no job will ever free are dropped first (`drop_orphans`), so they cannot
        hold the producer back for a week.
        """
        if time.monotonic() < self._full_until:
            return False
        t = self.config.transport
        key = inflight_key(self.name)
        held = {k.decode(): int(v) for k, v in self.connection.hgetall(key).items()}

        def full() -> bool:
            return bool(held) and (len(held) >= t.max_inflight_jobs or sum(held.values()) + size > t.max_inflight_bytes)

        if full():
            for jid in self.drop_orphans(list(held)):
                del held[jid]
        if full():
            self._full_until = time.monotonic() + _FULL_RECHECK_S
            return False
        return True

    def read(self, path: Path, source: str, st: os.stat_result) -> tuple[str, bytes | None]:
        """The bytes that are hashed are the bytes sent: the job's id names exactly what the worker gets."""
        data = path.read_bytes()
        return hashlib.sha256(data).hexdigest(), data

    def put(self, jid: str, data: bytes) -> None:
        """The bytes go before the job, so no worker finds a job without them. If the enqueue is then
        refused as a duplicate, the bytes stay for the job holding the id: they are the same bytes,
        under the same key."""
        with self.connection.pipeline(transaction=True) as tx:
            tx.set(photo_key(self.name, jid), data, ex=self.config.transport.blob_ttl_s)
            tx.hsetnx(inflight_key(self.name), jid, len(data))
            tx.execute()

    def drop_orphans(self, jids: list[str], grace: bool = True) -> list[str]:
        """In-flight entries whose job is gone or over with no result waiting for the collector: a job
        deleted by hand (dashboard, `depthq failed purge`), a payload the worker refused, a photo
        that expired. Their photo bytes go too; the producer's rescan sends any such photo again.

        With `grace`, photos put in the last minute are left alone: their job may be about to be
        enqueued (by `depthq enqueue` beside the watcher, say), between the bytes and the job.
        """
        q = self.name
        recent = self.config.transport.blob_ttl_s - (_ORPHAN_GRACE_S if grace else 0)
        with self.connection.pipeline(transaction=False) as look:
            for jid in jids:
                look.exists(result_key(q, jid))
                look.hget(Job.key_for(jid), "status")
                look.ttl(photo_key(q, jid))
            replies = look.execute()
        over = {s.value for s in OVER}
        orphans = [
            jid
            for jid, has_result, status, ttl in zip(jids, replies[0::3], replies[1::3], replies[2::3], strict=True)
            if not has_result and (status is None or status.decode() in over) and ttl <= recent
        ]
        if orphans:
            with self.connection.pipeline(transaction=True) as tx:
                tx.hdel(inflight_key(q), *orphans)
                tx.delete(*(photo_key(q, jid) for jid in orphans))
                tx.execute()
            log.info("freed %d in-flight entr(ies) whose job is gone or over without a result", len(orphans))
        return orphans

    def result_waiting(self, jid: str) -> bool:
        return bool(self.connection.exists(result_key(self.name, jid)))

    def refuse_here(self, source: str, st: os.stat_result, why: str) -> bool:
        """No worker can read what the producer would not send, so the producer writes the error file
        itself, where the user looks for the photo's outputs."""
        message = f"{source}: {why}"
        log.warning("not sent: %s", message)
        record = error_record(source, "", "refused", message, source_stamp(st))
        write_outputs(self.config.output.dir, source, {"error": json_bytes(record)})
        with contextlib.suppress(RedisError), self.connection.pipeline(transaction=False) as pipe:
            record_recent(pipe, self.name, source)  # the gallery shows the refusal among the newest
            pipe.execute()
        return True
