"""`python -m bench soak`: the real service under real faults for minutes, then proof that nothing was lost.

`depthq up --workers 2` runs as a user runs it (its own session, a config file, the tiny DepthPro on
the CPU), its output folder a real tmpfs. For `--minutes`, files arrive the ways users write them
(bench/soak_load.py) while faults hit it one at a time (bench/soak_faults.py): a worker SIGKILLed, a
worker SIGSTOPped, the embedded Redis SIGKILLed, the output disk full, `depthq up` SIGKILLed and
SIGTERMed, each started again, and a worker SIGKILLed in the middle of a clip's chunk. Any exit of
`depthq up` that the soak did not cause is recorded and the service restarted. Then the load stops,
the queue drains, and every end state is checked (bench/soak_checks.py): `depthq audit`, the soak's
own ledger of every file against the outputs, rq's failed registries, no photo computed twice (nor a
clip assembled twice), `depthq up` never exiting by itself, and after the final SIGTERM no process
left behind and the tmpfs unmounting.

It prints a timeline, a table of the faults with their recovery times, the counts, and each check
with the files it failed on; it exits 1 if any check failed. Needs root (the tmpfs mount). It is not
part of `python -m bench` (all): it takes minutes by design.

    python -m bench soak --minutes 5 [--transport shared|redis] [--workers 2] [--seed S]
                         [--faults worker-kill,disk-full] [--keep DIR]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import yaml
from rich.markup import escape
from rich.table import Table

from bench.common import console, machine
from bench.soak_checks import (
    Check,
    audit,
    computed_once,
    drain,
    failed_jobs,
    leftover_copies,
    outputs,
    stayed_up,
    unfinished,
)
from bench.soak_faults import FAULTS, FaultContext, FaultRun, FaultSettings
from bench.soak_load import Load
from bench.soak_record import Ledger, Timeline
from bench.soak_service import Service, ServiceError, Tmpfs, describe, tmpfs_unavailable_reason, wait_until

QUEUE = "depthq"
# Time kept for the end (drain, audit, final stop) when a budget bounds the whole soak.
END_RESERVE_S = 30.0
MIN_WAIT_S = 5.0
QUICK_MINUTES = 3.0


class SoakUnavailable(RuntimeError):
    """This machine cannot run the soak (no root, no tmpfs): the message says why."""


@dataclass(frozen=True)
class SoakOptions:
    minutes: float = 10.0
    transport: Literal["shared", "redis"] = "shared"
    workers: int = 2
    seed: int = 0
    faults: tuple[str, ...] = tuple(FAULTS)
    keep: Path | None = None  # keep the soak's folder (and a copy of the outputs) here
    # The original soak wrote ~2,100 files in 21 minutes: 100 a minute.
    files_per_min: float = 100.0
    stop_s: float = 20.0
    disk_full_s: float = 30.0
    recover_timeout_s: float = 120.0
    drain_timeout_s: float = 600.0
    start_timeout_s: float = 180.0
    tmpfs_mb: int | None = None  # default: room for the run's outputs, 0.5 MiB a file
    dead_after_s: int = 10
    job_timeout_s: int = 30
    retry_backoff_s: int = 1
    settle_ms: int = 300
    rescan_s: int = 60
    warmup_s: float = 20.0  # load before the first fault
    tail_s: float = 20.0  # load after the last fault's slot
    budget_s: float | None = None  # a bound on the whole soak (CI): waits are cut to fit, late faults skipped
    echo: bool = True  # print the timeline as it happens


@dataclass
class SoakReport:
    options: SoakOptions
    root: Path
    timeline: Timeline
    faults: list[FaultRun] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def failures(self) -> str:
        """Every failed check with its details, as text: the assertion message of the CI test."""
        lines = []
        for c in self.checks:
            if not c.ok:
                lines.append(f"FAIL {c.name}: {c.summary}")
                lines += [f"    {d}" for d in c.details]
        return "\n".join(lines)


class _Budget:
    """What is left of `budget_s`, so that a bounded soak (CI) cuts its waits rather than overrun."""

    def __init__(self, budget_s: float | None) -> None:
        self.deadline = None if budget_s is None else time.monotonic() + budget_s

    def cap(self, wanted_s: float, reserve_s: float = END_RESERVE_S) -> float:
        if self.deadline is None:
            return wanted_s
        return max(MIN_WAIT_S, min(wanted_s, self.deadline - reserve_s - time.monotonic()))

    def exhausted(self, reserve_s: float = END_RESERVE_S) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline - reserve_s


def _config(o: SoakOptions, root: Path) -> dict[str, Any]:
    return {
        "redis": {"data_dir": str(root / "redis-data")},  # on /tmp's disk, never on the output tmpfs
        "queue": {"name": QUEUE, "job_timeout_s": o.job_timeout_s},
        "producer": {"watch": str(root / "inbox"), "settle_ms": o.settle_ms, "rescan_s": o.rescan_s},
        "worker": {"dead_after_s": o.dead_after_s, "retry_backoff_s": [o.retry_backoff_s]},
        "model": {"path": str(root / "model"), "device": "cpu"},
        "output": {"dir": str(root / "out")},
        "transport": {"mode": o.transport},
        "up": {"workers": o.workers},
    }


def _run_faults(ctx: FaultContext, o: SoakOptions, budget: _Budget, timeline: Timeline) -> list[FaultRun]:
    """Each fault in its slot, spread over the run, one at a time: a fault that overruns its slot
    pushes the next one back. Under a budget, a fault with no time left is skipped, as a failure."""
    duration = o.minutes * 60
    spacing = max(0.0, (duration - o.warmup_s - o.tail_s) / max(1, len(o.faults)))
    runs = []
    for i, name in enumerate(o.faults):
        slot = o.warmup_s + i * spacing
        if timeline.now() < slot:
            time.sleep(slot - timeline.now())  # the schedule itself: the load runs meanwhile
        if budget.exhausted(END_RESERVE_S + 10):
            runs.append(FaultRun(name, timeline.now(), failures=[f"{name}: not run, the soak's time budget is spent"]))
            timeline.add(f"{name}: skipped, out of time")
            continue
        ctx = replace(ctx, settings=replace(ctx.settings, recover_timeout_s=budget.cap(o.recover_timeout_s)))
        try:
            runs.append(FAULTS[name].inflict(ctx))
        except Exception as exc:  # a harness failure in one fault must not hide the others' results
            runs.append(
                FaultRun(name, timeline.now(), failures=[f"{name}: the soak failed: {type(exc).__name__}: {exc}"])
            )
            timeline.add(f"{name}: the soak's fault code failed: {exc}")
    return runs


def _fault_check(o: SoakOptions, runs: list[FaultRun]) -> Check:
    problems = [f for run in runs for f in run.failures]
    ran = [r.name for r in runs]
    if ran != list(o.faults):
        problems.append(f"faults run {ran}, asked for {list(o.faults)}")
    recovered = sum(1 for r in runs if r.recovered is not None)
    return Check("faults", not problems, f"{recovered} of {len(o.faults)} fault(s) recovered from", problems)


def _counts(ledger: Ledger, load: Load, output: Path, audit_counts: dict[str, int]) -> dict[str, Any]:
    entries = ledger.all()
    present = [e for e in entries if e.present]
    gone = Counter(e.gone.split(" ")[0] for e in entries if e.gone)
    return {
        "written by pattern": {p: (n, ledger.bad_by_pattern[p]) for p, n in sorted(ledger.files_by_pattern.items())},
        "files written": sum(ledger.files_by_pattern.values()),
        "present at the end": len(present),
        "good": sum(1 for e in present if not e.bad),
        "bad": sum(1 for e in present if e.bad),
        "done (output for the current content)": len(present) - len(unfinished(ledger, output)),
        "deleted": gone.get("deleted", 0),
        "moved away": gone.get("moved", 0),
        "load errors": len(load.errors),
        "audit": audit_counts,
    }


def soak(options: SoakOptions) -> SoakReport:
    """Run the soak; its report. Raises SoakUnavailable where no tmpfs can be mounted (not root)."""
    o = options
    unknown = [f for f in o.faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    reason = tmpfs_unavailable_reason()
    if reason is not None:
        raise SoakUnavailable(reason)
    budget = _Budget(o.budget_s)
    if o.keep is not None:
        o.keep.mkdir(parents=True, exist_ok=True)
        if any(o.keep.iterdir()):
            raise ValueError(f"--keep {o.keep}: the folder must be empty")
        root = o.keep.resolve()
    else:
        root = Path(tempfile.mkdtemp(prefix="depthq-soak-", dir="/tmp"))
    timeline = Timeline(echo=(lambda line: print(line, flush=True)) if o.echo else None)
    report = SoakReport(o, root, timeline)
    watch, output = root / "inbox", root / "out"
    size_mb = o.tmpfs_mb or max(256, int(o.minutes * o.files_per_min * 0.5))
    tmpfs = Tmpfs(output, size_mb)
    ledger = Ledger(watch)
    load = Load(ledger, timeline, output, o.seed, o.files_per_min, o.settle_ms)
    service = Service(
        root,
        root / "config.yaml",
        root / "redis-data",
        o.workers,
        timeline,
        start_timeout_s=budget.cap(o.start_timeout_s),
        stop_timeout_s=o.job_timeout_s + 45,
    )
    cleanup = _Cleanup(load, service, tmpfs, root, o.keep)
    atexit.register(cleanup)
    try:
        # torch and transformers: imported only when a soak runs.
        from transformers.utils import logging as transformers_logging

        from testkit.tiny_model import build_tiny_model

        transformers_logging.disable_progress_bar()
        timeline.add(f"soak in {root}: {machine()}")
        build_tiny_model(root / "model")
        (root / "config.yaml").write_text(yaml.safe_dump(_config(o, root), allow_unicode=True))
        watch.mkdir()
        tmpfs.mount()
        timeline.add(f"output tmpfs of {size_mb} MiB mounted on {output}; transport {o.transport}")
        service.start("the soak's start")
        service.watch()
        load.start()
        ctx = FaultContext(
            service,
            load,
            timeline,
            tmpfs,
            watch,
            output,
            FaultSettings(o.workers, o.stop_s, o.disk_full_s, o.recover_timeout_s),
        )
        report.faults = _run_faults(ctx, o, budget, timeline)
        end = o.minutes * 60
        if timeline.now() < end and not budget.exhausted():
            time.sleep(min(end - timeline.now(), budget.cap(end)))  # the load's own length
        load.stop()
        report.checks = _end(o, report, service, ledger, load, tmpfs, budget, timeline)
    finally:
        cleanup()
        atexit.unregister(cleanup)
    return report


def _guarded(name: str, check: Callable[[], Check]) -> Check:
    """A check that crashes is a failed check with the soak's own traceback, not a lost report."""
    try:
        return check()
    except Exception:
        return Check(name, False, "the soak's own check failed (a harness bug)", traceback.format_exc().splitlines())


def _end(
    o: SoakOptions,
    report: SoakReport,
    service: Service,
    ledger: Ledger,
    load: Load,
    tmpfs: Tmpfs,
    budget: _Budget,
    timeline: Timeline,
) -> list[Check]:
    output = tmpfs.path
    checks = [_fault_check(o, report.faults)]
    timeline.add("draining")
    drained = _guarded(
        "drain",
        lambda: drain(
            service,
            ledger,
            output,
            QUEUE,
            timeout_s=budget.cap(o.drain_timeout_s, reserve_s=15),
            idle_grace_s=budget.cap(o.rescan_s + 5.0, reserve_s=15),
            # Long enough for a rescan and a job's whole time limit to move something.
            stall_s=o.rescan_s + o.job_timeout_s + 15.0,
        ),
    )
    checks.append(drained)
    timeline.add(f"drain: {drained.summary}")
    # While Redis still runs: the audit and the failed registries need it.
    service.stop_watching()
    audit_counts: dict[str, int] = {}

    def run_audit() -> Check:
        check, counts = audit(service.depthq, service.config_file, report.root)
        audit_counts.update(counts)
        return check

    checks.append(_guarded("audit", run_audit))
    checks.append(_guarded("outputs", lambda: outputs(ledger, output)))
    client = service.redis() if service.redis_answers() else None
    checks.append(_guarded("failed jobs", lambda: failed_jobs(client, ledger, QUEUE)))
    checks.append(_guarded("copies settled", lambda: leftover_copies(client, QUEUE, ledger.watch)))
    with contextlib.suppress(Exception):
        report.counts = _counts(ledger, load, output, audit_counts)
    stop_checks = _final_stop(service, tmpfs, timeline, o.keep)
    # After the final stop: the workers' logs are complete only once they have stopped.
    logs = sorted(service.logs.glob("up-*.log"))
    checks.append(_guarded("computed once", lambda: computed_once(logs, timeline, ledger, report.faults)))
    checks += [stayed_up(service), *stop_checks]
    if load.errors:
        checks.append(Check("load", False, f"{len(load.errors)} error(s) in the soak's own writers", load.errors[:25]))
    ledger.save(report.root / "ledger.json")
    (report.root / "timeline.txt").write_text("".join(f"{t:8.1f}  {e}\n" for t, e in timeline.events))
    return checks


def _final_stop(service: Service, tmpfs: Tmpfs, timeline: Timeline, keep: Path | None) -> list[Check]:
    """SIGTERM `depthq up`, then nothing of it may be left, and the tmpfs must unmount."""
    code, took = service.stop(signal.SIGTERM)
    timeline.add(f"final stop: depthq up exited with code {code} in {took:.1f} s")
    stop = Check("final stop", code == 0, f"depthq up exited with code {code} {took:.1f} s after SIGTERM")
    if code is None:
        stop.details.append(service.tail())
        service.kill()
    elif code != 0:
        stop.details.append(service.tail())
    left = wait_until(lambda: not service.leftovers(), 5.0, poll_s=0.2)
    still = [describe(p) for p in service.leftovers()] if left is None else []
    leftovers = Check("left behind", not still, f"{len(still)} process(es) of the soak's service still alive", still)
    service.end_leftovers(grace_s=0)
    if keep is not None:
        try:
            shutil.copytree(tmpfs.path, keep / "out-kept", symlinks=True, dirs_exist_ok=True)
        except (OSError, shutil.Error) as exc:
            timeline.add(f"could not keep a copy of the outputs: {exc}")
    problem = tmpfs.unmount()
    timeline.add(f"tmpfs unmounted{': ' + problem if problem else ''}")
    unmounted = Check("tmpfs unmounts", problem is None, problem or "unmounted", [])
    return [stop, leftovers, unmounted]


class _Cleanup:
    """Whatever happened, nothing of the soak stays: the load stopped, the service and anything it
    left ended, the filler gone, the tmpfs unmounted, the folder removed (unless --keep). Idempotent."""

    def __init__(self, load: Load, service: Service, tmpfs: Tmpfs, root: Path, keep: Path | None) -> None:
        self.load, self.service, self.tmpfs, self.root, self.keep = load, service, tmpfs, root, keep
        self.done = False
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
            with contextlib.suppress(Exception):
                self.load.stop()
            with contextlib.suppress(Exception):
                self.service.shutdown()
            if self.tmpfs.mounted:
                with contextlib.suppress(OSError):
                    self.tmpfs.unfill()
                self.tmpfs.unmount()
            if self.keep is None:
                shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- report


def _table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i in (0, len(headers) - 1) else "right")
    for row in rows:
        table.add_row(*(escape(str(c)) for c in row))
    console.print(table)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_report(report: SoakReport) -> None:
    o = report.options
    console.print(
        escape(
            f"soak: {o.minutes:g} min, transport {o.transport}, {o.workers} workers, seed {o.seed}, "
            f"faults {','.join(o.faults)}; {machine()}"
        )
    )
    _table("Timeline", ["s", "event"], [[f"{t:.1f}", e] for t, e in report.timeline.events])
    _table(
        "Faults (recovery: from the fault's end, see below)",
        ["fault", "start s", "end s", "recovered at s", "recovery s", "notes"],
        [
            [r.name, _s(r.start), _s(r.end), _s(r.recovered), _s(r.recovery_s), "; ".join(r.notes + r.failures)[:200]]
            for r in report.faults
        ],
    )
    for name in o.faults:
        console.print(escape(f"  {name}: {FAULTS[name].recovered_when}"))
    counts = dict(report.counts)
    by_pattern = counts.pop("written by pattern", {})
    audit_counts = counts.pop("audit", {})
    _table(
        "Files written, by pattern",
        ["pattern", "files", "of them bad"],
        [[p, n, b] for p, (n, b) in by_pattern.items()],
    )
    _table("Counts", ["what", "n"], list(counts.items()))
    if audit_counts:
        _table("depthq audit", ["kind", "n"], list(audit_counts.items()))
    _table(
        "Checks",
        ["check", "result", "summary"],
        [[c.name, "pass" if c.ok else "FAIL", c.summary] for c in report.checks],
    )
    for c in report.checks:
        if not c.ok or c.details:
            print(f"\n{c.name}: {'pass' if c.ok else 'FAIL'}: {c.summary}")
            for d in c.details:
                print(f"    {d}")
    print(f"\nsoak: {'PASS' if report.ok else 'FAIL'} ({sum(1 for c in report.checks if not c.ok)} check(s) failed)")


# ---------------------------------------------------------------------------------------------- command


def parse(argv: Sequence[str], quick: bool = False) -> SoakOptions:
    """The soak's options; with bench's `--quick`, a 3-minute soak unless --minutes says otherwise."""
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=QUICK_MINUTES if quick else SoakOptions.minutes)
    parser.add_argument("--transport", choices=("shared", "redis"), default="shared")
    parser.add_argument("--workers", type=int, default=SoakOptions.workers)
    parser.add_argument("--seed", type=int, default=SoakOptions.seed)
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma list of: {', '.join(FAULTS)}")
    parser.add_argument("--keep", type=Path, help="an empty folder to run in and keep (logs, ledger, outputs)")
    parser.add_argument("--files-per-min", type=float, default=SoakOptions.files_per_min)
    args = parser.parse_args(list(argv))
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s) {unknown}; choose from {', '.join(FAULTS)}")
    return SoakOptions(
        minutes=args.minutes,
        transport=args.transport,
        workers=args.workers,
        seed=args.seed,
        faults=faults,
        keep=args.keep,
        files_per_min=args.files_per_min,
    )


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM or SIGHUP end the soak as Ctrl-C does: through its cleanup."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run(quick: bool = False, argv: Sequence[str] = ()) -> dict[str, Any]:
    """`python -m bench soak [options]`; `--quick` is a 3-minute soak. The result's "ok" is the verdict."""
    options = parse(argv, quick)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        report = soak(options)
    except (SoakUnavailable, ServiceError) as exc:
        console.print(escape(f"soak: cannot run: {exc}"))
        return {"ok": False, "error": str(exc)}
    except KeyboardInterrupt as exc:
        console.print(escape(f"soak: interrupted ({exc or 'Ctrl-C'}); its service, mount and folder are cleaned up"))
        return {"ok": False, "error": "interrupted"}
    print_report(report)
    return {"ok": report.ok, "counts": report.counts, "checks": {c.name: c.ok for c in report.checks}}
