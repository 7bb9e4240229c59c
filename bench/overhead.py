"""Benchmark 1: the CPU a photo costs outside the model's forward pass, against the reference CLI's stages.

What is timed is depthq's real job (`worker.job._compute`): read, hash, decode, orient, preprocess,
metric depth at full resolution, statistics, preview, and every output written with its fsync. Only
the forward pass is left out: the stand-in backend (bench/standin.py, with no sleep) runs the real
preprocessing, then returns a fixed, smooth inverse depth map at the model's input size.

The baseline, in the same run on the same photo, is what apple/ml-depth-pro's CLI does around its
model: full decode, a float normalize at full resolution, bilinear resize to the model's size, the
resize back, `np.savez_compressed`, and a turbo-coloured JPEG (here with OpenCV's turbo table,
which is faster than the reference's matplotlib, so the ratio is if anything flattering to the
baseline).

Both run pinned to one core (and OpenCV and torch told to use one thread), since the goal is per core.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from bench.common import machine, median, ms, print_table, verdict
from bench.standin import StandInBackend, smooth_inverse_depth
from depthq.config import load_config
from depthq.contract import BASE_OUTPUTS, JobPayload
from testkit.photos import synthetic_photo
from worker.preprocess import model_input
from worker.store import OutputStore
from worker.transport import SharedTransport

# DepthPro's input side; the stand-in reports it as the real backend would read it from the model.
MODEL_SIDE = 1536
GOAL_RATIO = 0.10
GOAL_MS = 150.0


def reference_stages(data: bytes, inverse: np.ndarray) -> None:
    """ml-depth-pro's CLI around its model: load_rgb, transform, resize, infer's post-processing, saves."""
    import torch
    import torch.nn.functional as F
    from PIL import ImageOps

    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    rgb = np.array(img.convert("RGB"))
    height, width = rgb.shape[:2]
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)
    x = (x - 0.5) / 0.5
    x = F.interpolate(x[None], size=(MODEL_SIDE, MODEL_SIDE), mode="bilinear", align_corners=False)
    f_px = 0.5 * width / math.tan(math.radians(60.0) / 2)
    inv = torch.from_numpy(inverse) * (width / f_px)
    inv = F.interpolate(inv[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    depth = 1.0 / inv.clamp(min=1e-4, max=1e4)
    buf = io.BytesIO()
    np.savez_compressed(buf, depth=depth.numpy())
    inverse_depth = 1.0 / depth
    lo, hi = max(float(inverse_depth.min()), 1 / 250), min(float(inverse_depth.max()), 1 / 0.1)
    normalized = ((inverse_depth - lo) / (hi - lo)).clamp(0, 1).numpy()
    coloured = cv2.applyColorMap((normalized * 255).astype(np.uint8), cv2.COLORMAP_TURBO)[..., ::-1]
    Image.fromarray(np.ascontiguousarray(coloured)).save(io.BytesIO(), format="JPEG", quality=90)


def _ours(folder: Path, name: str, extra: tuple[str, ...] = ()) -> Any:
    """depthq's job on `name` in `folder`, minus the forward pass, writing the base outputs and `extra`
    ones; returns a callable per run."""
    from worker import job as job_module

    config = load_config(
        environ={}, overrides={"producer": {"watch": str(folder)}, "output": {"dir": str(folder / "out")}}
    )
    runtime = job_module.Runtime(
        config=config,
        backend=StandInBackend(sleep_s=0.0, input_size=MODEL_SIDE),
        transports={"shared": SharedTransport(config, OutputStore(config.output.dir))},
        host="bench",
        worker_name="bench",
        connection=None,  # type: ignore[arg-type]  # only used with a real job, never with job=None
    )
    outputs = [*BASE_OUTPUTS, *extra]
    payload = JobPayload(source=name, size=0, mtime=0.0, sha256="", model="stand-in", outputs=outputs)
    return lambda: job_module._compute(runtime, payload, None)


def _measure(fn: Any, repeat: int) -> tuple[list[float], list[float]]:
    fn()  # first-call costs (imports, allocator growth) are not the steady state
    wall, cpu = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def _input_difference(a: np.ndarray, b: np.ndarray) -> str:
    """Model-input difference in the model's [-1, 1] units, and in 8-bit grey levels."""
    diff = np.abs(a - b)
    return f"mean {diff.mean():.4f} ({diff.mean() * 127.5:.2f} levels), max {diff.max():.3f}"


def ideas(folder: Path, repeat: int) -> list[list[str]]:
    """The ideas the issue lists, each timed against what it replaces, with its cost in fidelity."""
    from worker.images import load_image
    from worker.preview import preview_png

    rows = []
    big = folder / "photo48.jpg"
    Image.fromarray(synthetic_photo(8064, 6048, seed=1)).save(big, format="JPEG", quality=90)
    data = big.read_bytes()
    full_wall, _ = _measure(lambda: model_input(load_image(data, "48", 10**9).rgb, MODEL_SIDE), max(2, repeat // 3))
    reduced_wall, _ = _measure(
        lambda: model_input(load_image(data, "48", 10**9, min_side=MODEL_SIDE).rgb, MODEL_SIDE), max(2, repeat // 3)
    )
    reference_input = model_input(load_image(data, "48", 10**9).rgb, MODEL_SIDE)
    reduced_input = model_input(load_image(data, "48", 10**9, min_side=MODEL_SIDE).rgb, MODEL_SIDE)
    rows.append(
        [
            "48 MP JPEG decoded reduced in the DCT, to 3024 x 2268 (worker.fast_decode, off by default)",
            f"{ms(median(full_wall))} -> {ms(median(reduced_wall))}",
            _input_difference(reduced_input, reference_input),
        ]
    )

    rgb = synthetic_photo(4032, 3024)
    float_wall, _ = _measure(lambda: model_input(rgb, MODEL_SIDE), repeat)

    def uint8_input() -> np.ndarray:
        small = cv2.resize(rgb, (MODEL_SIDE, MODEL_SIDE), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        return np.ascontiguousarray((small * (2.0 / 255.0) - 1.0).transpose(2, 0, 1))

    uint8_wall, _ = _measure(uint8_input, repeat)
    rows.append(
        [
            "12 MP resize on uint8 instead of float32 (not adopted)",
            f"{ms(median(float_wall))} -> {ms(median(uint8_wall))}",
            _input_difference(uint8_input(), model_input(rgb, MODEL_SIDE)),
        ]
    )

    depth = (1.0 / np.clip(cv2.resize(smooth_inverse_depth(MODEL_SIDE), (4032, 3024)), 1e-4, 1e4)).astype(np.float32)
    full_preview, _ = _measure(lambda: preview_png(depth, 10**6), repeat)
    small_preview, _ = _measure(lambda: preview_png(depth, MODEL_SIDE), repeat)
    rows.append(
        [
            "preview at the model's resolution, unfiltered PNG (adopted)",
            f"{ms(median(full_preview))} -> {ms(median(small_preview))}",
            "same colours, 1536 px long side instead of 4032",
        ]
    )

    from worker.depth import depth_stats

    def exact_median() -> float:
        flat = depth.ravel().copy()
        return float(np.partition(flat, flat.size // 2)[flat.size // 2])

    exact_wall, _ = _measure(exact_median, repeat)
    grid_wall, _ = _measure(lambda: depth_stats(depth, MODEL_SIDE), repeat)
    exact, grid = exact_median(), depth_stats(depth, MODEL_SIDE)["median"]
    rows.append(
        [
            "median over the model's grid, not all 12 M pixels (adopted)",
            f"{ms(median(exact_wall))} -> {ms(median(grid_wall))}",
            f"median differs by {abs(grid - exact) / exact:.1e} (relative)",
        ]
    )

    def savez() -> None:
        np.savez_compressed(io.BytesIO(), depth=depth)

    def npy() -> None:
        np.save(io.BytesIO(), depth)

    savez_wall, _ = _measure(savez, max(2, repeat // 3))
    npy_wall, _ = _measure(npy, repeat)
    rows.append(
        [
            "12 MP depth as .npy instead of savez_compressed",
            f"{ms(median(savez_wall))} -> {ms(median(npy_wall))}",
            "none (lossless both)",
        ]
    )
    return rows


# The optional outputs, in `output.formats` order; each is timed as the whole job with it added.
EXTRA_FORMATS = ("tiff", "png16", "ply", "exr")


def formats(folder: Path, name: str, repeat: int) -> list[list[str]]:
    """What each optional output adds to the whole job on a 12 MP photo, and the size of its file: the
    job with the format minus the job without, both measured here, alternating, so drift cancels."""
    from depthq.contract import output_path

    base = _ours(folder, name)
    rows = []
    for kind in EXTRA_FORMATS:
        with_kind = _ours(folder, name, (kind,))
        base_wall, base_cpu = _measure(base, repeat)
        kind_wall, kind_cpu = _measure(with_kind, repeat)
        size = output_path(folder / "out", name, kind).stat().st_size
        rows.append(
            [
                kind,
                f"+{ms(median(kind_wall) - median(base_wall))}",
                f"+{ms(median(kind_cpu) - median(base_cpu))}",
                f"{size / 1e6:.1f} MB",
            ]
        )
    return rows


@contextmanager
def _one_core() -> Iterator[None]:
    """Pinned to one core with one thread each for OpenCV and torch, and all restored afterwards:
    the benchmarks after this one (and the processes they start) get the whole machine back."""
    import torch

    cores, cv_threads, torch_threads = os.sched_getaffinity(0), cv2.getNumThreads(), torch.get_num_threads()
    os.sched_setaffinity(0, {min(cores)})
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)
        cv2.setNumThreads(cv_threads)
        torch.set_num_threads(torch_threads)


def run(quick: bool = False) -> dict[str, Any]:
    with _one_core():
        return _run(quick)


def _run(quick: bool) -> dict[str, Any]:
    import pillow_heif

    pillow_heif.register_heif_opener()
    repeat = 3 if quick else 9
    results: dict[str, Any] = {"machine": machine(), "repeat": repeat}
    rows = []
    with tempfile.TemporaryDirectory(prefix="depthq-bench-overhead-", dir=".") as tmp:
        folder = Path(tmp)
        rgb = synthetic_photo(4032, 3024)
        # HEIC at quality 60: smaller than the JPEG, as a phone's HEIC is.
        for fmt, name, quality in (("JPEG", "photo.jpg", 90), ("HEIF", "photo.heic", 60)):
            Image.fromarray(rgb).save(folder / name, format=fmt, quality=quality)
            data = (folder / name).read_bytes()
            inverse = smooth_inverse_depth(MODEL_SIDE)
            base_wall, base_cpu = _measure(lambda data=data, inverse=inverse: reference_stages(data, inverse), repeat)
            our_wall, our_cpu = _measure(_ours(folder, name), repeat)
            ratio = median(our_wall) / median(base_wall)
            ok = ratio <= GOAL_RATIO and median(our_cpu) * 1000 <= GOAL_MS
            results[name] = {
                "bytes": len(data),
                "baseline_wall_s": median(base_wall),
                "baseline_cpu_s": median(base_cpu),
                "ours_wall_s": median(our_wall),
                "ours_cpu_s": median(our_cpu),
                "ratio": ratio,
                "met": ok,
            }
            rows.append(
                [
                    f"12 MP {fmt} ({len(data) / 1e6:.1f} MB)",
                    ms(median(base_wall)),
                    f"{ms(median(our_wall))} ({ms(median(our_cpu))} CPU)",
                    f"{ratio:.3f}",
                    f"<= {GOAL_RATIO} and <= {GOAL_MS:.0f} ms",
                    verdict(ok),
                ]
            )
        format_rows = formats(folder, "photo.jpg", repeat)
        idea_rows = ideas(folder, repeat)
    print(results["machine"])
    print_table(
        "non-model overhead per photo, one core (medians)",
        ["photo", "reference CLI stages", "depthq", "ratio", "goal", ""],
        rows,
    )
    print_table(
        "ideas, each measured against what it replaces", ["idea", "time", "cost in the model's input"], idea_rows
    )
    print_table(
        "what each optional output adds, 12 MP JPEG, whole job (medians)",
        ["output.formats", "wall", "CPU", "file"],
        format_rows,
    )
    results["ideas"] = idea_rows
    results["formats"] = format_rows
    return results
