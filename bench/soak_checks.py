"""The soak's end: drain, then every end state it asserts, each a `Check` that names the files it failed on.

- drain: nothing queued, running, waiting to retry, deferred or waiting for the collector in Redis,
  and every photo in the ledger done; bounded, with what is stuck when it never settles;
- copies settled: no copy left waiting for a job's result (an `aliases` set) once it has drained;
- audit: `depthq audit --json` reports 0 lost, stale, partial, duplicated, temporary and `both`;
- outputs: every good file still there has a sidecar recording its current size, mtime and sha256,
  every bad one an error file (the soak's own ledger, needing no audit);
- failed jobs: rq's failed registries (both lanes) hold only jobs of bad files, or of files gone;
- computed once: from the workers' `worker.job` log lines, no (photo, job) computed twice, unless a
  fault hit the worker of the first computation between the two;
- stayed up: `depthq up` never exited by itself.
The final stop (nothing left behind, the tmpfs unmounts) is checked by the soak as it ends.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry

from bench.soak_faults import FaultRun
from bench.soak_record import Entry, Ledger, Timeline, file_digest
from bench.soak_service import Service
from depthq.contract import LANES, SERIALIZER, aliases_key, lane_queue_name, output_path, results_stream

# Audit counts that must be 0 at the end.
AUDIT_ZERO = ("lost", "stale", "partial", "duplicated", "temporary", "both")
# Files named per failing check in the report; the rest are counted.
SHOWN = 25
# One line per computed photo, from logger `worker.job`: `<source>: depth <min>-<max> m, <timings> ms (job <id>)`.
# A photo computed, or a clip assembled (its chunks may run again after a fault; its assemble once).
COMPUTED = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ +\S*\[(?P<pid>\d+)\] worker\.(?:job|clip_assembly): "
    r"(?P<source>.+): (?:depth \S+-\S+ m|clip of \d+ frames assembled, .*), \{.*\} ms(?: \(job (?P<job>[^)\s]+)\))?$"
)
_POLL_S = 1.0
_PENDING = {s.value for s in (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED)}


@dataclass
class Check:
    name: str
    ok: bool
    summary: str
    details: list[str] = field(default_factory=list)


def _shown(lines: list[str]) -> list[str]:
    return lines[:SHOWN] + ([f"... and {len(lines) - SHOWN} more"] if len(lines) > SHOWN else [])


# ------------------------------------------------------------------------------------------ drain


def backlog(client: Redis, queue_name: str) -> dict[str, list[str]]:
    """What is not over yet, in each state, both lanes: job ids queued, running (in the started
    registries), waiting to retry, deferred; jobs whose own status still says pending wherever they
    are (taken from a queue but not started, a dead worker's job nobody cleaned up); results waiting
    for the collector. (Copies waiting for a job are `leftover_copies`: the service may well have
    settled around one that nothing will ever take.)

    Read straight from the keys: rq's `count` runs its registries' cleanup, which would change what
    it measures (abandoned jobs moved to failed by the soak instead of by the service)."""
    out: dict[str, list[str]] = {
        "queued": [],
        "running": [],
        "scheduled": [],
        "deferred": [],
        "pending": [],
        "collecting": [],
    }
    for lane in LANES:
        queue = Queue(lane_queue_name(queue_name, lane), connection=client, serializer=SERIALIZER)
        out["queued"] += [j.decode() for j in client.lrange(queue.key, 0, -1)]
        out["running"] += [j.decode().split(":")[0] for j in client.zrange(queue.started_job_registry.key, 0, -1)]
        out["scheduled"] += [j.decode() for j in client.zrange(queue.scheduled_job_registry.key, 0, -1)]
        out["deferred"] += [j.decode() for j in client.zrange(queue.deferred_job_registry.key, 0, -1)]
    keys = [k for k in client.scan_iter(match=Job.key_for("*"), count=1000) if k.count(b":") == 2]
    with client.pipeline(transaction=False) as look:
        for key in keys:
            look.hget(key, "status")
        statuses = look.execute()
    out["pending"] = [
        k.decode().rsplit(":", 1)[1] for k, s in zip(keys, statuses, strict=True) if s and s.decode() in _PENDING
    ]
    stream = results_stream(queue_name)
    if client.exists(stream):
        out["collecting"] = [fields.get(b"job", b"?").decode() for _, fields in client.xrange(stream, "-", "+")]
    return out


def _job_source(client: Redis, jid: str) -> str:
    try:
        return str(Job.fetch(jid, connection=client, serializer=SERIALIZER).args[0]["source"])
    except Exception as exc:  # gone meanwhile, or not depthq's
        return f"? ({type(exc).__name__})"


def stamp(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime": int(st.st_mtime)}


def _output(output: Path, rel: str, kind: str) -> Path | None:
    """Where the service writes this output (its own naming, long names included); None if it names none."""
    try:
        return output_path(output, rel, kind)
    except ValueError:
        return None


def _read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def unfinished(ledger: Ledger, output: Path) -> list[Entry]:
    """Present files whose output (sidecar or error file) does not record their current stat."""
    out = []
    for entry in ledger.present():
        try:
            now = stamp(ledger.path(entry.rel).stat())
        except OSError:
            out.append(entry)
            continue
        records = [_read_json(_output(output, entry.rel, k)) for k in ("json", "error")]
        if not any(r is not None and r.get("source_stat") == now for r in records):
            out.append(entry)
    return out


def drain(
    service: Service,
    ledger: Ledger,
    output: Path,
    queue_name: str,
    timeout_s: float,
    idle_grace_s: float,
    stall_s: float,
) -> Check:
    """Wait until Redis holds nothing in progress and every file is done; or, once Redis has been idle
    for `idle_grace_s` (a rescan's worth) with files still not done, stop waiting: the checks after
    this one name them. Fails, naming what is stuck, when Redis does not go idle within `timeout_s`,
    or when what it holds has not changed for `stall_s` (nothing will move it any more)."""
    t0 = time.monotonic()
    idle_since: float | None = None
    last: dict[str, list[str]] | None = None
    seen: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    changed = t0
    while True:
        client = service.redis()
        try:
            last = backlog(client, queue_name) if client is not None else None
        except RedisError:
            last = None
        now = time.monotonic()
        signature = None if last is None else tuple((k, tuple(sorted(v))) for k, v in last.items())
        if signature != seen:
            seen, changed = signature, now
        if last is not None and not any(last.values()):
            idle_since = idle_since or now
            left = unfinished(ledger, output)
            if not left and now - idle_since >= _POLL_S:
                return Check("drain", True, f"settled in {now - t0:.0f} s: Redis idle, every file done")
            if now - idle_since >= idle_grace_s:
                return Check(
                    "drain",
                    True,
                    f"Redis idle for {idle_grace_s:.0f} s after {now - t0 - idle_grace_s:.0f} s, with {len(left)} "
                    "file(s) still without output (see outputs)",
                )
        else:
            idle_since = None
            if now - changed > stall_s:
                return _stuck(service, last, f"stuck: nothing moved in Redis for {stall_s:.0f} s")
        if now - t0 > timeout_s:
            return _stuck(service, last, f"did not settle in {timeout_s:.0f} s")
        time.sleep(_POLL_S)


def _stuck(service: Service, last: dict[str, list[str]] | None, why: str) -> Check:
    if last is None:
        return Check("drain", False, f"{why}: Redis does not answer at redis.url")
    details = []
    client = service.redis()
    for state, jids in last.items():
        for jid in jids[:SHOWN]:
            details.append(f"{state}: job {jid} ({_job_source(client, jid) if client is not None else '?'})")
    counts = ", ".join(f"{state} {len(jids)}" for state, jids in last.items() if jids)
    return Check("drain", False, f"{why}: {counts}", details)


def leftover_copies(client: Redis | None, queue_name: str, watch: Path) -> Check:
    """After the drain, no copy still waits for a job (`aliases` sets): each was either given the job's
    result, or a job of its own. One left behind waits for a result nothing will write."""
    if client is None:
        return Check("copies settled", False, "Redis does not answer: the copies waiting cannot be read")
    details = []
    try:
        for key in client.scan_iter(match=aliases_key(queue_name, "*"), count=1000):
            jid = key.decode().rsplit(":", 1)[1]
            copies = sorted(m.decode() for m in client.smembers(key))
            there = [f"{c} ({'there' if (watch / c).exists() else 'no such file'})" for c in copies]
            details.append(
                f"job {jid} ({_job_source(client, jid)}), ttl {client.ttl(key)} s: copies {', '.join(there)}"
            )
    except RedisError as exc:
        return Check("copies settled", False, f"Redis error reading the copies waiting: {exc}")
    return Check("copies settled", not details, f"{len(details)} job(s) with copies still waiting", _shown(details))


# ------------------------------------------------------------------------------------------ audit


def audit(depthq: Path, config_file: Path, cwd: Path) -> tuple[Check, dict[str, int]]:
    """`depthq audit --config FILE --json` (the service's own view), held to 0 of each kind in AUDIT_ZERO."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
    try:
        result = subprocess.run(
            [str(depthq), "audit", "--config", str(config_file), "--json"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("audit", False, f"audit: did not run ({exc})"), {}
    if result.returncode == 2 and "invalid choice" in result.stderr:
        return Check("audit", False, "audit: not available (`depthq audit` does not exist in this depthq)"), {}
    try:
        report = json.loads(result.stdout)
        counts = {k: int(v) for k, v in report["counts"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        return Check("audit", False, f"audit: exit {result.returncode}, no JSON report", tail), {}
    missing = [k for k in AUDIT_ZERO if k not in counts]
    nonzero = {k: counts[k] for k in AUDIT_ZERO if counts.get(k)}
    details = [f"counts missing from the report: {missing}"] if missing else []
    items = report.get("items") or {}
    for kind in nonzero:
        for item in (items.get(kind) or [])[:SHOWN]:
            rest = {k: v for k, v in item.items() if k != "source"} if isinstance(item, dict) else {}
            details.append(f"{kind}: {item.get('source') if isinstance(item, dict) else item} {rest or ''}".rstrip())
    ok = not nonzero and not missing and result.returncode == 0 and report.get("ok") is True
    summary = ", ".join(f"{k} {counts.get(k, '?')}" for k in AUDIT_ZERO)
    if not nonzero and not missing and not ok:
        summary += f" (but exit {result.returncode}, ok {report.get('ok')})"
    return Check("audit", ok, f"audit: {summary}", details), counts


# ------------------------------------------------------------------------------------------ outputs


def _describe_error(output: Path, rel: str) -> str:
    error = _read_json(_output(output, rel, "error"))
    if error is None:
        return "no error file either"
    what = error.get("error") or {}
    return f"error file: {what.get('type')}: {str(what.get('message'))[:200]}"


def outputs(ledger: Ledger, output: Path) -> Check:
    """Every good file still there has a sidecar for exactly its current content; every bad one an error file."""
    problems: list[str] = []
    failed_by_pattern: Counter[str] = Counter()
    present = ledger.present()
    for entry in present:
        path = ledger.path(entry.rel)
        try:
            sha, st = file_digest(path)
        except OSError as exc:
            problems.append(f"{entry.rel} [{entry.pattern}]: the soak's own file cannot be read ({exc})")
            failed_by_pattern[entry.pattern] += 1
            continue
        now = stamp(st)
        if sha != entry.sha256 or now != {"size": entry.size, "mtime": int(entry.mtime)}:
            problems.append(f"{entry.rel} [{entry.pattern}]: differs from the soak's ledger (a harness bug)")
        problem = None
        if entry.bad:
            error = _read_json(_output(output, entry.rel, "error"))
            if error is None:
                sidecar = _read_json(_output(output, entry.rel, "json"))
                problem = "bad file without an error file" + (" (it has a sidecar)" if sidecar else "")
            elif "source_stat" in error and error["source_stat"] != now:
                problem = f"error file records {error['source_stat']}, the file is {now}"
        else:
            sidecar = _read_json(_output(output, entry.rel, "json"))
            if sidecar is None:
                problem = f"no sidecar; {_describe_error(output, entry.rel)}"
            elif sidecar.get("source_stat") != now:
                problem = f"sidecar records {sidecar.get('source_stat')}, the file is {now}"
            elif sidecar.get("sha256") != sha:
                problem = f"sidecar sha256 {str(sidecar.get('sha256'))[:12]}..., the file's {sha[:12]}..."
        if problem is not None:
            problems.append(f"{entry.rel} [{entry.pattern}]: {problem}")
            failed_by_pattern[entry.pattern] += 1
    by_pattern = ", ".join(f"{p} {n}" for p, n in failed_by_pattern.most_common())
    summary = f"{len(present) - sum(failed_by_pattern.values())} of {len(present)} files as expected"
    return Check(
        "outputs",
        not problems,
        summary + (f"; failing by pattern: {by_pattern}" if by_pattern else ""),
        _shown(problems),
    )


# ------------------------------------------------------------------------------------------ failed jobs


def failed_jobs(client: Redis | None, ledger: Ledger, queue_name: str) -> Check:
    """rq's failed registries, both lanes, hold only jobs of bad files (or of files deleted or moved away)."""
    if client is None:
        return Check("failed jobs", False, "Redis does not answer: the failed registries cannot be read")
    entries = {e.rel: e for e in ledger.all()}
    problems, allowed = [], 0
    try:
        for lane in LANES:
            name = lane_queue_name(queue_name, lane)
            registry = FailedJobRegistry(name, connection=client, serializer=SERIALIZER)
            for jid in registry.get_job_ids(cleanup=False):
                try:
                    job = Job.fetch(jid, connection=client, serializer=SERIALIZER)
                    payload = job.args[0]
                    source = str(payload["source"])
                except Exception as exc:
                    problems.append(f"{name}: job {jid}: cannot read its payload ({type(exc).__name__}: {exc})")
                    continue
                entry = entries.get(source)
                if entry is not None and (entry.bad or not entry.present):
                    allowed += 1
                    continue
                why = _last_error(job)
                if entry is None:
                    problems.append(f"{name}: job {jid} for {source}, a file the soak never wrote: {why}")
                    continue
                version = "its current content" if payload.get("sha256") == entry.sha256 else "an older content"
                problems.append(f"{name}: job {jid} for {source} [{entry.pattern}], a good file ({version}): {why}")
    except RedisError as exc:
        return Check("failed jobs", False, f"Redis error reading the failed registries: {exc}")
    summary = f"{allowed} failed job(s) of bad or vanished files; {len(problems)} of good files"
    return Check("failed jobs", not problems, summary, _shown(problems))


def _last_error(job: Job) -> str:
    try:
        result = job.latest_result()
        text = (result.exc_string if result is not None else None) or job.exc_info or ""
    except Exception:
        text = job.exc_info or ""
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no error recorded)"


# ------------------------------------------------------------------------------------------ computed once


@dataclass(frozen=True)
class Computation:
    at: float  # seconds since the soak started
    pid: int
    source: str
    job: str | None
    log: str


def computations(logs: list[Path], timeline: Timeline) -> list[Computation]:
    found = []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            m = COMPUTED.match(line)
            if m is None:
                continue
            wall = datetime.strptime(m["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            found.append(Computation(timeline.wall_to_soak(wall), int(m["pid"]), m["source"], m["job"], log.name))
    return sorted(found, key=lambda c: c.at)


def _excused(first: Computation, again: Computation, faults: list[FaultRun]) -> FaultRun | None:
    """The fault that hit the first computation's worker between the two, if one did."""
    for run in faults:
        if (run.hit_all or first.pid in run.workers_hit) and first.at - 2.0 <= run.start <= again.at:
            return run
    return None


def computed_once(logs: list[Path], timeline: Timeline, ledger: Ledger, faults: list[FaultRun]) -> Check:
    """No photo computed twice for one job. Keyed by (photo, job id) when the log lines name the job;
    else by photo, allowed once per good content the name held."""
    found = computations(logs, timeline)
    with_job = any(c.job for c in found)
    groups: dict[tuple[str, str | None], list[Computation]] = defaultdict(list)
    for c in found:
        groups[(c.source, c.job if with_job else None)].append(c)
    entries = {e.rel: e for e in ledger.all()}
    problems, excused = [], []
    for (source, job), comps in groups.items():
        entry = entries.get(source)
        allowed = 1 if with_job else max(1, len(entry.versions) if entry is not None else 1)
        for i in range(allowed, len(comps)):
            first, again = comps[i - 1], comps[i]
            run = _excused(first, again, faults)
            what = (
                f"{source} (job {job or '?'}): computed again at {again.at:.1f} s by pid {again.pid}, "
                f"after {first.at:.1f} s by pid {first.pid}"
            )
            if run is not None:
                excused.append(f"{what}; {run.name} at {run.start:.1f} s hit it")
            else:
                problems.append(what)
    keyed = "(photo, job)" if with_job else "photo, per content (log lines carry no job id yet)"
    summary = (
        f"{len(found)} computations of {len(groups)} {keyed}; {len(problems)} duplicate(s), "
        f"{len(excused)} excused by a fault"
    )
    return Check("computed once", not problems, summary, _shown(problems) + [f"excused: {e}" for e in excused[:SHOWN]])


# ------------------------------------------------------------------------------------------ stayed up


def stayed_up(service: Service) -> Check:
    details = []
    for e in service.unexpected:
        details.append(f"at {e.at:.1f} s, exit code {e.code} ({e.log.name}); its log's tail:")
        details += ["    " + line for line in e.tail.splitlines()]
    details += service.problems
    ok = not service.unexpected and not service.problems
    return Check(
        "stayed up", ok, f"{len(service.unexpected)} exit(s) of depthq up that the soak did not cause", details
    )
