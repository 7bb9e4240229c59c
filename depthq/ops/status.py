"""`depthq status`: the queue, the workers and recent throughput, from Redis alone.

Everything comes from what rq already keeps (queue, registries, worker records) plus the completions
workers record (`contract.record_completion`), so any host that reaches Redis can ask, and nothing
has to be running besides Redis. Clips in progress come from their assemble jobs, which wait in rq's
deferred registry until every chunk job has ended, and from those chunk jobs' states.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from redis.exceptions import ResponseError
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rq import Queue, Worker
from rq.exceptions import NoSuchJobError
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job, JobStatus

from depthq.clip_jobs import ClipPart, chunk_job_ids, is_assemble_job, plan_chunks
from depthq.config import Config
from depthq.contract import (
    ALERTS,
    COLLECTOR_GROUP,
    COMPLETIONS_WINDOW_S,
    LANES,
    SERIALIZER,
    WORKER_FIELDS,
    Completion,
    Lane,
    PayloadError,
    alert_key,
    completions_key,
    inflight_key,
    make_queue,
    results_stream,
    watches_key,
)

WINDOWS_MIN = (5, 60)

# From this console width on, `status` and `failed list` show every column; below it they fit 80 columns
# with what matters. 120 is the wide preset of common terminals, and the first width at which the nine
# worker columns (or a failed job's 41-character id and its timestamp) still leave the photo and the
# error room to be read rather than folded into slivers.
WIDE_CONSOLE = 120

# Clips shown in progress (the rest are counted). Each costs one small read per chunk job (a 10-minute
# clip has about 1,100), which bounds what a look at a queue of many clips costs.
CLIPS_SHOWN = 8


@dataclass(frozen=True)
class WorkerRow:
    host: str
    name: str
    backend: str
    device: str
    model: str
    state: str
    # The photo in hand and its stage (job.meta), when busy.
    source: str | None
    stage: str | None
    heartbeat_age_s: float | None
    # How long the job in hand has run: one far past queue.job_timeout_s is stuck.
    job_age_s: float | None = None
    # An rq worker that is not depthq's (a plain `rq worker`): it cannot run depthq's jobs, and any it
    # takes fail without a result until the producer sends them again.
    foreign: bool = False


@dataclass(frozen=True)
class ClipRow:
    """A clip with pending jobs, as its chunk jobs in Redis say (nothing on disk is read).

    `frames` is the clip's computed frames and `frames_done` those of its finished chunks (None when the
    chunk size cannot be read back: the clip's first chunk job is gone). `hosts` maps each host that
    finished or runs one of its chunks to the frames it finished. `assembling`: every chunk has ended
    and the assemble job runs.
    """

    source: str
    lane: str
    frames: int
    frames_done: int | None
    chunks: int
    chunks_done: int
    chunks_running: int
    chunks_failed: int
    hosts: dict[str, int] = field(default_factory=dict)
    assembling: bool = False


@dataclass(frozen=True)
class Window:
    minutes: int
    done: int
    jobs_per_min: float
    queue_wait_p50_s: float | None
    queue_wait_p95_s: float | None
    total_p50_s: float | None
    total_p95_s: float | None


@dataclass(frozen=True)
class Transit:
    """The redis transport: what Redis holds for jobs, and whether a collector is taking results out."""

    jobs: int
    bytes: int
    results_waiting: int
    # Collector name -> seconds since it last read the stream (a dead collector's keeps growing).
    collectors_idle_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LaneStatus:
    """One of the two queues: `live` (photos events reported) or `backfill` (what scans found)."""

    queue: str
    queued: int
    taken: int
    running: int
    scheduled: int
    failed: int
    oldest_queued_age_s: float | None


@dataclass(frozen=True)
class Status:
    """Both lanes added up (what a glance needs), and each lane in `lanes`."""

    queue: str
    queued: int
    # Taken from the queue by a worker, not yet started: rq's intermediate list. A job stuck there
    # (its worker died between the two steps) is requeued by rq's maintenance.
    taken: int
    running: int
    scheduled: int
    failed: int
    oldest_queued_age_s: float | None
    workers: list[WorkerRow] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    transit: Transit | None = None
    # Conditions that hold every photo back (output disk full, Redis full), with what to do.
    alerts: list[str] = field(default_factory=list)
    # Watcher host -> (inotify watches, folders under the watch root) at its last rescan (Linux).
    watches: dict[str, tuple[int, int]] = field(default_factory=dict)
    lanes: dict[str, LaneStatus] = field(default_factory=dict)
    # At most CLIPS_SHOWN clips in progress, oldest first, and how many more have pending jobs.
    clips: list[ClipRow] = field(default_factory=list)
    clips_not_shown: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _window(completions: list[Completion], now: float, minutes: int) -> Window:
    recent = [c for c in completions if c.ended_at >= now - minutes * 60]
    waits = [c.queue_wait_s for c in recent]
    totals = [c.total_s for c in recent]
    # The rate over the time the record covers: a service 3 minutes old has not had 5 minutes to work.
    # It covers back to when the earliest job it holds was enqueued (queue wait included in total_s).
    since = min((c.ended_at - c.total_s for c in completions), default=now)
    covered_min = max(min(minutes * 60.0, now - since), 1.0) / 60.0
    return Window(
        minutes=minutes,
        done=len(recent),
        jobs_per_min=len(recent) / covered_min,
        queue_wait_p50_s=_percentile(waits, 50),
        queue_wait_p95_s=_percentile(waits, 95),
        total_p50_s=_percentile(totals, 50),
        total_p95_s=_percentile(totals, 95),
    )


def _age(dt: datetime | None, now: float) -> float | None:
    if dt is None:
        return None
    aware = dt if dt.tzinfo else dt.replace(tzinfo=UTC)
    return max(now - aware.timestamp(), 0.0)


def _fetch(connection: Redis, job_id: str | None) -> Job | None:
    if not job_id:
        return None
    try:
        return Job.fetch(job_id, connection=connection, serializer=SERIALIZER)
    except NoSuchJobError:
        return None


def job_source(job: Job) -> str | None:
    """The photo a depthq job is for; None for a job that is not ours or cannot be decoded."""
    try:
        payload = job.args[0] if job.args else None
    except Exception:  # rq decodes lazily: a pickled or foreign job fails here
        return None
    return payload.get("source") if isinstance(payload, dict) else None


def _workers(connection: Redis, config: Config, now: float) -> list[WorkerRow]:
    queue = make_queue(connection, config)
    workers = Worker.all(connection=connection, queue=queue, serializer=SERIALIZER)
    extra: dict[str, list[Any]] = {}
    with connection.pipeline(transaction=False) as pipe:
        for w in workers:
            pipe.hmget(w.key, list(WORKER_FIELDS.values()))
        for w, values in zip(workers, pipe.execute(), strict=True):
            extra[w.name] = [v.decode() if isinstance(v, bytes) else v for v in values]
    rows = []
    for w in workers:
        backend, device, model = extra.get(w.name) or [None, None, None]
        job = _fetch(connection, w.get_current_job_id())
        rows.append(
            WorkerRow(
                host=w.hostname or "?",
                name=w.name,
                backend=backend or "?",
                device=device or "?",
                model=model or "?",
                state=str(w.get_state()),
                source=job_source(job) if job else None,
                stage=job.meta.get("stage") if job else None,
                heartbeat_age_s=_age(w.last_heartbeat, now),
                job_age_s=_age(job.started_at, now) if job else None,
                foreign=backend is None,
            )
        )
    return sorted(rows, key=lambda r: (r.host, r.name))


def _transit(connection: Redis, queue_name: str) -> Transit | None:
    """None when nothing ever went through Redis (the shared transport)."""
    held = connection.hvals(inflight_key(queue_name))
    stream = results_stream(queue_name)
    if not held and not connection.exists(stream):
        return None
    idle: dict[str, float] = {}
    try:
        for consumer in connection.xinfo_consumers(stream, COLLECTOR_GROUP):
            name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else str(consumer["name"])
            idle[name] = consumer["idle"] / 1000.0
    except ResponseError:
        pass  # no collector has ever read the stream
    return Transit(
        jobs=len(held),
        bytes=sum(int(v) for v in held),
        results_waiting=connection.xlen(stream),
        collectors_idle_s=idle,
    )


def gather(connection: Redis, config: Config, now: float | None = None) -> Status:
    now = time.time() if now is None else now
    name = config.queue.name
    raw = connection.zrangebyscore(completions_key(name), now - COMPLETIONS_WINDOW_S, "+inf")
    completions = [Completion.from_member(m) for m in raw]
    lanes = {lane: _lane(connection, make_queue(connection, config, lane), now) for lane in LANES}
    ages = [lane.oldest_queued_age_s for lane in lanes.values() if lane.oldest_queued_age_s is not None]
    clips, clips_not_shown = _clips(connection, config)
    return Status(
        queue=name,
        queued=sum(lane.queued for lane in lanes.values()),
        taken=sum(lane.taken for lane in lanes.values()),
        running=sum(lane.running for lane in lanes.values()),
        scheduled=sum(lane.scheduled for lane in lanes.values()),
        failed=sum(lane.failed for lane in lanes.values()),
        oldest_queued_age_s=max(ages, default=None),
        lanes=lanes,
        workers=_workers(connection, config, now),
        windows=[_window(completions, now, m) for m in WINDOWS_MIN],
        transit=_transit(connection, name),
        alerts=[a.decode() for a in connection.mget([alert_key(name, n) for n in ALERTS]) if a]
        + _redis_full(connection),
        watches={
            host.decode(): tuple(int(n) for n in counts.split()[:2])  # type: ignore[misc]
            for host, counts in connection.hgetall(watches_key(name)).items()
        },
        clips=clips,
        clips_not_shown=clips_not_shown,
    )


def _lane(connection: Redis, queue: Queue, now: float) -> LaneStatus:
    head = queue.get_job_ids(0, 1)
    oldest = _fetch(connection, head[0] if head else None)
    return LaneStatus(
        queue=queue.name,
        queued=queue.count,
        taken=connection.llen(IntermediateQueue.get_intermediate_queue_key(queue.key)),
        running=queue.started_job_registry.count,
        scheduled=queue.scheduled_job_registry.count,
        failed=queue.failed_job_registry.count,
        oldest_queued_age_s=_age(oldest.enqueued_at, now) if oldest else None,
    )


@dataclass(frozen=True)
class _PendingClip:
    lane: Lane
    assemble_id: str
    assembling: bool
    source: str
    part: ClipPart
    counts: list[int] | None
    created_at: datetime


def _clips(connection: Redis, config: Config) -> tuple[list[ClipRow], int]:
    """The clips whose assemble job runs or waits for its chunks, at most CLIPS_SHOWN: live first, then
    those assembling, then the oldest; and how many more there are. Whatever the queue holds: three reads
    of each lane's registries, then one round trip for the shown clips' assemble and first chunk jobs and
    one for each of their chunk jobs' status and meta (HMGET, not the whole job)."""
    listed: list[tuple[Lane, str, bool]] = []
    total = 0
    for lane in LANES:
        queue = make_queue(connection, config, lane)
        running = [j for j in queue.started_job_registry.get_job_ids(cleanup=False) if is_assemble_job(j)]
        deferred = queue.deferred_job_registry
        waiting = [j for j in deferred.get_job_ids(0, CLIPS_SHOWN - 1, cleanup=False) if is_assemble_job(j)]
        listed += [(lane, j, True) for j in running] + [(lane, j, False) for j in waiting]
        total += len(running) + deferred.get_job_count(cleanup=False)
    listed = listed[:CLIPS_SHOWN]
    ids = [jid for _, jid, _ in listed]
    jobs = Job.fetch_many([*ids, *(chunk_job_ids(jid, 1)[0] for jid in ids)], connection, SERIALIZER)
    pending = []
    for (lane, jid, assembling), assemble, first in zip(listed, jobs[: len(ids)], jobs[len(ids) :], strict=True):
        part = _clip_part(assemble)
        source = job_source(assemble) if assemble is not None else None
        if assemble is None or part is None or part.part != "assemble" or source is None:
            continue  # over since the registry was read, or no clip's
        counts = _chunk_counts(part, _clip_part(first))
        created = assemble.created_at or datetime.now(UTC)
        pending.append(_PendingClip(lane, jid, assembling, source, part, counts, created))
    # The registry orders by the second a clip was enqueued; the job's own time orders clips of one second.
    pending.sort(key=lambda c: (LANES.index(c.lane), not c.assembling, c.created_at))
    with connection.pipeline(transaction=False) as pipe:
        for clip in pending:
            for chunk in chunk_job_ids(clip.assemble_id, clip.part.chunks):
                pipe.hmget(Job.key_for(chunk), "status", "meta")
        replies = iter(pipe.execute())
    clips = [_clip_row(clip, [next(replies) for _ in range(clip.part.chunks)]) for clip in pending]
    return clips, max(total - len(listed), 0)


def _clip_part(job: Job | None) -> ClipPart | None:
    """The clip a job is part of, or None for a job that is gone, not ours or not a clip's."""
    try:
        payload = job.args[0] if job is not None and job.args else None
    except Exception:  # rq decodes lazily: a pickled or foreign job fails here
        return None
    if not isinstance(payload, dict) or payload.get("clip") is None:
        return None
    try:
        return ClipPart.from_dict(payload["clip"])
    except PayloadError:
        return None


def _chunk_counts(clip: ClipPart, first: ClipPart | None) -> list[int] | None:
    """Each chunk's computed frames: the producer's plan made again, with the first chunk's size as the
    chunk size (every chunk has it but the last). None without the first chunk's job."""
    if first is None or first.part != "chunk" or first.count < 1:
        return None
    plan = plan_chunks(clip.frame_count, clip.every_nth, first.count)
    return [count for _, count in plan] if len(plan) == clip.chunks else None


# A chunk job over without its frames: the assemble then records the clip as failed.
_OVER_UNDONE = {JobStatus.FAILED.value, JobStatus.STOPPED.value, JobStatus.CANCELED.value}


def _clip_row(clip: _PendingClip, chunks: list[list[bytes | None]]) -> ClipRow:
    """A clip's row from its chunk jobs' (status, meta), in chunk order."""
    done = running = failed = frames_done = 0
    hosts: dict[str, int] = {}
    for index, (status, meta) in enumerate(chunks):
        state = status.decode() if status else None
        host = _host(meta)
        if state == JobStatus.FINISHED.value:
            done += 1
            frames = clip.counts[index] if clip.counts is not None else 0
            frames_done += frames
            if host is not None:
                hosts[host] = hosts.get(host, 0) + frames
        elif state == JobStatus.STARTED.value:
            running += 1
            if host is not None:
                hosts.setdefault(host, 0)
        elif state in _OVER_UNDONE:
            failed += 1
    return ClipRow(
        source=clip.source,
        lane=clip.lane,
        frames=clip.part.frames,
        frames_done=frames_done if clip.counts is not None else None,
        chunks=clip.part.chunks,
        chunks_done=done,
        chunks_running=running,
        chunks_failed=failed,
        hosts=dict(sorted(hosts.items())),
        assembling=clip.assembling,
    )


def _host(meta: bytes | None) -> str | None:
    """The host a chunk job ran on, as the worker's `stage` recorded it in job.meta."""
    try:
        host = SERIALIZER.loads(meta).get("host") if meta else None
    except (ValueError, AttributeError):
        return None
    return host if isinstance(host, str) else None


def _redis_full(connection: Redis) -> list[str]:
    """Read from Redis itself: when it is full, nobody can write an alert into it."""
    memory = connection.info("memory")
    limit, used = int(memory.get("maxmemory", 0)), int(memory.get("used_memory", 0))
    if not limit or used < limit:
        return []
    return [
        f"Redis full: {used / 2**20:.1f} MiB used of maxmemory {limit / 2**20:.1f} MiB "
        f"({memory.get('maxmemory_policy', '?')}); new photos wait on disk and workers wait. Raise maxmemory, "
        "or free memory (results waiting for a collector, old failed jobs: `depthq failed purge`)"
    ]


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.2f} s"
    return f"{value / 60:.1f} min"


def render(status: Status, console: Console) -> None:
    for alert in status.alerts:
        console.print(f"[bold red]{alert}[/bold red]")
    summary = Table(title=f"queue {status.queue}", show_header=False, title_justify="left")
    # The labels name hosts (inotify watches on <host>): the figures wrap instead.
    summary.add_column(style="bold", no_wrap=True)
    summary.add_column(justify="right", overflow="fold")
    live, backfill = status.lanes.get("live"), status.lanes.get("backfill")

    def by_lane(total: int, count: Callable[[LaneStatus], int]) -> str:
        if live is None or backfill is None:
            return str(total)
        return f"{total} ({count(live)} live, {count(backfill)} backfill)"

    summary.add_row("queued", by_lane(status.queued, lambda lane: lane.queued))
    summary.add_row("taken, not yet started", str(status.taken))
    summary.add_row("running", by_lane(status.running, lambda lane: lane.running))
    summary.add_row("waiting to retry", str(status.scheduled))
    failed = by_lane(status.failed, lambda lane: lane.failed)
    summary.add_row("failed", f"[red]{failed}[/red]" if status.failed else "0")
    summary.add_row("oldest queued", _seconds(status.oldest_queued_age_s))
    for host, (watches, folders) in sorted(status.watches.items()):
        short = "" if watches >= folders else " [red](some folders unwatched: see the watcher's log)[/red]"
        summary.add_row(f"inotify watches on {host}", f"{watches} for {folders} folder(s){short}")
    t = status.transit
    if t is not None:
        summary.add_row("in Redis (redis transport)", f"{t.jobs} job(s), {t.bytes / 2**20:.1f} MiB")
        summary.add_row("results to collect", str(t.results_waiting))
        collectors = ", ".join(f"{n} ({_seconds(s)} ago)" for n, s in sorted(t.collectors_idle_s.items()))
        summary.add_row("collectors", collectors or "[red]none has run[/red]")
    console.print(summary)
    if status.clips or status.clips_not_shown:
        console.print(_clips_table(status.clips, status.clips_not_shown))
    console.print(_workers_table(status.workers, console.width))

    rates = Table(title="throughput and latency", title_justify="left")
    # "last" rather than "window", and "5 min" rather than "last 5 min": 80 columns hold all seven.
    for column in ("last", "done", "jobs/min", "wait p50", "wait p95", "total p50", "total p95"):
        rates.add_column(column, justify="right", no_wrap=True)
    for win in status.windows:
        rates.add_row(
            f"{win.minutes} min",
            str(win.done),
            f"{win.jobs_per_min:.1f}",
            _seconds(win.queue_wait_p50_s),
            _seconds(win.queue_wait_p95_s),
            _seconds(win.total_p50_s),
            _seconds(win.total_p95_s),
        )
    console.print(rates)


# The photo column's least width in the full table: narrower, a path folds into a column of slivers.
_PHOTO_MIN = 20


def _clips_table(rows: list[ClipRow], more: int) -> Table:
    """One row per clip in progress: frames done of the clip's, its chunks, the hosts on it. The clip's
    name folds as a photo's does; each host is whole on a line of its own, as a worker's name is."""
    table = Table(
        title=f"{len(rows) + more} clip(s) in progress",
        title_justify="left",
        caption=f"and {more} more, not shown" if more else None,
        caption_justify="left",
    )
    table.add_column("clip", overflow="fold", min_width=_PHOTO_MIN)
    table.add_column("frames", justify="right", no_wrap=True)
    table.add_column("chunks")
    table.add_column("hosts", no_wrap=True)
    for clip in rows:
        if clip.assembling:
            chunks = Text("all done, assembling")
        else:
            chunks = Text(f"{clip.chunks_done}/{clip.chunks} done")
            if clip.chunks_running:
                chunks.append(f", {clip.chunks_running} running")
        if clip.chunks_failed:
            chunks.append(f", {clip.chunks_failed} failed", style="red")
        done = "?" if clip.frames_done is None else str(clip.frames_done)
        table.add_row(Text(clip.source), f"{done}/{clip.frames}", chunks, Text("\n".join(clip.hosts) or "-"))
    return table


def _worker_cells(w: WorkerRow) -> dict[str, str]:
    """Every column either table shows, as plain text (rich markup in a photo's name stays text)."""
    doing = w.stage or w.state
    return {
        "host": w.host,
        # The note on a line of its own, so that it does not widen the column much past the longest name.
        "worker": w.name + ("\nnot a depthq worker: stop it" if w.foreign else ""),
        "name": w.name,
        "backend": w.backend,
        "device": w.device,
        "state": w.state,
        "photo": w.source or "",
        "stage": w.stage or "",
        # The compact table's state, stage and photo in one column that folds: a busy worker's stage says
        # more than "busy", and a column of its own would leave the photo a sliver beside a long name.
        # A foreign worker's note goes here too, with its host (named short, as in a depthq worker's name).
        "doing": f"not a depthq worker, on {w.host.split('.')[0]}: stop it"
        if w.foreign
        else (f"{doing}: {w.source}" if w.source else doing),
        "running for": _seconds(w.job_age_s),
        "heartbeat": _seconds(w.heartbeat_age_s) + " ago" if w.heartbeat_age_s is not None else "-",
    }


_FULL = ("host", "worker", "backend", "device", "state", "photo", "stage", "running for", "heartbeat")
# A depthq worker's name is <host>.<backend>.<pid>: it says the host and the backend itself (a foreign
# worker's note says its host). The device is in --json.
_COMPACT = ("name", "doing", "running for", "heartbeat")
# A header no wider than what its column holds.
_COMPACT_HEADERS = {"name": "worker", "running for": "running"}
_FOLDING = ("photo", "doing")


def _fits(columns: tuple[str, ...], cells: list[dict[str, str]], width: int) -> bool:
    """Whether every column fits unfolded but the folding ones, which get _PHOTO_MIN each."""
    needed = 3 * len(columns) + 1  # a border per column and one more, one space of padding each side
    for column in columns:
        lines = [column, *(line for row in cells for line in row[column].splitlines())]
        needed += _PHOTO_MIN if column in _FOLDING else max(cell_len(line) for line in lines)
    return needed <= width


def _workers_table(rows: list[WorkerRow], width: int) -> Table:
    """One row per worker; names, times and states are never cut or folded: only the photo folds.

    The full nine columns from WIDE_CONSOLE on, where they fit the names at hand (a long host name can
    need more); else four, which fit 80 columns with the usual names.
    """
    cells = [_worker_cells(w) for w in rows]
    columns = _FULL if width >= WIDE_CONSOLE and _fits(_FULL, cells, width) else _COMPACT
    hosts = sorted({w.host for w in rows})
    table = Table(title=f"{len(rows)} worker(s) on {len(hosts)} host(s)", title_justify="left")
    headers = _COMPACT_HEADERS if columns is _COMPACT else {}
    for column in columns:
        fit = {"overflow": "fold"} if column in _FOLDING else {"no_wrap": True}
        table.add_column(headers.get(column, column), **fit)
    for w, row in zip(rows, cells, strict=True):
        texts = {column: Text(row[column]) for column in columns}
        if w.foreign:
            for column in ("worker", "doing"):
                if column in texts:
                    texts[column].highlight_regex(r"not a depthq worker.*", "red")
        table.add_row(*texts.values())
    return table
