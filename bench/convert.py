"""Benchmark 9, convert: `depthq models convert` on the full-size DepthPro, as a user runs it once.

The weights are random (the architecture decides time, memory and size; no 1.9 GB download): apple/
DepthPro-hf's, three DINOv2 ViT-L/16 encoders at 384 px and the FOV head, as `bench gpu` builds it.
Each conversion is the real command in a process of its own, so its wall time and peak RSS are its
own; the traced module's parity with the original and the time of each stage come from the
converter's log, and the spec from the package it wrote.

Goal: a user converts once, on a Linux box or a Mac, so minutes are fine; hours, or more memory than
a 16 GB Mac mini has, are not: <= 15 min and <= 12 GB peak on this machine.
"""

from __future__ import annotations

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
# (compression, precision): the default, and one palettization.
VARIANTS = (("none", "float16"), ("palettize8", "float16"))
_STAGE = re.compile(r"worker\.convert: (?P<stage>.+): (?P<seconds>[0-9.]+) s$")
_PARITY = re.compile(r"max abs difference: (?P<parity>.+)$")


def build_checkpoint(folder: Path, quick: bool) -> tuple[Path, int]:
    """Random weights saved as a checkpoint `depthq models convert --model` reads; returns its parameters."""
    import torch
    from transformers import DepthProForDepthEstimation

    if quick:
        from testkit.tiny_model import released_geometry_config

        config = released_geometry_config()
    else:
        from bench.gpu import depthpro_config

        config = depthpro_config()
    torch.manual_seed(0)
    model = DepthProForDepthEstimation(config, use_fov_model=True).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    return folder, params


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def convert_once(checkpoint: Path, output: Path, compression: str, precision: str) -> dict[str, Any]:
    """The real command in its own process, its log streamed here as progress; wall time and peak RSS."""
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
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DEPTHQ_LOG_LEVEL": "INFO"}
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stages: dict[str, float] = {}
    parity = ""
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = [*tail[-20:], line]
        if "worker.convert: " in line or line.startswith("wrote "):
            console.print(f"    {line.split('worker.convert: ')[-1]}", highlight=False)
        if m := _STAGE.search(line):
            stages[m["stage"]] = float(m["seconds"])
        if m := _PARITY.search(line):
            parity = m["parity"]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        return {"variant": f"{precision}, {compression}", "error": f"exit {code}: " + " | ".join(tail[-3:])}
    spec = read_spec(output)
    return {
        "variant": f"{precision}, {compression}",
        "wall_s": wall,
        "peak_bytes": usage.ru_maxrss * 1024,  # kilobytes on Linux
        "size_bytes": _size(output),
        "parity": parity,
        "stages_s": stages,
        "inputs": [str(feature_info(f)) for f in spec.description.input],
        "outputs": [str(feature_info(f)) for f in spec.description.output],
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Full size unless `quick` (then the released geometry with tiny widths: a smoke run in seconds)."""
    console.print(machine())
    with tempfile.TemporaryDirectory(prefix="depthq-bench-convert-", dir=".") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        checkpoint, params = build_checkpoint(root / "checkpoint", quick)
        what = "released geometry, tiny widths (--quick)" if quick else "full size, apple/DepthPro-hf architecture"
        console.print(f"built {what}: {params:,} parameters, random, saved in {time.perf_counter() - t0:.0f} s")
        results = []
        for compression, precision in VARIANTS:
            console.print(f"  converting: {precision}, compression {compression}")
            output = root / f"DepthPro-{compression}.mlpackage"
            results.append(convert_once(checkpoint, output, compression, precision))
            shutil.rmtree(output, ignore_errors=True)
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["variant"], r["error"], "", "", "", ""))
            continue
        ok = r["wall_s"] <= GOAL_S and r["peak_bytes"] <= GOAL_BYTES
        rows.append(
            (
                r["variant"],
                f"{r['wall_s']:.0f} s",
                f"{r['peak_bytes'] / 1e9:.1f} GB",
                format_size(r["size_bytes"]),
                r["parity"],
                verdict(ok),
            )
        )
    print_table(
        f"depthq models convert, {what} ({params:,} parameters); goal <= 15 min and <= 12 GB peak",
        ["variant", "wall", "peak RSS", "package", "traced vs original (max abs)", "goal"],
        rows,
    )
    for r in results:
        if "stages_s" in r:
            stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["stages_s"].items())
            console.print(f"{r['variant']}: {stages}")
            console.print(f"  spec: inputs {r['inputs']}; outputs {r['outputs']}")
    return {"params": params, "quick": quick, "results": results}
