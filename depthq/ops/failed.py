"""`depthq failed list|retry|purge`: the failed registry, by photo rather than by job id.

A retried job runs again with its original payload; a clip's failed job (a chunk, its assemble or its
refusal) makes its clip's jobs again instead. A bad photo fails again unless it was fixed;
a photo that failed for a passing reason (a model file missing, a full disk) then succeeds. With the
redis transport the photo's bytes were freed with its error, so a retry sends them again from this
host's folder for the job's root: run it where the photos are (the producer's host).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis import Redis
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import FailedJobRegistry

from depthq import attempts
from depthq.config import Config
from depthq.contract import (
    LANES,
    SERIALIZER,
    JobPayload,
    PayloadError,
    inflight_key,
    make_queue,
    photo_key,
    root_folder,
    safe_relative,
)
from depthq.ops.status import WIDE_CONSOLE, job_source


@dataclass(frozen=True)
class FailedJob:
    job_id: str
    source: str | None
    failed_at: str | None
    # The exception's last line, as rq recorded it: "worker.errors.BadInputError: x.jpg: cannot be decoded ..."
    error: str
    # That line in two: the exception's type ("worker.errors.BadInputError"; None where rq recorded no
    # typed line) and its own message, which names the photo and the fix.
    error_type: str | None = None
    message: str = ""


def _registries(connection: Redis, config: Config) -> dict[str, FailedJobRegistry]:
    """Failed job id -> the registry (live or backfill lane) that holds it."""
    held: dict[str, FailedJobRegistry] = {}
    for lane in LANES:
        registry = make_queue(connection, config, lane).failed_job_registry
        held.update(dict.fromkeys(registry.get_job_ids(), registry))
    return held


def _last_line(text: str | None) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


# What traceback writes last: "package.module.Type: message", or the bare type when the message is empty.
_TYPED_LINE = re.compile(r"(?P<type>[A-Za-z_][\w.]*)(?:: (?P<message>.*))?")


def _split_error(line: str) -> tuple[str | None, str]:
    """(type, message) of an exception's last line; (None, line) for one with no type in front."""
    typed = _TYPED_LINE.fullmatch(line)
    if typed is None:
        return None, line
    return typed["type"], typed["message"] or ""


def list_failed(connection: Redis, config: Config) -> list[FailedJob]:
    rows = []
    for jid in _registries(connection, config):
        try:
            job = Job.fetch(jid, connection=connection, serializer=SERIALIZER)
        except NoSuchJobError:
            continue  # expired between the two reads
        result = job.latest_result()
        ended = job.ended_at
        if ended is not None and ended.tzinfo is None:
            ended = ended.replace(tzinfo=UTC)
        error = _last_line(result.exc_string if result else None)
        error_type, message = _split_error(error)
        rows.append(
            FailedJob(
                job_id=jid,
                source=job_source(job),
                failed_at=ended.isoformat() if isinstance(ended, datetime) else None,
                error=error,
                error_type=error_type,
                message=message,
            )
        )
    return rows


def _select(connection: Redis, config: Config, ids: list[str], everything: bool) -> list[str]:
    """Job ids to act on; a source path selects the failed jobs of that photo."""
    if everything:
        return list(_registries(connection, config))
    failed = list_failed(connection, config)
    by_source = {f.source: f.job_id for f in failed if f.source}
    known = {f.job_id for f in failed}
    chosen = []
    for item in ids:
        jid = item if item in known else by_source.get(item)
        if jid is None:
            raise LookupError(f"{item}: no failed job with this id or photo; see `depthq failed list`")
        chosen.append(jid)
    return chosen


def _each(
    connection: Redis, config: Config, ids: list[str], everything: bool, act: Callable[[FailedJobRegistry, str], Any]
) -> list[str]:
    registries = _registries(connection, config)
    chosen = _select(connection, config, ids, everything)
    for jid in chosen:
        if jid in registries:
            act(registries[jid], jid)
    return chosen


def _resend_photo(connection: Redis, config: Config, jid: str) -> None:
    """redis transport: put a failed job's photo bytes back in Redis, read from this host's folder."""
    try:
        payload = JobPayload.from_dict(Job.fetch(jid, connection=connection, serializer=SERIALIZER).args[0])
    except (NoSuchJobError, PayloadError, LookupError, TypeError):
        return  # not a job of ours: requeued as it is, and the worker refuses it again
    q = config.queue.name
    if payload.transport != "redis" or connection.exists(photo_key(q, jid)):
        return
    try:
        path = root_folder(config, payload.root).joinpath(*safe_relative(payload.source).parts)
        data = path.read_bytes()
    except (PayloadError, OSError) as exc:
        raise LookupError(
            f"{payload.source}: its bytes are no longer in Redis and cannot be read here ({exc}); "
            "run `depthq failed retry` on the producer's host, or `depthq enqueue --force` the photo there"
        ) from None
    with connection.pipeline(transaction=True) as tx:
        tx.set(photo_key(q, jid), data, ex=config.transport.blob_ttl_s)
        tx.hsetnx(inflight_key(q), jid, len(data))
        tx.execute()


# Makes a clip's jobs again from its file on this host (the producer's `Enqueuer.submit(path, force=True)`,
# which the CLI hands in: depthq's operations reach the producer only through the CLI).
ClipResubmit = Callable[[Path], object]


def _retry_clip(connection: Redis, config: Config, jid: str, resubmit: ClipResubmit | None) -> bool:
    """A clip's failed job is retried as its clip: the clip's jobs are made again (chunks still staged
    are kept), since a chunk run again alone would have no assemble after it. False for a photo's job."""
    try:
        payload = JobPayload.from_dict(Job.fetch(jid, connection=connection, serializer=SERIALIZER).args[0])
    except (NoSuchJobError, PayloadError, LookupError, TypeError):
        return False
    if payload.clip is None:
        return False
    if resubmit is None:
        raise LookupError(
            f"{payload.source}: a clip's job is retried by making the clip's jobs again; run `depthq failed retry`"
        )
    try:
        resubmit(root_folder(config, payload.root).joinpath(*safe_relative(payload.source).parts))
    except (PayloadError, ValueError, OSError) as exc:
        raise LookupError(
            f"{payload.source}: the clip cannot be read here ({exc}); run `depthq failed retry` where the "
            "clips are (the producer's host)"
        ) from None
    return True


def retry(
    connection: Redis,
    config: Config,
    ids: list[str],
    everything: bool = False,
    resubmit_clip: ClipResubmit | None = None,
) -> list[str]:
    def resend_and_requeue(registry: FailedJobRegistry, jid: str) -> None:
        if _retry_clip(connection, config, jid, resubmit_clip):
            return
        _resend_photo(connection, config, jid)
        attempts.forget(connection, config.queue.name, jid)  # the user asks for a fresh start
        registry.requeue(jid)

    return _each(connection, config, ids, everything, resend_and_requeue)


def purge(connection: Redis, config: Config, ids: list[str], everything: bool = False) -> list[str]:
    return _each(connection, config, ids, everything, lambda registry, jid: registry.remove(jid, delete_job=True))


def as_dicts(rows: list[FailedJob]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def _when(failed_at: str | None) -> str:
    """To the second, in UTC as --json has it: the microseconds and the offset cost 13 columns."""
    if failed_at is None:
        return "?"
    return datetime.fromisoformat(failed_at).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def render(rows: list[FailedJob], console: Console) -> None:
    """The photo, when and why, in 80 columns; the job id and the error's type only where they fit.

    A job id (41 characters) and a type name would leave an 80-column error column too narrow to read,
    and `failed retry` and `purge` take the photo as well as the id. From WIDE_CONSOLE on they fit
    beside a readable error; --json always has them. Text cells: a photo named "[x].jpg" is no markup.
    """
    wide = console.width >= WIDE_CONSOLE
    table = Table(title=f"{len(rows)} failed job(s)", title_justify="left")
    if wide:
        table.add_column("job", no_wrap=True)
    table.add_column("photo", overflow="fold")
    table.add_column("failed (UTC)", no_wrap=True)
    table.add_column("error", overflow="fold")
    for r in rows:
        # The message names the photo first, as every depthq error does: here the photo has its column.
        error = Text((r.message or r.error).removeprefix(f"{r.source}: "))
        if wide and r.error_type:
            error = Text.assemble((r.error_type.rsplit(".", 1)[-1], "bold"), ": ", error)
        cells = [Text(r.source or "?"), Text(_when(r.failed_at)), error]
        table.add_row(*([Text(r.job_id)] if wide else []), *cells)
    if rows and not wide:
        table.caption = f"retry or purge by photo; job ids and error types: --json, or {WIDE_CONSOLE}+ columns"
        table.caption_justify = "left"
    console.print(table)
