"""`depthq models download | list | convert | check`: the model management a Mac mini owner needs, as commands.

Only the CLI imports this, for `depthq models`; it hands the work to the worker's catalog and converter,
which it imports inside each command, as every depthq module that reaches into `worker/` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from depthq.config import Config

if TYPE_CHECKING:
    from worker.catalog import ModelInfo


def download_command(config: Config, args: argparse.Namespace) -> int:
    from worker import catalog

    name = args.name or catalog.DEFAULT_MODEL
    path = catalog.download(
        name, config.model.cache_dir, offline=args.offline or config.model.offline, from_dir=args.from_dir
    )
    entry = catalog.get_entry(name)
    print(f"{entry.name}: {path}")
    print(f"licence: see the model card of {entry.sources[0].repo_id}; DepthPro's weights are under apple-amlr")
    if not entry.metric:
        print("note: this model outputs normalized inverse depth (relative only); workers refuse it for meters")
    return 0


def _contract_label(path: Path) -> str:
    from worker.coreml_spec import read_contract
    from worker.errors import ModelUnavailableError

    try:
        return read_contract(path).label
    except ModelUnavailableError as exc:
        return f"unusable: {exc}"


def _licence(info: ModelInfo) -> str:
    """What the package says (a depthq conversion records its checkpoint's), else where to read it."""
    recorded = info.contract.metadata.get("depthq.licence") if info.contract else None
    if recorded:
        return recorded
    if info.entry is not None:
        return f"see the model card of {info.entry.sources[0].repo_id} (DepthPro's weights: apple-amlr)"
    return "not stated"


def list_command(config: Config, args: argparse.Namespace) -> int:
    from worker import catalog

    # Wide when piped or captured, so each row stays one line a script (or grep) can read.
    console = Console(width=None if sys.stdout.isatty() else 200)
    if args.known:
        table = Table("name", "output", "about")
        for name in catalog.known_names():
            entry = catalog.get_entry(name)
            table.add_row(name, entry.kind, f"~{entry.approx_size_mb} MB. {entry.description}")
        console.print(table)
        return 0
    models = catalog.list_models(config.model.cache_dir)
    if not models:
        console.print(
            f"no Core ML models in {config.model.cache_dir}; `depthq models convert` or `depthq models download`"
        )
        return 0
    table = Table("model", "size", "contract", "licence", "inputs", "outputs")
    for info in models:
        if info.format == "mlmodelc":
            contract = "compiled: I/O unknown"
        else:
            contract = info.contract.label if info.contract else f"unusable: {info.contract_error or info.io_error}"
        io_in = "\n".join(str(f) for f in info.inputs or ()) or (info.io_error or "")
        io_out = "\n".join(str(f) for f in info.outputs or ())
        table.add_row(str(info.path), catalog.format_size(info.size_bytes), contract, _licence(info), io_in, io_out)
    console.print(table)
    return 0


class CheckFailed(Exception):
    """A package computes something else than its checkpoint, past the check's limits."""


def _limits(args: argparse.Namespace, kind: str) -> Any:
    """The kind's default limits, each --max-* flag given replacing its own."""
    from worker.model_check import Limits

    given = {"median": args.max_median, "p95": args.max_p95, "fov_deg": args.max_fov_error}
    return dataclasses.replace(Limits.for_kind(kind), **{k: v for k, v in given.items() if v is not None})


def check_command(config: Config, args: argparse.Namespace) -> int:
    from worker.errors import ModelUnavailableError
    from worker.model_check import SCENES, check_package, render

    if not args.package.is_dir():
        raise ModelUnavailableError(f"{args.package}: no such package (an .mlpackage is a folder)")
    if not 1 <= args.scenes <= len(SCENES):
        raise ModelUnavailableError(f"--scenes {args.scenes}: 1 to {len(SCENES)}")
    report = check_package(
        args.package,
        against=args.against,
        photos=args.photos,
        scenes=SCENES[: args.scenes],
        float32=args.float32,
        device=config.model.device,
        cache_dir=config.model.cache_dir,
        limits_for=lambda kind: _limits(args, kind),
        progress=lambda line: print(line, file=sys.stderr),
    )
    render(report)
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return 1 if report.failures() else 0


def _short_check(config: Config, output: Path) -> Callable[[Path], None]:
    """The check that ends `models convert`: one scene, the default limits for what was made. It runs on
    the saved package before that replaces `output`; the report names `output`."""

    def verify(package: Path) -> None:
        from worker.model_check import SCENES, check_package, render

        with tempfile.TemporaryDirectory(prefix="depthq-check-") as scratch:  # Core ML's compiled copy, on macOS
            report = check_package(
                package,
                against=str(config.model.path),
                scenes=SCENES[:1],
                device=config.model.device,
                cache_dir=Path(scratch),
            )
        report.package = output
        render(report)
        if report.failures():
            raise CheckFailed("; ".join(report.failures()))

    return verify


def convert_command(config: Config, args: argparse.Namespace) -> int:
    from worker.convert import convert
    from worker.errors import ModelUnavailableError

    stem = "DepthPro-FOV" if args.contract == "canonical" else "DepthPro-Meters"
    suffix = "" if args.compression == "none" else f"-{args.compression}"
    output = args.output or config.model.cache_dir / f"{stem}{suffix}.mlpackage"
    started = time.perf_counter()
    try:
        report = convert(
            config.model,
            output,
            compression=args.compression,
            precision=args.precision,
            contract=args.contract,
            verify=None if args.no_check else _short_check(config, output),
        )
    except CheckFailed as exc:
        print(
            f"depthq: the converted package computes something else than {config.model.path}: {exc}. It is kept "
            f"aside as {output}.failed-check (no worker picks it up) and {output} was left as it was; "
            "`depthq models check` it with --photos to see more, or convert again",
            file=sys.stderr,
        )
        return 1
    except ImportError as exc:  # torch and transformers are imported only when converting
        raise ModelUnavailableError(
            f"converting needs PyTorch and transformers ({exc}); pip install -e '.[torch]' on any machine, "
            "then copy the .mlpackage to the Mac"
        ) from None
    parity = ", ".join(f"{name} {diff:.1e}" for name, diff in report.parity.items())
    print(
        f"wrote {report.output} in {time.perf_counter() - started:.0f}s: {_contract_label(report.output)}; "
        f"traced module vs original, max abs difference: {parity}"
    )
    return 0
