"""Benchmark 9, convert: `depthq models convert` on the full-size DepthPro, as a user runs it once, then
`depthq models check` on each package it made.

The weights are random (the architecture decides time, memory and size; no 1.9 GB download): apple/
DepthPro-hf's, three DINOv2 ViT-L/16 encoders at 384 px and the FOV head, as `bench gpu` builds it.
The two heads' last layers are then rescaled (`testkit.tiny_model.make_plausible`) so the canonical
inverse depth is positive (about 1 +- 0.15) and the FOV a camera's (about 60 degrees): with random
weights as drawn, the FOV head answers no camera's angle and the inverse depth straddles zero, where a
depth in meters, and so a relative depth error, means nothing. Everything before the heads is as drawn.
The checkpoint is built in a process of its own, so the bench's process holds no model while the
measured ones run.

Each conversion is the real command in a process of its own, with `--no-check`: its wall time and peak
RSS are the conversion's alone, not the short check a user's conversion ends with. The traced module's
parity with the original and the time of each stage come from the converter's log, and the spec from
the package it wrote.

Each package is then checked the way a user checks one, `depthq models check PACKAGE --against
CHECKPOINT --scenes N --json ...`, again in a process of its own (its wall time and peak RSS): off macOS
the package runs in depthq's MIL executor, float16 as declared, and the reference is the checkpoint in
torch, float32, on the CPU. From its JSON report: the relative depth error (median, p95, max) and the
FOV and focal-length errors against torch, the executor's time and the most its live values held, and
torch's time.

Goals: a user converts once, on a Linux box or a Mac, so minutes are fine; hours, or more memory than a
16 GB Mac mini has, are not: <= 15 min and <= 12 GB peak on this machine. The executed check must fit
this 24 GiB machine beside nothing else; its time is informational (a Mac runs the package in Core ML).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import console, machine, print_table, verdict
from worker.catalog import format_size
from worker.coreml_spec import feature_info, read_spec

GOAL_S = 15 * 60
GOAL_BYTES = 12 * 10**9
CHECK_GOAL_BYTES = 24 * 2**30
# (compression, precision): the default, and one palettization.
VARIANTS = (("none", "float16"), ("palettize8", "float16"))
# Built-in scenes the check runs: one takes minutes at full size in the executor.
CHECK_SCENES = 1
_STAGE = re.compile(r"worker\.convert: (?P<stage>.+): (?P<seconds>[0-9.]+) s$")
_PARITY = re.compile(r"max abs difference: (?P<parity>.+)$")


def build_checkpoint(folder: Path, quick: bool) -> tuple[Path, int]:
    """Random weights, heads made plausible, saved as a checkpoint `depthq models convert --model` reads;
    returns its parameters."""
    import torch
    from transformers import DepthProForDepthEstimation

    from testkit.tiny_model import make_plausible

    if quick:
        from testkit.tiny_model import released_geometry_config

        config = released_geometry_config()
    else:
        from bench.gpu import depthpro_config

        config = depthpro_config()
    torch.manual_seed(0)
    model = DepthProForDepthEstimation(config, use_fov_model=True).eval()
    make_plausible(model)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    return folder, params


def _build_apart(folder: Path, quick: bool) -> int:
    """`build_checkpoint` in a child process: the model and its forward pass never live in this one."""
    code = (
        "import sys; from pathlib import Path; from bench.convert import build_checkpoint; "
        "print(build_checkpoint(Path(sys.argv[1]), sys.argv[2] == 'quick')[1])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(folder), "quick" if quick else "full"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the checkpoint failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return int(done.stdout.split()[-1])


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _run_streamed(command: list[str], show: Any) -> tuple[int, float, int, list[str]]:
    """Run `command`, its output streamed here through `show`; exit code, wall seconds, peak RSS bytes
    (its own: os.wait4 reports the child's), and its last lines."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DEPTHQ_LOG_LEVEL": "INFO"}
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        lines.append(line)
        show(line)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    return os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss * 1024, lines  # kilobytes on Linux


def convert_once(checkpoint: Path, output: Path, compression: str, precision: str) -> dict[str, Any]:
    """The real command in its own process, without the check that ends it, its log streamed here as
    progress; wall time and peak RSS."""
    command = [
        sys.executable,
        "-m",
        "depthq",
        "models",
        "convert",
        "--model",
        str(checkpoint),
        "--output",
        str(output),
        "--compression",
        compression,
        "--precision",
        precision,
        "--no-check",
    ]

    def show(line: str) -> None:
        if "worker.convert: " in line or line.startswith("wrote "):
            console.print(f"    {line.split('worker.convert: ')[-1]}", highlight=False)

    code, wall, peak, lines = _run_streamed(command, show)
    variant = f"{precision}, {compression}"
    if code != 0:
        return {"variant": variant, "error": f"exit {code}: " + " | ".join(lines[-3:])}
    stages = {m["stage"]: float(m["seconds"]) for m in map(_STAGE.search, lines) if m}
    parity = next((m["parity"] for m in map(_PARITY.search, reversed(lines)) if m), "")
    spec = read_spec(output)
    return {
        "variant": variant,
        "wall_s": wall,
        "peak_bytes": peak,
        "size_bytes": _size(output),
        "parity": parity,
        "stages_s": stages,
        "inputs": [str(feature_info(f)) for f in spec.description.input],
        "outputs": [str(feature_info(f)) for f in spec.description.output],
    }


def check_once(package: Path, checkpoint: Path, scenes: int, report: Path) -> dict[str, Any]:
    """`depthq models check` in its own process: wall time and peak RSS, and its JSON report. Exit 1
    (an error past the default limits) is a result, not a failure of the bench."""
    command = [
        sys.executable,
        "-m",
        "depthq",
        "models",
        "check",
        str(package),
        "--against",
        str(checkpoint),
        "--scenes",
        str(scenes),
        "--json",
        str(report),
    ]

    def show(line: str) -> None:
        if line.startswith("checking ") or line.startswith("ran with") or line.startswith("overall"):
            console.print(f"    {line}", highlight=False)

    code, wall, peak, lines = _run_streamed(command, show)
    if code not in (0, 1) or not report.is_file():
        said = [line for line in lines if " WARNING " not in line]  # coremltools warns once an op
        return {"error": f"exit {code}: " + " | ".join(said[-3:])}
    data = json.loads(report.read_text())
    items = data["items"]
    f_px = [i["f_px_error"] for i in items if i["f_px_error"] is not None]
    return {
        "wall_s": wall,
        "peak_bytes": peak,
        "runtime": data["runtime"],
        "kind": data["kind"],
        "median": data["median"],
        "p95": data["p95"],
        "max": data["max"],
        "fov_error_deg": data["worst_fov_error_deg"],
        "f_px_error": max(f_px) if f_px else None,
        "fixed_fov": any(i["fixed_fov"] for i in items),
        "fov_torch": [i["fov_torch"] for i in items],
        "fov_package": [i["fov_package"] for i in items],
        "executor_s": sum(i["seconds_package"] for i in items),
        "executor_peak_bytes": data["executor_peak_bytes"],
        "torch_s": sum(i["seconds_torch"] for i in items),
        "limits": data["limits"],
        "failures": data["failures"],
    }


def _conversion_row(r: dict[str, Any]) -> tuple[str, ...]:
    if "error" in r:
        return (r["variant"], r["error"], "", "", "", "")
    ok = r["wall_s"] <= GOAL_S and r["peak_bytes"] <= GOAL_BYTES
    return (
        r["variant"],
        f"{r['wall_s']:.0f} s",
        f"{r['peak_bytes'] / 1e9:.1f} GB",
        format_size(r["size_bytes"]),
        r["parity"],
        verdict(ok),
    )


def _check_row(variant: str, c: dict[str, Any] | None) -> tuple[str, ...]:
    if c is None or "error" in c:
        return (variant, "not run" if c is None else c["error"], *[""] * 10)
    fov = "-" if c["fov_error_deg"] is None else f"{c['fov_error_deg']:.4f} deg"
    f_px = "-" if c["f_px_error"] is None else f"{c['f_px_error']:.1e}"
    peak_live = "-" if c["executor_peak_bytes"] is None else f"{c['executor_peak_bytes'] / 1e9:.2f} GB"
    limits = "passed" if not c["failures"] else "[red]past[/red]"
    return (
        variant,
        f"{c['median']:.1e}",
        f"{c['p95']:.1e}",
        f"{c['max']:.1e}",
        fov,
        f_px,
        f"{c['executor_s']:.0f} s",
        peak_live,
        f"{c['torch_s']:.0f} s",
        f"{c['wall_s']:.0f} s",
        f"{c['peak_bytes'] / 2**30:.1f} GiB",
        f"{limits}; {verdict(c['peak_bytes'] <= CHECK_GOAL_BYTES)}",
    )


def run(quick: bool = False) -> dict[str, Any]:
    """Full size unless `quick` (then the released geometry with tiny widths: a smoke run in seconds)."""
    console.print(machine())
    scenes = 3 if quick else CHECK_SCENES
    with tempfile.TemporaryDirectory(prefix="depthq-bench-convert-", dir=".") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        checkpoint = root / "checkpoint"
        params = _build_apart(checkpoint, quick)
        what = "released geometry, tiny widths (--quick)" if quick else "full size, apple/DepthPro-hf architecture"
        console.print(
            f"built {what}: {params:,} parameters, random, heads made plausible, saved in "
            f"{time.perf_counter() - t0:.0f} s"
        )
        results = []
        for compression, precision in VARIANTS:
            console.print(f"  converting: {precision}, compression {compression} (--no-check)")
            output = root / f"DepthPro-{compression}.mlpackage"
            result = convert_once(checkpoint, output, compression, precision)
            if "error" not in result:
                console.print(f"  checking: {output.name} against the checkpoint, {scenes} scene(s)")
                result["check"] = check_once(output, checkpoint, scenes, root / f"check-{compression}.json")
            results.append(result)
            shutil.rmtree(output, ignore_errors=True)
    print_table(
        f"depthq models convert --no-check, {what} ({params:,} parameters); goal <= 15 min and <= 12 GB peak",
        ["variant", "wall", "peak RSS", "package", "traced vs original (max abs)", "goal"],
        [_conversion_row(r) for r in results],
    )
    print_table(
        f"depthq models check --scenes {scenes}, the same packages in depthq's MIL executor (float16 as "
        "declared) vs the checkpoint in torch float32 on the CPU; goal: peak RSS fits 24 GiB (time informational)",
        [
            "variant",
            "depth err median",
            "p95",
            "max",
            "FOV err",
            "f_px err",
            "executor",
            "executor live peak",
            "torch",
            "check wall",
            "check peak RSS",
            "default limits; goal",
        ],
        [_check_row(r["variant"], r.get("check")) for r in results],
    )
    for r in results:
        if "stages_s" in r:
            stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["stages_s"].items())
            console.print(f"{r['variant']}: {stages}")
            console.print(f"  spec: inputs {r['inputs']}; outputs {r['outputs']}")
        c = r.get("check")
        if c and "error" not in c:
            fovs = ", ".join(
                "-" if f is None or g is None else f"{g:.3f} / {f:.3f}"
                for f, g in zip(c["fov_torch"], c["fov_package"], strict=True)
            )
            console.print(
                f"  check: {c['runtime']}; FOV package / torch {fovs} deg"
                + ("; depth compared at a fixed 60 deg (torch's FOV no camera's)" if c["fixed_fov"] else "")
                + (f"; past its limits: {'; '.join(c['failures'])}" if c["failures"] else "")
            )
    return {"params": params, "quick": quick, "scenes": scenes, "results": results}
