"""`depthq models check`: does a Core ML package compute the depth its torch model computes?

A package is checked the way a worker would use it. The same photos go through both real backends,
their own pre- and post-processing included (`CoreMLBackend.inputs_for` and `prediction_from`, the
torch backend's `predict`), and through the one shared metric math (`worker.depth.metric_depth`); the
depth maps in meters and the fields of view are then compared. On macOS the package runs in Core ML
itself; elsewhere in depthq's MIL executor (`worker.mil_executor`), which shows whether the program
means what the torch model means, though not how the Neural Engine rounds, nor how fast it is.

Without photos the check uses synthetic scenes drawn at the model's input size. A photo of another size
reaches a Core ML image input as its resize in 8 bits (`inputs_for`), which torch takes in floats: the
errors judged are those on the same 8-bit pixels, the package's own, and the error against a torch
worker given the photo itself is shown beside them.

The model tooling uses this; the worker never does.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from depthq.config import ModelConfig
from worker.backends.base import Backend, Prediction
from worker.backends.coreml_backend import CoreMLBackend, can_predict_here
from worker.depth import focal_px_from_fov, is_camera_fov, metric_depth
from worker.errors import ModelUnavailableError

# Default limits, by what the package is: relative depth error (median, p95) and FOV error (degrees).
# Measured on the released geometry (tests/test_model_check.py, bench convert; bench/RESULTS.md),
# with margin; a package past them computes something else than its checkpoint.
DEFAULT_LIMITS: dict[str, tuple[float, float, float]] = {
    "float32": (1e-4, 1e-3, 0.01),
    "float16": (0.005, 0.02, 0.1),
    "int8": (0.02, 0.08, 0.5),
    "palettize8": (0.02, 0.08, 0.5),
    "palettize6": (0.05, 0.2, 1.0),
    "palettize4": (0.15, 0.5, 3.0),
}
# A scene's (or a photo's) depth is compared at this FOV when the torch model answers none a camera
# could have (random weights do): the depth error is then the inverse depth's alone.
FALLBACK_FOV_DEG = 60.0
SCENES = ("room", "street", "portrait")


@dataclass(frozen=True)
class Limits:
    median: float
    p95: float
    fov_deg: float

    @classmethod
    def for_kind(cls, kind: str) -> Limits:
        return cls(*DEFAULT_LIMITS.get(kind, DEFAULT_LIMITS["float16"]))


@dataclass
class ItemResult:
    """One scene or photo: the package's depth against the torch model's."""

    name: str
    width: int
    height: int
    median: float
    p95: float
    max: float
    fov_package: float | None
    fov_torch: float | None
    f_px_package: float | None
    f_px_torch: float | None
    seconds_package: float
    seconds_torch: float
    # The depth was compared at FALLBACK_FOV_DEG: the torch model's FOV was none a camera has.
    fixed_fov: bool = False
    # A photo of another size than the model's, into an image input: the median error against what a
    # torch worker computes from the photo itself (the errors above compare the same 8-bit pixels).
    median_vs_torch_worker: float | None = None

    @property
    def fov_error_deg(self) -> float | None:
        if self.fov_package is None or self.fov_torch is None:
            return None
        return abs(self.fov_package - self.fov_torch)

    @property
    def f_px_error(self) -> float | None:
        """Relative: |f_package - f_torch| / f_torch."""
        if self.f_px_package is None or self.f_px_torch is None:
            return None
        return abs(self.f_px_package - self.f_px_torch) / self.f_px_torch


@dataclass
class CheckReport:
    package: Path
    against: str
    kind: str  # float32, float16, int8, palettize8...: what the default limits are chosen by
    runtime: str  # "Core ML (compute units all)" or "depthq's MIL executor (float16 as declared)"
    limits: Limits
    items: list[ItemResult] = field(default_factory=list)
    # Every item's errors together, for the overall line.
    median: float = 0.0
    p95: float = 0.0
    max: float = 0.0
    executor_peak_bytes: int | None = None

    @property
    def worst_fov_error(self) -> float | None:
        errors = [e for e in (item.fov_error_deg for item in self.items) if e is not None]
        return max(errors) if errors else None

    def as_dict(self) -> dict[str, Any]:
        """For `--json`: every figure the table shows, and the verdict."""
        return {
            "package": str(self.package),
            "against": self.against,
            "kind": self.kind,
            "runtime": self.runtime,
            "limits": asdict(self.limits),
            "median": self.median,
            "p95": self.p95,
            "max": self.max,
            "worst_fov_error_deg": self.worst_fov_error,
            "executor_peak_bytes": self.executor_peak_bytes,
            "items": [
                {**asdict(item), "fov_error_deg": item.fov_error_deg, "f_px_error": item.f_px_error}
                for item in self.items
            ],
            "failures": self.failures(),
        }

    def failures(self) -> list[str]:
        """What is past its limit, in words; empty when the package passes."""
        out = []
        if self.median > self.limits.median:
            out.append(f"median depth error {self.median:.2e} > {self.limits.median:.2e} (--max-median)")
        if self.p95 > self.limits.p95:
            out.append(f"p95 depth error {self.p95:.2e} > {self.limits.p95:.2e} (--max-p95)")
        fov = self.worst_fov_error
        if fov is not None and fov > self.limits.fov_deg:
            out.append(f"FOV error {fov:.3f} deg > {self.limits.fov_deg} deg (--max-fov-error)")
        return out


def scene(name: str, size: int) -> np.ndarray:
    """A synthetic photo, uint8 (size, size, 3), the same on every machine: something with depth in it
    (a receding floor, a horizon, a near object before a far wall), texture and edges."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rng = np.random.default_rng(SCENES.index(name) if name in SCENES else 0)
    grain = rng.normal(0, 6, (size, size, 1)).astype(np.float32)
    if name == "room":
        floor = y > 0.55
        depth = np.where(floor, 0.12 / np.maximum(y - 0.45, 0.02), 2.0)
        checker = ((np.floor(x * 12 * (1 + 2 * y)) + np.floor(depth * 4)) % 2).astype(np.float32)
        base = np.stack([150 + 60 * checker, 120 + 40 * checker, 90 + 20 * (1 - checker)], axis=-1)
        wall = np.stack([200 - 30 * y, 190 - 20 * x, 170 + 0 * x], axis=-1)
        image = np.where(floor[..., None], base, wall)
        box = (abs(x - 0.35) < 0.12) & (abs(y - 0.6) < 0.15)
        image[box] = [60, 90, 160]
    elif name == "street":
        sky = y < 0.4
        stripes = (np.sin((x - 0.5) / np.maximum(y - 0.38, 0.01) * 6) > 0).astype(np.float32)
        road = np.stack([90 + 40 * stripes, 90 + 40 * stripes, 95 + 40 * stripes], axis=-1)
        heaven = np.stack([120 + 100 * y, 160 + 80 * y, 235 + 0 * y], axis=-1)
        image = np.where(sky[..., None], heaven, road)
        for left in (0.05, 0.75):
            building = (x > left) & (x < left + 0.2) & (y > 0.15) & (y < 0.6)
            image[building] = [140, 110, 100]
    else:  # portrait: a near face before a blurred far background
        background = np.stack([80 + 60 * np.sin(x * 9), 100 + 50 * np.cos(y * 7), 120 + 0 * x], axis=-1)
        image = background
        face = (x - 0.5) ** 2 / 0.05 + (y - 0.45) ** 2 / 0.08 < 1
        image[face] = [225, 180, 150]
        eyes = ((x - 0.42) ** 2 + (y - 0.4) ** 2 < 0.0006) | ((x - 0.58) ** 2 + (y - 0.4) ** 2 < 0.0006)
        image[eyes] = [40, 30, 30]
    return np.clip(image + grain, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class _Photo:
    name: str
    rgb: np.ndarray
    focal_length_35mm: float | None


def _photos(folder: Path, skipped: Callable[[str], None]) -> Iterator[_Photo]:
    """The folder's photos, upright, with their EXIF focal length; a file that is no photo is named
    through `skipped` and left out. None at all is an error: there would be nothing to compare."""
    from worker.errors import BadInputError
    from worker.images import load_image

    if not folder.is_dir():
        raise ModelUnavailableError(f"--photos {folder}: no such folder")
    found = 0
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            loaded = load_image(path.read_bytes(), path.name, max_pixels=200_000_000)
        except (BadInputError, OSError) as exc:
            skipped(f"skipping {path}: {exc}")
            continue
        found += 1
        yield _Photo(path.name, loaded.rgb, loaded.focal_length_35mm)
    if not found:
        raise ModelUnavailableError(f"--photos {folder}: no photo there that this worker could read")


class _PackageRunner:
    """The package behind its real backend: Core ML on macOS, the MIL executor elsewhere."""

    def __init__(self, package: Path, cache_dir: Path, float32: bool):
        config = ModelConfig(path="unused", coreml_path=package, cache_dir=cache_dir, compute_units="all")
        self.backend = CoreMLBackend(config)
        self.executor: Any = None
        if can_predict_here():
            self.backend.load()
            self.runtime = f"Core ML (compute units {config.compute_units})"
        else:
            from worker.mil_executor import ProgramExecutor

            self.executor = ProgramExecutor(package, float32=float32)
            mode = "float32 throughout" if float32 else f"{self.executor.precision} as declared"
            self.runtime = f"depthq's MIL executor ({mode}; Core ML itself runs only on macOS)"

    @property
    def input_size(self) -> int:
        return self.backend.input_size

    def image_pixels(self, rgb: np.ndarray) -> np.ndarray | None:
        """The 8-bit pixels an image input is given for `rgb` (`inputs_for`'s resize), when they are not
        `rgb` itself; None for a tensor input, which takes the same floats torch does."""
        contract = self.backend.contract
        if not contract.input_is_image or rgb.shape[:2] == (contract.input_size, contract.input_size):
            return None
        return np.asarray(self.backend.inputs_for(rgb)[contract.image_input])

    def predict(self, rgb: np.ndarray) -> Prediction:
        if self.executor is None:
            return self.backend.predict(rgb)
        return self.backend.prediction_from(self.executor.predict(self.backend.inputs_for(rgb)))


def package_kind(package: Path, metadata: dict[str, str]) -> str:
    """The compression the package records, else float16 or float32 as its program computes (read from
    the spec, on any platform): what its limits are chosen by."""
    from coremltools.proto import MIL_pb2

    from worker.coreml_spec import read_spec

    compression = metadata.get("depthq.compression")
    if compression and compression != "none":
        return compression
    program = read_spec(package).mlProgram
    blocks = program.functions["main"].block_specializations if "main" in program.functions else {}
    for block in blocks.values():
        for op in block.operations:
            if any(out.type.tensorType.dataType == MIL_pb2.DataType.FLOAT16 for out in op.outputs):
                return "float16"
    return "float32"


def _torch_backend(source: str, device: str) -> Backend:
    from worker.backends.torch_backend import TorchBackend

    backend = TorchBackend(ModelConfig(path=source, device=device, dtype="float32"))
    backend.load()
    return backend


def _depth(prediction: Prediction, width: int, height: int, focal_35mm: float | None, fov: float | None) -> Any:
    return metric_depth(
        prediction.inverse_depth,
        width,
        height,
        fov,
        focal_35mm,
        already_metric=prediction.already_metric,
    )


def _relative_error(
    got: Prediction, want: Prediction, item: _Photo, width: int, height: int
) -> tuple[np.ndarray, bool]:
    """|depth_package - depth_torch| / depth_torch at the photo's size, each through the metric math
    with its own FOV (or the photo's EXIF focal length); and whether the FOV was FALLBACK_FOV_DEG's
    because the torch model answered none a camera has."""
    fixed = not is_camera_fov(want.fov_deg) and item.focal_length_35mm is None
    fov_want = FALLBACK_FOV_DEG if fixed else want.fov_deg
    fov_got = FALLBACK_FOV_DEG if fixed and not got.already_metric else got.fov_deg
    depth_want = _depth(want, width, height, item.focal_length_35mm, fov_want)
    depth_got = _depth(got, width, height, item.focal_length_35mm, fov_got)
    return np.abs(depth_got.depth - depth_want.depth) / depth_want.depth, fixed


def check_package(
    package: Path,
    against: str | None = None,
    photos: Path | None = None,
    limits_for: Callable[[str], Limits] = Limits.for_kind,
    scenes: tuple[str, ...] = SCENES,
    float32: bool = False,
    device: str = "cpu",
    cache_dir: Path = Path("models"),
    progress: Callable[[str], None] | None = None,
) -> CheckReport:
    """Run the package and its torch model on the same photos; compare. `limits_for` gives the limits
    for what the package is (float16, palettize8...). Raises ModelUnavailableError when there is
    nothing to compare with (no recorded source and no `against`)."""
    runner = _PackageRunner(package, cache_dir, float32)
    metadata = runner.backend.contract.metadata
    source = against or metadata.get("depthq.source")
    if not source:
        raise ModelUnavailableError(
            f"{package} records no checkpoint it was converted from (depthq.source); name one with --against "
            "(a hub id such as apple/DepthPro-hf, or a local checkpoint folder)"
        )
    kind = package_kind(package, metadata)
    report = CheckReport(
        package=package,
        against=source,
        kind=kind,
        runtime=runner.runtime,
        limits=limits_for(kind),
    )
    reference = _torch_backend(source, device)
    if reference.input_size != runner.input_size:
        raise ModelUnavailableError(
            f"{package} takes {runner.input_size}x{runner.input_size} inputs and {source} "
            f"{reference.input_size}x{reference.input_size}: they are not the same model; "
            "name its checkpoint with --against"
        )
    say = progress or (lambda _line: None)
    items = _photos(photos, say) if photos else (_Photo(n, scene(n, runner.input_size), None) for n in scenes)
    errors: list[np.ndarray] = []
    for item in items:
        say(f"checking {item.name} ...")
        height, width = item.rgb.shape[:2]
        started = time.perf_counter()
        got = runner.predict(item.rgb)
        seconds_package = time.perf_counter() - started
        # The package's own error is judged on the pixels it was given: a Core ML image input takes the
        # resized photo in 8 bits, which torch then sees too. What a torch worker computes from the photo
        # itself is the second comparison, shown beside it.
        pixels = runner.image_pixels(item.rgb)
        started = time.perf_counter()
        want = reference.predict(item.rgb if pixels is None else pixels)
        seconds_torch = time.perf_counter() - started
        relative, fixed = _relative_error(got, want, item, width, height)
        versus_worker = None
        if pixels is not None:
            versus_worker = float(np.median(_relative_error(got, reference.predict(item.rgb), item, width, height)[0]))
        errors.append(relative.reshape(-1)[:: max(1, relative.size // 1_000_000)])
        median, p95 = np.percentile(relative, [50, 95])
        report.items.append(
            ItemResult(
                name=item.name,
                width=width,
                height=height,
                median=float(median),
                p95=float(p95),
                max=float(relative.max()),
                fov_package=got.fov_deg,
                fov_torch=want.fov_deg,
                f_px_package=focal_px_from_fov(got.fov_deg, width) if is_camera_fov(got.fov_deg) else None,
                f_px_torch=focal_px_from_fov(want.fov_deg, width) if is_camera_fov(want.fov_deg) else None,
                seconds_package=seconds_package,
                seconds_torch=seconds_torch,
                fixed_fov=fixed,
                median_vs_torch_worker=versus_worker,
            )
        )
    every = np.concatenate(errors)
    report.median, report.p95 = (float(v) for v in np.percentile(every, [50, 95]))
    report.max = max(item.max for item in report.items)
    if runner.executor is not None:
        report.executor_peak_bytes = runner.executor.stats.peak_live_bytes
    return report


def render(report: CheckReport, out: Any = None) -> None:
    """The report as a table, then one line per limit passed or not."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out or sys.stdout, width=None if (out or sys.stdout).isatty() else 160)
    console.print(f"{report.package} ({report.kind}) against {report.against}")
    console.print(f"ran with: {report.runtime}")
    table = Table(
        "scene or photo",
        "size",
        "depth err median",
        "p95",
        "max",
        "FOV pkg / torch",
        "FOV err",
        "f_px err",
        "time pkg / torch",
    )
    for item in report.items:
        fov = "-" if item.fov_package is None else f"{item.fov_package:.3f}"
        fov += " / " + ("-" if item.fov_torch is None else f"{item.fov_torch:.3f}")
        fov_err = "-" if item.fov_error_deg is None else f"{item.fov_error_deg:.4f} deg"
        f_err = "-" if item.f_px_error is None else f"{item.f_px_error:.2e}"
        table.add_row(
            item.name + (" *" if item.fixed_fov else ""),
            f"{item.width}x{item.height}",
            f"{item.median:.2e}",
            f"{item.p95:.2e}",
            f"{item.max:.2e}",
            fov,
            fov_err,
            f_err,
            f"{item.seconds_package:.1f} s / {item.seconds_torch:.1f} s",
        )
    console.print(table)
    for item in report.items:
        if item.median_vs_torch_worker is not None:
            console.print(
                f"{item.name}: against a torch worker given the photo itself (not its 8-bit resize), median "
                f"{item.median_vs_torch_worker:.2e}: Core ML's image input takes the resized photo in 8 bits"
            )
    if any(item.fixed_fov for item in report.items):
        console.print(
            f"* the torch model's FOV is none a camera has (random weights?): depth compared at {FALLBACK_FOV_DEG} deg"
        )
    limits = report.limits
    console.print(
        f"overall depth error: median {report.median:.2e} (limit {limits.median:.2e}), "
        f"p95 {report.p95:.2e} (limit {limits.p95:.2e}), max {report.max:.2e}; "
        f"worst FOV error {'-' if report.worst_fov_error is None else f'{report.worst_fov_error:.3f}'} deg "
        f"(limit {limits.fov_deg})"
    )
    if report.executor_peak_bytes is not None:
        console.print(f"executor's live values at most {report.executor_peak_bytes / 1e9:.2f} GB")
    failures = report.failures()
    console.print("FAILED: " + "; ".join(failures) if failures else "passed")
