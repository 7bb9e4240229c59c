"""How every end-to-end, watcher, copy, transport and fault test ends: with the system's end state.

A soak once lost 33 of 1,981 photos while every test passed: the tests checked the files written, not
the system afterwards. So a test that runs jobs ends with `assert_end_state`: every job finished,
nothing failed but the test's own bad inputs, nothing waits (to run, to retry, for the collector, as a
copy of another job), no temporary file or clip staging folder is left in the output, and the service,
if one runs, is still up. `settle` first waits (bounded) for a running service to get there.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path

from redis import Redis
from rq.exceptions import DeserializationError
from rq.job import Job, JobStatus
from rq.registry import DeferredJobRegistry, FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from depthq.clip_jobs import is_staging_name
from depthq.config import Config
from depthq.contract import (
    LANES,
    SERIALIZER,
    aliases_key,
    inflight_key,
    lane_queue_name,
    make_queue,
    photo_key,
    result_key,
    results_stream,
    taking_pattern,
)
from depthq.files import is_temp_name
from testkit.waiting import wait_for

_PENDING = {JobStatus.QUEUED.value, JobStatus.STARTED.value, JobStatus.SCHEDULED.value, JobStatus.DEFERRED.value}


def _keys(connection: Redis, pattern: str) -> list[str]:
    return sorted(k.decode() for k in connection.scan_iter(match=pattern, count=1000))


def waiting(config: Config, connection: Redis) -> list[str]:
    """Everything that still waits, in words: an empty list means the system has settled."""
    q = config.queue.name
    out: list[str] = []
    for lane in LANES:
        queue = make_queue(connection, config, lane)
        name = lane_queue_name(q, lane)
        if queue.count:
            out.append(f"{queue.count} job(s) queued on {name}")
        for registry, what in (
            (StartedJobRegistry(name, connection=connection), "running"),
            (ScheduledJobRegistry(name, connection=connection), "waiting to retry"),
            (DeferredJobRegistry(name, connection=connection), "deferred"),
        ):
            ids = registry.get_job_ids(cleanup=False)  # looking must not move abandoned jobs on
            if ids:
                out.append(f"{len(ids)} job(s) {what} on {name}: {ids[:5]}")
    for key in _keys(connection, taking_pattern(q)):
        out.append(f"{key}: {connection.lrange(key, 0, -1)}")
    for key in _keys(connection, "rq:job:*"):
        if key.count(":") != 2:
            continue  # rq's per-job keys (dependents, executions), not a job's hash
        status = connection.hget(key, "status")
        if status is not None and status.decode() in _PENDING:
            out.append(f"{key} is {status.decode()}")
    for key in _keys(connection, aliases_key(q, "*")):
        out.append(f"{key}: copies still waiting for their job: {connection.smembers(key)}")
    if connection.exists(results_stream(q)) and connection.xlen(results_stream(q)):
        out.append(f"{connection.xlen(results_stream(q))} result(s) waiting for the collector")
    for pattern in (result_key(q, "*"), photo_key(q, "*")):
        out.extend(f"{key} still in Redis" for key in _keys(connection, pattern))
    if connection.hlen(inflight_key(q)):
        out.append(f"in-flight entries left: {connection.hgetall(inflight_key(q))}")
    return out


def failed_sources(config: Config, connection: Redis) -> dict[str, str]:
    """The photos of the jobs in the failed registries (both lanes), with the end of each one's error."""
    out: dict[str, str] = {}
    for lane in LANES:
        registry = FailedJobRegistry(lane_queue_name(config.queue.name, lane), connection=connection)
        for jid in registry.get_job_ids():
            job = Job.fetch(jid, connection=connection, serializer=SERIALIZER)
            try:
                args = job.args
            except DeserializationError:
                args = ()  # a pickled or foreign job: named by its id
            source = args[0].get("source", jid) if args and isinstance(args[0], dict) else jid
            out[source] = (job.latest_result().exc_string if job.latest_result() else "").strip()[-300:]
    return out


def temporary_files(root: Path) -> list[Path]:
    """depthq's temporary files anywhere under `root`."""
    return sorted(p for p in root.rglob("*") if p.is_file() and is_temp_name(p.name)) if root.exists() else []


def staging_folders(root: Path) -> list[Path]:
    """Clips' staging folders anywhere under `root`: each goes once its clip is assembled, or is over."""
    return sorted(p for p in root.rglob("*") if p.is_dir() and is_staging_name(p.name)) if root.exists() else []


def assert_end_state(
    config: Config,
    connection: Redis,
    bad: Iterable[str] = (),
    service: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """The system has settled as it should: see the module's docstring. `bad` names the test's bad
    inputs (sources relative to the watch root), the only photos whose jobs may have failed."""
    where = f" (log: {log})" if log is not None else ""
    if service is not None:
        assert service.poll() is None, f"the service exited by itself with {service.returncode}{where}"
    left = waiting(config, connection)
    assert not left, f"still waiting: {left}{where}"
    failed = failed_sources(config, connection)
    unexpected = {source: why for source, why in failed.items() if source not in set(bad)}
    assert not unexpected, f"jobs failed that are no bad input: {unexpected}{where}"
    temps = temporary_files(config.output.dir)
    assert not temps, f"temporary files left in the output: {temps}{where}"
    staging = staging_folders(config.output.dir)
    assert not staging, f"clip staging folders left in the output: {staging}{where}"


def settle(
    config: Config,
    connection: Redis,
    bad: Iterable[str] = (),
    service: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    timeout: float = 60.0,
) -> None:
    """Wait until nothing waits any more (the deadline bounds a failure only), then `assert_end_state`."""
    try:
        wait_for(lambda: not waiting(config, connection), "the system to settle", timeout)
    except AssertionError:
        where = f" (log: {log})" if log is not None else ""
        raise AssertionError(f"not settled after {timeout} s: {waiting(config, connection)}{where}") from None
    assert_end_state(config, connection, bad, service, log)
