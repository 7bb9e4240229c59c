"""The `depthq` command: up, watch, collect, work, enqueue, models, and the operations commands.

Each command imports the side it runs (`producer` or `worker`) only when it is asked for, so the
watcher's commands (`depthq watch`, `enqueue`, `status`, `audit`, `failed`, `dashboard`) never import
numpy, torch or coremltools, nor any module of the worker's; only `work`, `models` and `doctor` do.
The parser itself imports neither side: `models convert`'s choices come from `depthq.conversion`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path, PurePath
from typing import Any

from depthq import conversion
from depthq.config import (
    EXIT_FINAL,
    EXIT_RETRY,
    PARENT_PIPE_ENV,
    Config,
    ConfigError,
    find_config_file,
    load_config,
)
from depthq.connection import RedisUnreachableError
from depthq.logs import configure_logging

log = logging.getLogger("depthq")

# CLI flag -> (section, key). Flags override env vars, which override the file.
_FLAG_KEYS: dict[str, tuple[str, str]] = {
    "watch": ("producer", "watch"),
    "output": ("output", "dir"),
    "workers": ("up", "workers"),
    "redis_url": ("redis", "url"),
    "polling": ("producer", "polling"),
    "backend": ("worker", "backend"),
    "device": ("model", "device"),
    "model": ("model", "path"),
    "bind": ("dashboard", "bind"),
    "port": ("dashboard", "port"),
}


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for flag, (section, key) in _FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


def _add_common(p: argparse.ArgumentParser, *flags: str) -> None:
    p.add_argument("--config", help="config file (default: $DEPTHQ_CONFIG, else ./config.yaml)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default: $DEPTHQ_LOG_LEVEL or INFO)")
    helps = {
        "watch": "folder to watch (producer.watch)",
        "output": "folder for depth outputs (output.dir)",
        "redis_url": "Redis to use, e.g. redis://host:6379/0 (redis.url)",
        "model": "DepthPro weights: a local folder or a hub id such as apple/DepthPro-hf (model.path)",
    }
    for flag in flags:
        p.add_argument(
            "--" + flag.replace("_", "-"),
            dest=flag,
            type=Path if flag in ("watch", "output") else str,
            help=helps.get(flag),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="depthq", description="Hot-folder metric depth with DepthPro.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="Redis + watcher + workers on this machine (the single-machine default)")
    _add_common(up, "watch", "output", "redis_url", "model")
    up.add_argument("--workers", type=int, help="worker processes (up.workers, default 1)")
    up.add_argument("--polling", action="store_const", const=True, help="poll instead of native events (SMB/NFS)")

    watch = sub.add_parser(
        "watch", help="the producer: watch a folder and enqueue finished photos (and collect results, redis transport)"
    )
    _add_common(watch, "watch", "output", "redis_url")
    watch.add_argument("--polling", action="store_const", const=True, help="poll instead of native events")

    collect = sub.add_parser("collect", help="the collector alone: write results sent through Redis into the output")
    _add_common(collect, "output", "redis_url")

    work = sub.add_parser("work", help="one worker alone, on the configured Redis (what a Mac mini runs)")
    _add_common(work, "watch", "output", "redis_url", "model")
    work.add_argument("--backend", help="worker.backend")
    work.add_argument("--device", help="model.device: auto, cuda, mps or cpu")
    work.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    work.add_argument(
        "--final-exit-code",
        type=int,
        default=EXIT_FINAL,
        help=f"exit code for a config or model error that retrying cannot fix (default {EXIT_FINAL}); "
        "launchd's KeepAlive {SuccessfulExit: false} stops restarting on 0",
    )

    enq = sub.add_parser("enqueue", help="enqueue photos or folders now (they must lie under the watch root)")
    _add_common(enq, "watch", "output", "redis_url")
    enq.add_argument("paths", nargs="+", type=Path, help="files or folders")
    enq.add_argument("--force", action="store_true", help="recompute even if already done")

    models = sub.add_parser("models", help="Core ML models for Mac workers: download, list, convert, check")
    msub = models.add_subparsers(dest="models_command", required=True)
    dl = msub.add_parser("download", help="fetch a Core ML DepthPro into model.cache_dir (idempotent)")
    _add_common(dl)
    dl.add_argument("name", nargs="?", help="catalog name (default DepthPro; `depthq models list --known`)")
    dl.add_argument("--from", dest="from_dir", type=Path, help="copy from a local folder laid out as the hub repo")
    dl.add_argument("--offline", action="store_true", help="never touch the network")
    ls = msub.add_parser("list", help="Core ML models present, with their I/O contract")
    _add_common(ls)
    ls.add_argument("--known", action="store_true", help="list the catalog's names instead")
    cv = msub.add_parser("convert", help="DepthPro weights -> Core ML with canonical inverse depth and FOV")
    _add_common(cv, "model")
    cv.add_argument("--output", type=Path, help="the .mlpackage to write (default models/DepthPro-FOV[-X].mlpackage)")
    cv.add_argument("--compression", default="none", choices=conversion.COMPRESSIONS)
    cv.add_argument("--precision", default="float16", choices=conversion.PRECISIONS)
    cv.add_argument(
        "--contract",
        default="canonical",
        choices=conversion.CONTRACTS,
        help="canonical: inverse depth + FOV (EXIF-aware, the default); meters: the hub exports' I/O",
    )
    cv.add_argument(
        "--no-check",
        action="store_true",
        help="skip the short check that ends a conversion (one scene through the package and the checkpoint)",
    )
    ck = msub.add_parser(
        "check",
        help="run a Core ML package and the checkpoint it came from on the same photos; compare depth and FOV",
        description="Exits 1 when an error is past its limit. The limits' defaults follow what the package is "
        "(float32 1e-4, float16 0.5%%, int8 and palettize8 2%% median depth error; see the README); "
        "off macOS the package runs in depthq's MIL executor.",
    )
    _add_common(ck, "model")
    ck.add_argument("package", type=Path, help="the .mlpackage to check")
    ck.add_argument("--against", help="the checkpoint (hub id or folder); default: the one the package records")
    ck.add_argument("--photos", type=Path, help="a folder of photos (default: built-in synthetic scenes)")
    ck.add_argument("--scenes", type=int, default=3, help="how many built-in scenes, 1 to 3 (default 3)")
    ck.add_argument("--max-median", type=float, help="median relative depth error allowed")
    ck.add_argument("--max-p95", type=float, help="95th-percentile relative depth error allowed")
    ck.add_argument("--max-fov-error", type=float, help="FOV error allowed, degrees")
    ck.add_argument("--json", type=Path, help="also write the report to this file, as JSON")
    ck.add_argument(
        "--float32", action="store_true", help="off macOS: execute every op in float32, whatever the package declares"
    )

    dash = sub.add_parser("dashboard", help="rq-dashboard and the results gallery (/gallery) for the configured Redis")
    _add_common(dash, "watch", "output", "redis_url")
    dash.add_argument("--bind", help="address to listen on (dashboard.bind, default 127.0.0.1)")
    dash.add_argument("--port", type=int, help="port (dashboard.port, default 9181)")
    dash.add_argument("--no-auth", action="store_true", help="allow a non-loopback --bind without basic auth")

    status = sub.add_parser("status", help="queue depth, workers per host, throughput and latency")
    _add_common(status, "redis_url")
    status.add_argument("--json", action="store_true", help="the same figures as JSON, for scripts")

    doctor = sub.add_parser("doctor", help="why this machine would not take jobs: one line per check, with the fix")
    _add_common(doctor, "watch", "output", "redis_url", "model")
    doctor.add_argument("--backend", help="worker.backend")
    doctor.add_argument("--no-model", action="store_true", help="skip loading the model (a watcher-only host)")

    audit = sub.add_parser(
        "audit", help="what is not as it should be: photos with no result or job, lost jobs, orphans, leftovers"
    )
    _add_common(audit, "watch", "output", "redis_url")
    audit.add_argument("--json", action="store_true", help="the counts and the first --limit of each kind, as JSON")
    audit.add_argument("--limit", type=int, default=10, help="photos or jobs shown of each kind (default 10)")
    audit.add_argument("--hash", action="store_true", help="also hash every done photo against its sidecar (slow)")
    audit.add_argument("--no-index", action="store_true", help="read every sidecar instead of trusting the index")
    audit.add_argument(
        "--repair",
        action="store_true",
        help="enqueue lost and stale photos (backfill lane), requeue jobs queued nowhere, remove old temporary "
        "files; never deletes outputs",
    )

    # The collector's child process (redis transport): assembles one clip from the request on stdin.
    assemble = sub.add_parser("assemble-clip", help=argparse.SUPPRESS)
    _add_common(assemble)
    assemble.add_argument("--into", required=True, type=Path, help="the output folder")
    assemble.add_argument("--clip", required=True, type=Path, help="the clip on this host")
    failed = sub.add_parser("failed", help="the failed jobs: list, retry or purge them")
    fsub = failed.add_subparsers(dest="failed_command", required=True)
    fl = fsub.add_parser("list", help="failed jobs with their photo and error")
    _add_common(fl, "redis_url")
    fl.add_argument("--json", action="store_true", help="as JSON, for scripts")
    for name, verb in (("retry", "put back on the queue"), ("purge", "delete for good")):
        fp = fsub.add_parser(name, help=f"{verb}: the given job ids or photos, or --all")
        _add_common(fp, "redis_url")
        fp.add_argument("jobs", nargs="*", help="job ids or photo paths (relative to the watch root)")
        fp.add_argument("--all", action="store_true", help="every failed job")
    return parser


def _stop_event() -> threading.Event:
    from depthq.supervisor import install_stop_signals

    stop = threading.Event()
    install_stop_signals(stop)
    return stop


def cmd_up(config: Config, args: argparse.Namespace) -> int:
    from depthq.supervisor import run_up

    return run_up(config, find_config_file(args.config), _overrides(args), _stop_event())


def cmd_watch(config: Config, args: argparse.Namespace) -> int:
    from producer.collector import start_collector
    from producer.watcher import build_watcher

    stop = _stop_event()
    connection = _connect(config)
    start_collector(config, connection, stop)
    build_watcher(config, connection).run(stop)
    return 0


def cmd_collect(config: Config, args: argparse.Namespace) -> int:
    from producer.collector import Collector

    if config.transport.mode != "redis":
        print("depthq collect: transport.mode is shared; a collector serves the redis transport", file=sys.stderr)
        return 2
    Collector(config, _connect(config), role="collect").run(_stop_event())
    return 0


def cmd_assemble_clip(config: Config, args: argparse.Namespace) -> int:
    """A clip's assembly for the collector (`producer.collector`), in a process of its own so that the
    watcher never loads numpy: the request (JSON) on stdin, 0 when done with, 75 to be asked again."""
    from worker.clip_assembly import assemble_requested

    return assemble_requested(json.load(sys.stdin), args.into, args.clip)


def cmd_work(config: Config, args: argparse.Namespace) -> int:
    from worker.access import FolderAccessError
    from worker.errors import BackendNotReadyError, BackendUnavailableError, ModelUnavailableError
    from worker.worker import run

    try:
        code = run(config, burst=args.burst)
    except (ModelUnavailableError, BackendUnavailableError) as exc:
        print(f"depthq: {exc}", file=sys.stderr)
        return args.final_exit_code
    except FolderAccessError as exc:
        print(f"depthq: {exc}", file=sys.stderr)
        return EXIT_RETRY
    except BackendNotReadyError as exc:
        print(f"depthq: {exc}; exiting {EXIT_RETRY} to be started again", file=sys.stderr)
        return EXIT_RETRY
    # The worker has stopped: its job is done, its files fsynced, Redis told. The interpreter's own
    # exit can then hang in garbage collection while torch's native threads are alive (seen here: a
    # worker stuck after its warm shutdown, a stack dump showing only "Garbage-collecting"), and a
    # service manager would wait its whole stop timeout. So the process ends here, without it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_enqueue(config: Config, args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from producer.enqueue import Enqueuer, SourceError
    from producer.readiness import Eligibility

    enqueuer = Enqueuer(config, _connect(config))
    eligible = Eligibility.of(config)
    files: list[Path] = []
    passed_by: list[str] = []
    for path in args.paths:
        if path.is_dir():
            files.extend(eligible.scan(path))
        elif path.exists():
            # A file named here passes the same filters as the watcher's: notes.txt is no photo.
            why = eligible.why_not(_under_watch(path, config))
            if why is None:
                files.append(path)
            else:
                passed_by.append(f"{path}: {why}; the watcher would pass it by too")
        else:
            log.error("%s: no such file or folder", path)
            return 2
    counts: dict[str, int] = {}
    refused = 0
    with Progress(transient=False) as progress:
        task = progress.add_task("enqueueing", total=len(files))
        for path in files:
            try:
                outcome = enqueuer.submit(path, force=args.force).outcome
                if outcome == "deferred":
                    progress.console.print(
                        "Redis holds transport.max_inflight_jobs/bytes already: waiting for the collector "
                        "(`depthq watch` or `depthq collect`) to take results out"
                    )
                while outcome == "deferred":
                    time.sleep(0.5)
                    outcome = enqueuer.submit(path, force=args.force).outcome
                counts[outcome] = counts.get(outcome, 0) + 1
            except SourceError as exc:
                refused += 1
                progress.console.print(f"[red]refused[/red] {exc}")
            progress.advance(task)
    for line in passed_by:
        print(f"refused {line}")
    refused += len(passed_by)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing"
    print(f"{len(files)} file(s): {summary}" + (f", {refused} refused" if refused else ""))
    return 1 if refused else 0


def _under_watch(path: Path, config: Config) -> PurePath:
    """The path as the watcher names it (relative to the watch root), or its bare name outside it."""
    try:
        return path.resolve().relative_to(config.producer.watch.resolve())
    except ValueError:
        return PurePath(path.name)


def cmd_models(config: Config, args: argparse.Namespace) -> int:
    from depthq.model_commands import check_command, convert_command, download_command, list_command
    from worker.errors import ModelUnavailableError

    commands = {"download": download_command, "list": list_command, "convert": convert_command, "check": check_command}
    try:
        return commands[args.models_command](config, args)
    except ModelUnavailableError as exc:
        print(f"depthq: {exc}", file=sys.stderr)
        return 2


def _connect(config: Config) -> Any:
    from depthq.connection import connect, resolve_url

    return connect(resolve_url(config), config.redis)


def cmd_dashboard(config: Config, args: argparse.Namespace) -> int:
    from depthq.connection import resolve_url
    from depthq.ops.dashboard import create_app, serve

    url = resolve_url(config)
    _connect(config).close()  # fail at start, naming the setting, if Redis is unreachable
    serve(create_app(config, url, allow_no_auth=args.no_auth), config.dashboard.bind, config.dashboard.port)
    return 0


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from depthq.ops.status import gather, render

    status = gather(_connect(config), config)
    if args.json:
        print(json.dumps(status.to_dict(), indent=2))
    else:
        render(status, Console())
    return 0


def cmd_failed(config: Config, args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from depthq.ops import failed

    connection = _connect(config)
    if args.failed_command == "list":
        rows = failed.list_failed(connection, config)
        if args.json:
            print(json.dumps(failed.as_dicts(rows), indent=2))
            return 0
        failed.render(rows, Console())
        return 0
    if not args.jobs and not args.all:
        print(f"depthq failed {args.failed_command}: name job ids or photos, or pass --all", file=sys.stderr)
        return 2
    try:
        if args.failed_command == "retry":
            from producer.enqueue import Enqueuer

            enqueuer = Enqueuer(config, connection)
            done = failed.retry(
                connection,
                config,
                args.jobs,
                everything=args.all,
                resubmit_clip=lambda p: enqueuer.submit(p, force=True),
            )
        else:
            done = failed.purge(connection, config, args.jobs, everything=args.all)
    except LookupError as exc:
        print(f"depthq: {exc}", file=sys.stderr)
        return 1
    verb = "requeued" if args.failed_command == "retry" else "purged"
    print(f"{verb} {len(done)} job(s)")
    return 0


def cmd_audit(config: Config, args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from producer.audit import audit, render, repair

    connection = _connect(config)
    report = audit(config, connection, limit=max(0, args.limit), check_hash=args.hash, use_index=not args.no_index)
    if args.repair:
        repair(config, connection, report)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render(report, Console())
    # What the audit found, even when --repair then put it right: run it again to see the result.
    return 0 if report.ok else 1


def cmd_doctor(config: Config, args: argparse.Namespace) -> int:
    from depthq.doctor import doctor

    return doctor(config, find_config_file(args.config), model=not args.no_model, sharing=args.sharing)


_COMMANDS = {
    "up": cmd_up,
    "watch": cmd_watch,
    "collect": cmd_collect,
    "assemble-clip": cmd_assemble_clip,
    "work": cmd_work,
    "enqueue": cmd_enqueue,
    "models": cmd_models,
    "dashboard": cmd_dashboard,
    "status": cmd_status,
    "failed": cmd_failed,
    "doctor": cmd_doctor,
    "audit": cmd_audit,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    final = getattr(args, "final_exit_code", EXIT_FINAL)
    try:
        config = load_config(args.config, overrides=_overrides(args))
        args.sharing = None
        # Every command but up itself (and its workers, which have its settings in their environment)
        # takes what it is not told from the depthq up running here, so they make the same jobs.
        if args.command != "up" and PARENT_PIPE_ENV not in os.environ:
            from depthq.running import adopt

            config, args.sharing = adopt(config, args.config, _overrides(args))
        # From here on, to logging.file if the config names one (a Mac mini's worker: launchd rotates nothing).
        configure_logging(args.log_level, config.logging)
        return _COMMANDS[args.command](config, args)
    except RedisUnreachableError as exc:
        print(f"depthq: {exc}", file=sys.stderr)
        return EXIT_RETRY
    except (ConfigError, FileNotFoundError) as exc:
        print(f"depthq: {exc}", file=sys.stderr)
        return final
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
