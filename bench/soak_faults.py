"""The soak's faults, one at a time: what each does to the running service, and when it counts as recovered.

Every fault is real: a signal to a real process, a real tmpfs filled to ENOSPC. Each one puts its
start and end on the timeline, and waits (bounded) for the service to recover, by a definition
stated with the fault (`Fault.recovered_when`), measured from the fault's end, the moment the soak
stops inflicting it. A fault that takes a photo out of the soak's hands (a probe) drops it while the
fault is on, so that recovery means "a photo that arrived during the fault has its output".

A fault the service does not recover from within `recover_timeout_s` is a failure; where the soak
cannot go on otherwise (Redis dead for good), it restarts `depthq up` itself, says so on the
timeline, and goes on to the next fault.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from redis.exceptions import RedisError
from rq.job import Job

from bench.soak_load import Load
from bench.soak_record import Timeline
from bench.soak_service import LEFTOVER_GRACE_S, Service, ServiceError, Tmpfs, describe, wait_until
from depthq.clip_jobs import is_assemble_job, is_clip_job
from depthq.contract import SERIALIZER, finished_kind

# A burst asked for before a worker fault, so that the worker hit is most likely in the middle of a job.
BUSY_BURST = 20
BUSY_WAIT_S = 10.0


@dataclass(frozen=True)
class FaultSettings:
    workers: int
    stop_s: float  # how long worker-stop keeps a worker stopped
    disk_full_s: float  # how long disk-full keeps the output tmpfs full
    recover_timeout_s: float  # the bound on every recovery wait


@dataclass
class FaultContext:
    service: Service
    load: Load
    timeline: Timeline
    tmpfs: Tmpfs
    watch: Path
    output: Path
    settings: FaultSettings


@dataclass
class FaultRun:
    """One fault as it happened: times in seconds since the soak started."""

    name: str
    start: float
    end: float | None = None
    recovered: float | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    # Worker pids the fault hit (killed or stopped): a photo computed again after it is excused.
    workers_hit: set[int] = field(default_factory=set)
    # The fault hit every worker at once (depthq up or Redis killed under them).
    hit_all: bool = False

    @property
    def recovery_s(self) -> float | None:
        if self.recovered is None or self.end is None:
            return None
        return max(0.0, self.recovered - self.end)


@dataclass(frozen=True)
class Fault:
    inflict: Callable[[FaultContext], FaultRun]
    recovered_when: str  # the definition of recovery the table prints


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _describe_pid(pid: int) -> str:
    try:
        return describe(psutil.Process(pid))
    except psutil.Error:
        return f"pid {pid}"


def _photo_done(ctx: FaultContext, source: str | None) -> bool:
    """The photo has its output (sidecar or error file) for what is on disk now; a photo since gone counts."""
    if source is None:
        return True
    try:
        st = (ctx.watch / source).stat()
    except FileNotFoundError:
        return True
    return finished_kind(ctx.output, source, st) is not None


def _workers_back(ctx: FaultContext, hit: set[int]) -> bool:
    """As many live, running workers registered as configured, none of them one the fault hit."""
    workers = ctx.service.registered()
    running = [w for w in workers if w.pid not in hit and not _stopped(w.pid)]
    return len(running) >= ctx.settings.workers


def _stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def _busy_worker(ctx: FaultContext) -> tuple[int | None, str | None, str | None]:
    """A worker in the middle of a job (pid, job id, its photo), after asking the load for a burst;
    an idle one (pid, None, None) if none gets busy in time."""
    ctx.load.burst_now(BUSY_BURST)
    found: list[tuple[int, str]] = []

    def busy() -> bool:
        for w in ctx.service.registered():
            with contextlib.suppress(RedisError):
                jid = w.get_current_job_id()
                if jid:
                    found.append((w.pid, jid))
                    return True
        return False

    if wait_until(busy, BUSY_WAIT_S, poll_s=0.01) is None:
        pids = ctx.service.worker_pids()
        return (pids[0] if pids else None), None, None
    pid, jid = found[-1]
    source = None
    client = ctx.service.redis()
    with contextlib.suppress(Exception):  # a job that ended meanwhile, or not depthq's
        assert client is not None
        source = Job.fetch(jid, connection=client, serializer=SERIALIZER).args[0]["source"]
    return pid, jid, source


def _finish(ctx: FaultContext, run: FaultRun, recovered: Callable[[], bool], what: str) -> FaultRun:
    """Wait (bounded) for `recovered`, from the fault's end; a failure naming `what` if it never comes."""
    took = wait_until(recovered, ctx.settings.recover_timeout_s, poll_s=0.1)
    if took is None:
        run.failures.append(f"{run.name}: not recovered within {ctx.settings.recover_timeout_s:.0f} s: {what}")
        ctx.timeline.add(f"{run.name}: NOT recovered within {ctx.settings.recover_timeout_s:.0f} s ({what})")
    else:
        run.recovered = ctx.timeline.now()
        ctx.timeline.add(f"{run.name}: recovered, {run.recovery_s:.1f} s after the fault's end")
    return run


def _restart(ctx: FaultContext, run: FaultRun, why: str) -> None:
    """Start `depthq up` again after the soak stopped it (or, to go on, after a fault it did not survive)."""
    try:
        ctx.service.start(why)
    except ServiceError as exc:
        run.failures.append(f"{run.name}: depthq up did not start again: {exc}")


def _kill(ctx: FaultContext, name: str, pid: int, doing: str, source: str | None, what: str) -> FaultRun:
    """SIGKILL a busy worker; recovered once as many workers are registered again and `source` (the
    photo or clip it held) has its output."""
    run = FaultRun(name, ctx.timeline.add(f"{name}: SIGKILL worker pid {pid} ({doing})"))
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    run.end, run.workers_hit = run.start, {pid}
    return _finish(
        ctx,
        run,
        lambda: _workers_back(ctx, {pid}) and _photo_done(ctx, source),
        f"{ctx.settings.workers} workers registered again, and {what} done",
    )


def worker_kill(ctx: FaultContext) -> FaultRun:
    pid, jid, source = _busy_worker(ctx)
    if pid is None:
        return FaultRun("worker-kill", ctx.timeline.now(), failures=["worker-kill: no worker to kill"])
    return _kill(ctx, "worker-kill", pid, f"job {jid}, {source}", source, source or "no photo")


def clip_chunk_kill(ctx: FaultContext) -> FaultRun:
    """SIGKILL a worker in the middle of a clip's chunk: a long clip is written, and the first worker seen
    on one of its chunk jobs is killed."""
    source = ctx.load.clip_now()
    found: list[tuple[int, str]] = []

    def on_chunk() -> bool:
        for w in ctx.service.registered():
            with contextlib.suppress(RedisError):
                jid = w.get_current_job_id()
                if jid and is_clip_job(jid) and not is_assemble_job(jid):
                    found.append((w.pid, jid))
                    return True
        return False

    if wait_until(on_chunk, BUSY_WAIT_S * 3, poll_s=0.01) is None:
        return FaultRun(
            "clip-chunk-kill", ctx.timeline.now(), failures=[f"clip-chunk-kill: no worker on a chunk of {source}"]
        )
    pid, jid = found[-1]
    return _kill(ctx, "clip-chunk-kill", pid, f"chunk {jid}, {source}", source, f"the clip {source}")


def worker_stop(ctx: FaultContext) -> FaultRun:
    pid, jid, source = _busy_worker(ctx)
    if pid is None:
        return FaultRun("worker-stop", ctx.timeline.now(), failures=["worker-stop: no worker to stop"])
    run = FaultRun(
        "worker-stop",
        ctx.timeline.add(
            f"worker-stop: SIGSTOP worker pid {pid} for {ctx.settings.stop_s:.0f} s (job {jid}, {source})"
        ),
    )
    run.workers_hit = {pid}
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    time.sleep(ctx.settings.stop_s)  # the fault's own length, not a wait for anything
    try:
        os.kill(pid, signal.SIGCONT)
        run.notes.append("still alive at SIGCONT")
    except ProcessLookupError:
        run.notes.append("killed by depthq up while stopped")
    run.end = ctx.timeline.add(f"worker-stop: SIGCONT worker pid {pid} ({run.notes[-1]})")
    return _finish(
        ctx,
        run,
        lambda: _workers_back(ctx, set()) and _photo_done(ctx, source),
        f"{ctx.settings.workers} running workers registered, and {source or 'no photo'} done",
    )


def redis_kill(ctx: FaultContext) -> FaultRun:
    pid = ctx.service.redis_pid()
    if pid is None:
        return FaultRun("redis-kill", ctx.timeline.now(), failures=["redis-kill: no embedded redis-server found"])
    run = FaultRun("redis-kill", ctx.timeline.add(f"redis-kill: SIGKILL redis-server pid {pid}"), hit_all=True)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    run.end = run.start
    probe = ctx.load.probe("redis-kill")
    _finish(
        ctx,
        run,
        lambda: ctx.service.redis_answers() and _photo_done(ctx, probe),
        f"a Redis answering at redis.url, and {probe} (dropped while Redis was down) done",
    )
    if run.recovered is None:
        # The service cannot go on without a Redis: the soak restarts it to test the other faults.
        ctx.timeline.add("redis-kill: the soak restarts depthq up itself, to go on")
        code, _ = ctx.service.stop(signal.SIGTERM, timeout_s=10)
        if code is None:
            ctx.service.kill()
        ctx.service.end_leftovers(grace_s=10)
        _restart(ctx, run, "the soak's repair after redis-kill")
        run.notes.append("restarted by the soak")
    return run


def disk_full(ctx: FaultContext) -> FaultRun:
    ctx.load.burst_now(BUSY_BURST // 2)
    filled = ctx.tmpfs.fill()
    run = FaultRun(
        "disk-full",
        ctx.timeline.add(
            f"disk-full: output tmpfs filled ({filled / 2**20:.0f} MiB filler, {ctx.tmpfs.free_bytes()} bytes free)"
        ),
    )
    try:
        probe = ctx.load.probe("disk-full")
        time.sleep(ctx.settings.disk_full_s)  # the fault's own length
        if _photo_done(ctx, probe):
            run.failures.append(f"disk-full: {probe} has an output although the disk was full (is it an error file?)")
    finally:
        ctx.tmpfs.unfill()
    run.end = ctx.timeline.add(f"disk-full: filler removed ({ctx.tmpfs.free_bytes() / 2**20:.0f} MiB free)")
    return _finish(ctx, run, lambda: _photo_done(ctx, probe), f"{probe} (dropped while the disk was full) done")


def _old_processes(ctx: FaultContext) -> list[int]:
    pids = ctx.service.worker_pids()
    redis = ctx.service.redis_pid()
    return [*pids, *([redis] if redis is not None else [])]


def _after_stop(ctx: FaultContext, run: FaultRun, old: list[int]) -> None:
    """Wait for the stopped service's processes to go; a failure, and SIGKILL, for any that stay."""
    took = wait_until(lambda: all(_gone(p) for p in old), LEFTOVER_GRACE_S, poll_s=0.05)
    if took is None:
        alive = [_describe_pid(p) for p in old if not _gone(p)]
        run.failures.append(
            f"{run.name}: still alive {LEFTOVER_GRACE_S:.0f} s after depthq up went: {'; '.join(alive)}"
        )
    else:
        run.notes.append(f"workers and redis gone {took:.1f} s after")
        ctx.timeline.add(f"{run.name}: the old workers and redis-server gone after {took:.1f} s")
    ctx.service.end_leftovers(grace_s=1)


def up_kill(ctx: FaultContext) -> FaultRun:
    old = _old_processes(ctx)
    pid = ctx.service.proc.pid if ctx.service.proc is not None else None
    run = FaultRun("up-kill", ctx.timeline.add(f"up-kill: SIGKILL depthq up pid {pid} (its processes {old})"))
    run.workers_hit, run.hit_all = set(old), True
    ctx.service.kill()
    _after_stop(ctx, run, old)
    probe = ctx.load.probe("up-kill")
    run.end = ctx.timeline.now()
    _restart(ctx, run, "after up-kill")
    return _finish(ctx, run, lambda: _photo_done(ctx, probe), f"{probe} (dropped while depthq up was down) done")


def up_term(ctx: FaultContext) -> FaultRun:
    old = _old_processes(ctx)
    pid = ctx.service.proc.pid if ctx.service.proc is not None else None
    run = FaultRun("up-term", ctx.timeline.add(f"up-term: SIGTERM depthq up pid {pid}"))
    code, took = ctx.service.stop(signal.SIGTERM)
    if code is None:
        run.failures.append(f"up-term: depthq up still running {took:.0f} s after SIGTERM:\n{ctx.service.tail()}")
        ctx.service.kill()
    elif code != 0:
        run.failures.append(f"up-term: depthq up exited with code {code} after SIGTERM:\n{ctx.service.tail()}")
    ctx.timeline.add(f"up-term: depthq up exited with code {code} in {took:.1f} s")
    run.notes.append(f"exit {code} in {took:.1f} s")
    _after_stop(ctx, run, old)
    probe = ctx.load.probe("up-term")
    run.end = ctx.timeline.now()
    _restart(ctx, run, "after up-term")
    return _finish(ctx, run, lambda: _photo_done(ctx, probe), f"{probe} (dropped while depthq up was down) done")


FAULTS: dict[str, Fault] = {
    "worker-kill": Fault(
        worker_kill,
        "SIGKILL (end = the kill) until N workers are registered again and the photo the killed worker held has "
        "its output",
    ),
    "worker-stop": Fault(
        worker_stop,
        "SIGSTOP, SIGCONT after the stop (end = SIGCONT) until N running workers are registered and the photo "
        "the stopped worker held has its output",
    ),
    "redis-kill": Fault(
        redis_kill,
        "SIGKILL the embedded redis-server (end = the kill) until a Redis answers at redis.url and a photo dropped "
        "right after the kill has its output",
    ),
    "disk-full": Fault(
        disk_full,
        "output tmpfs full (end = filler removed) until a photo dropped while it was full has its output",
    ),
    "up-kill": Fault(
        up_kill,
        "SIGKILL depthq up, wait for its workers and Redis to go, start it again (end = the restart) until a "
        "photo dropped while it was down has its output",
    ),
    "up-term": Fault(
        up_term,
        "SIGTERM depthq up, wait for its exit, start it again (end = the restart) until a photo dropped while "
        "it was down has its output",
    ),
    "clip-chunk-kill": Fault(
        clip_chunk_kill,
        "SIGKILL a worker one frame into a clip's chunk (end = the kill) until N workers are registered again and "
        "the clip has its output",
    ),
}
