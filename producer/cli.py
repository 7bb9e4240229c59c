"""The `depthq` command: up, watch, work, enqueue.

Lives in the producer package so `depthq watch` and `depthq enqueue` never import numpy or torch;
`depthq work` imports the worker only when asked for.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from producer.config import Config, ConfigError, find_config_file, load_config
from producer.logs import configure_logging

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
    _add_common(up, "watch", "output", "redis_url")
    up.add_argument("--workers", type=int, help="worker processes (up.workers, default 1)")
    up.add_argument("--polling", action="store_const", const=True, help="poll instead of native events (SMB/NFS)")

    watch = sub.add_parser("watch", help="the producer alone: watch a folder and enqueue finished photos")
    _add_common(watch, "watch", "output", "redis_url")
    watch.add_argument("--polling", action="store_const", const=True, help="poll instead of native events")

    work = sub.add_parser("work", help="one worker alone, on the configured Redis (what a Mac mini runs)")
    _add_common(work, "watch", "output", "redis_url", "model")
    work.add_argument("--backend", help="worker.backend")
    work.add_argument("--device", help="model.device: auto, cuda, mps or cpu")
    work.add_argument("--burst", action="store_true", help="exit once the queue is empty")

    enq = sub.add_parser("enqueue", help="enqueue photos or folders now (they must lie under the watch root)")
    _add_common(enq, "watch", "output", "redis_url")
    enq.add_argument("paths", nargs="+", type=Path, help="files or folders")
    enq.add_argument("--force", action="store_true", help="recompute even if already done")

    models = sub.add_parser("models", help="Core ML models for Mac workers: download, list, convert")
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
    cv.add_argument("--compression", default="none", choices=["none", "int8", "palettize8", "palettize6", "palettize4"])
    cv.add_argument("--precision", default="float16", choices=["float16", "float32"])
    cv.add_argument(
        "--contract",
        default="canonical",
        choices=["canonical", "meters"],
        help="canonical: inverse depth + FOV (EXIF-aware, the default); meters: the hub exports' I/O",
    )
    return parser


def _stop_event() -> threading.Event:
    from producer.supervisor import install_stop_signals

    stop = threading.Event()
    install_stop_signals(stop)
    return stop


def cmd_up(config: Config, args: argparse.Namespace) -> int:
    from producer.supervisor import run_up

    return run_up(config, find_config_file(args.config), _overrides(args), _stop_event())


def cmd_watch(config: Config, args: argparse.Namespace) -> int:
    from producer.connection import connect, resolve_url
    from producer.enqueue import Enqueuer
    from producer.watcher import Watcher

    connection = connect(resolve_url(config), config.redis)
    Watcher(config, Enqueuer(config, connection)).run(_stop_event())
    return 0


def cmd_work(config: Config, args: argparse.Namespace) -> int:
    from worker.errors import BackendUnavailableError, ModelUnavailableError
    from worker.worker import run

    try:
        return run(config, burst=args.burst)
    except (ModelUnavailableError, BackendUnavailableError) as exc:
        print(f"depthq: {exc}", file=sys.stderr)
        return 2


def cmd_enqueue(config: Config, args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from producer.connection import connect, resolve_url
    from producer.enqueue import Enqueuer, SourceError
    from producer.readiness import Eligibility

    enqueuer = Enqueuer(config, connect(resolve_url(config), config.redis))
    eligible = Eligibility(config.producer.extensions, config.producer.ignore)
    files: list[Path] = []
    for path in args.paths:
        if path.is_dir():
            files.extend(eligible.scan(path))
        elif path.exists():
            files.append(path)
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
                counts[outcome] = counts.get(outcome, 0) + 1
            except SourceError as exc:
                refused += 1
                progress.console.print(f"[red]refused[/red] {exc}")
            progress.advance(task)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing"
    print(f"{len(files)} file(s): {summary}" + (f", {refused} refused" if refused else ""))
    return 1 if refused else 0


def cmd_models(config: Config, args: argparse.Namespace) -> int:
    from worker.errors import ModelUnavailableError
    from worker.model_commands import convert_command, download_command, list_command

    commands = {"download": download_command, "list": list_command, "convert": convert_command}
    try:
        return commands[args.models_command](config, args)
    except ModelUnavailableError as exc:
        print(f"depthq: {exc}", file=sys.stderr)
        return 2


_COMMANDS = {"up": cmd_up, "watch": cmd_watch, "work": cmd_work, "enqueue": cmd_enqueue, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = load_config(args.config, overrides=_overrides(args))
        return _COMMANDS[args.command](config, args)
    except ConfigError as exc:
        print(f"depthq: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"depthq: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
