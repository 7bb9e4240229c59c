"""DepthPro on Core ML (Apple Silicon Neural Engine / GPU), for the Mac minis.

The backend acts on the contract `worker.coreml_spec` reads from the model's spec: canonical inverse
depth + FOV runs the metric math shared with the torch backend; meters are used as given, and every
sidecar says the FOV is unknown; normalized inverse depth is refused.

Reading the spec works anywhere; loading for prediction needs macOS. `MLModel(path)` compiles the
model on every load (minutes for DepthPro on the Neural Engine), so the compiled form is kept under
`models/.compiled/` and later starts load it with `CompiledMLModel`.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from depthq.config import ModelConfig
from worker.backends.base import Prediction
from worker.coreml_spec import read_contract
from worker.errors import BackendNotReadyError, BackendUnavailableError, ModelUnavailableError
from worker.preprocess import model_input, resize_bilinear

log = logging.getLogger(__name__)

METERS_WARNING = (
    "this Core ML model outputs meters but no field of view: depth is as the model scaled it with its "
    "own FOV estimate; fov_model_deg is null, and an EXIF focal length is reported, not applied"
)
NO_FOV_WARNING = "this Core ML model gives no field of view: photos without an EXIF focal length cannot be measured"

COMPUTE_UNITS = {"all": "ALL", "cpu_and_ne": "CPU_AND_NE", "cpu_and_gpu": "CPU_AND_GPU", "cpu_only": "CPU_ONLY"}


def find_coreml_model(model: ModelConfig) -> Path | None:
    """`model.coreml_path`, else the best metric model in cache_dir: canonical+FOV first, then meters."""
    if model.coreml_path is not None:
        return model.coreml_path
    if not model.cache_dir.is_dir():
        return None
    ranked: list[tuple[int, str, Path]] = []
    for path in sorted(model.cache_dir.glob("*.mlpackage")):
        try:
            contract = read_contract(path)
        except ModelUnavailableError as exc:
            log.debug("skipping %s: %s", path, exc)
            continue
        # Auto-picked only if it can measure every photo: canonical needs its FOV output.
        if contract.kind == "meters" or (contract.kind == "canonical" and contract.fov_output):
            rank = 0 if contract.kind == "canonical" else 1
            ranked.append((rank, path.name, path))
    return min(ranked)[2] if ranked else None


# What Core ML says when a load failed for a reason that may pass: the compile ran out of room, time or
# memory, or its compiler service (an XPC service) was busy or gone.
_PASSING = (
    "no space left",
    "disk full",
    "not enough space",
    "compiler service",
    "xpc",
    "connection interrupted",
    "connection invalid",
    "timed out",
    "temporarily unavailable",
    "memory",
)
# A compile writes about the package's size into $TMPDIR; less than this much room is a full disk.
_COMPILE_ROOM_FACTOR = 2


def load_failure(path: Path, reason: str | None, tmp_free: int, package_size: int) -> RuntimeError:
    """A Core ML load failure, told apart: one worth another try (BackendNotReadyError: the worker
    exits 75 and launchd starts it again) or a model that will never load here (BackendUnavailableError,
    the final exit). Unknown reasons count as passing: a worker retried in vain costs a log line and a
    compile every ThrottleInterval, a worker given up in vain stays down until someone looks."""
    if tmp_free < _COMPILE_ROOM_FACTOR * package_size:
        return BackendNotReadyError(
            f"model.coreml_path: Core ML could not load {path}: {reason or 'no reason given'}; the temporary "
            f"folder {tempfile.gettempdir()} has {tmp_free / 1e9:.1f} GB free, and compiling this model needs "
            f"about {_COMPILE_ROOM_FACTOR * package_size / 1e9:.1f} GB: free space there"
        )
    if reason is None:
        return BackendNotReadyError(
            f"model.coreml_path: Core ML could not load {path} and gave no reason (Console.app, process "
            "`depthq`, subsystem com.apple.CoreML, may say more); trying again"
        )
    if any(word in reason.lower() for word in _PASSING):
        return BackendNotReadyError(f"model.coreml_path: Core ML could not load {path}: {reason}; trying again")
    return BackendUnavailableError(
        f"model.coreml_path: Core ML could not load {path}: {reason}; re-download or convert the model again "
        "(`depthq models download` or `depthq models convert`)"
    )


def _tmp_free() -> int:
    try:
        return shutil.disk_usage(tempfile.gettempdir()).free
    except OSError:
        return 0


def _size(package: Path) -> int:
    return sum(item.stat().st_size for item in package.rglob("*") if item.is_file())


def can_predict_here() -> bool:
    return sys.platform == "darwin"


def compiled_cache_path(package: Path, cache_root: Path) -> Path:
    """One compiled copy per package version: keyed by its manifest and weights, not just its name."""
    digest = hashlib.sha256(str(package.resolve()).encode())
    for item in sorted(package.rglob("*")):
        if item.is_file():
            st = item.stat()
            digest.update(f"{item.relative_to(package)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return cache_root / f"{package.stem}-{digest.hexdigest()[:12]}.mlmodelc"


class CoreMLBackend:
    name = "coreml"
    # coremltools 9.0's bindings release the GIL nowhere, in loading or in predict().
    holds_gil = True

    def __init__(self, model: ModelConfig):
        self.model_config = model
        path = find_coreml_model(model)
        if path is None:
            raise ModelUnavailableError(
                f"model.coreml_path: no Core ML DepthPro in {model.cache_dir}; run `depthq models convert` "
                "(gives FOV and focal length) or `depthq models download DepthPro`, or set model.coreml_path"
            )
        self.path = path
        self.contract = read_contract(path)
        if not self.contract.metric:
            raise ModelUnavailableError(
                f"model.coreml_path: {path} outputs normalized inverse depth ({self.contract.depth_output}), "
                "which is relative and never meters; use a meters model or `depthq models convert`"
            )
        self.model_name = path.stem
        meta = self.contract.metadata
        self.model_info: dict[str, object] = {
            "name": path.stem,
            "path": str(path),
            "precision": "float16 or as converted",
            "compression": meta.get("depthq.compression"),
            # A depthq conversion records the checkpoint it came from; a hub export does not say.
            "source": meta.get("depthq.source"),
            "revision": compiled_cache_path(path, model.cache_dir).stem.rsplit("-", 1)[-1],
        }
        self.input_size = self.contract.input_size
        self.device = f"coreml:{model.compute_units}"
        self.warnings: tuple[str, ...] = ()
        if self.contract.kind == "meters":
            self.warnings = (METERS_WARNING,)
        elif self.contract.fov_output is None:
            self.warnings = (NO_FOV_WARNING,)
        self._model: Any = None
        self._last_feed: dict[str, Any] | None = None

    def load(self) -> None:
        if not can_predict_here():
            raise BackendUnavailableError(
                f"worker.backend: coreml needs macOS (Core ML prediction is only supported on macOS; this is "
                f"{platform.system()}); use worker.backend: torch here"
            )
        import coremltools as ct

        units = getattr(ct.ComputeUnit, COMPUTE_UNITS[self.model_config.compute_units])
        cache_root = self.model_config.cache_dir / ".compiled"
        compiled = compiled_cache_path(self.path, cache_root)
        if compiled.is_dir():
            try:
                self._model = ct.models.CompiledMLModel(str(compiled), compute_units=units)
                log.info("loaded compiled %s (%s)", compiled, self.device)
                return
            except Exception as exc:  # stale or damaged: set it aside and compile again
                log.warning("compiled cache %s unusable (%s); recompiling", compiled, exc)
                shutil.rmtree(compiled, ignore_errors=True)
        log.info("compiling %s for %s; later starts reuse %s", self.path, self.device, compiled)
        try:
            model = ct.models.MLModel(str(self.path), compute_units=units)
        except Exception as exc:  # a package it cannot read, or the disk under the compile
            raise load_failure(self.path, str(exc), _tmp_free(), _size(self.path)) from exc
        if getattr(model, "__proxy__", None) is None:
            # coremltools only warns when Core ML cannot load a model, and keeps no reason in some cases.
            raise self._why_not_loaded(model)
        try:
            self._keep_compiled(Path(model.get_compiled_model_path()), compiled)
        except OSError as exc:  # a full or read-only disk costs the next start time, not this one
            log.warning("could not keep the compiled model in %s (%s); the next start compiles again", compiled, exc)
            self._model = model
            return
        # The MLModel's compiled copy in $TMPDIR (about 1.9 GB for DepthPro) is deleted only by its C++
        # destructor, and `depthq work` ends with os._exit: serve from the copy kept instead, and drop
        # the MLModel now.
        try:
            self._model = ct.models.CompiledMLModel(str(compiled), compute_units=units)
        except Exception as exc:
            log.warning("could not reload the kept compiled model %s (%s); serving the first compile", compiled, exc)
            self._model = model
            return
        first_copy = model.get_compiled_model_path()
        del model
        gc.collect()
        log.info(
            "serving the kept compiled copy %s; the first compile's %s is gone with its MLModel", compiled, first_copy
        )

    def _why_not_loaded(self, model: Any) -> RuntimeError:
        """Why Core ML could not load the model, never "None": coremltools keeps no reason when its
        native library did not load for this Python, or when the model needs a newer macOS."""
        from coremltools.models import model as ct_model

        if getattr(ct_model, "_MLModelProxy", None) is None:
            return BackendUnavailableError(
                f"worker.backend: coreml: coremltools has no native Core ML library for Python "
                f"{sys.version_info.major}.{sys.version_info.minor} here, so it cannot load {self.path}; reinstall "
                "the worker with a Python that coremltools ships one for (deploy/macos/install-worker.sh picks one)"
            )
        error = getattr(model, "_framework_error", None)
        if error is None:
            needed = model.get_spec().specificationVersion
            supported = ct_model._MLModelProxy.maximum_supported_specification_version()
            if needed > supported:
                return BackendUnavailableError(
                    f"model.coreml_path: {self.path} needs Core ML specification {needed}; this macOS "
                    f"({platform.mac_ver()[0]}) loads up to {supported}: update macOS, or convert the model "
                    "for an older deployment target"
                )
        return load_failure(self.path, str(error) if error is not None else None, _tmp_free(), _size(self.path))

    @staticmethod
    def _keep_compiled(source: Path, compiled: Path) -> None:
        """Copy, then rename into place; several workers compiling at once all end up with one copy."""
        compiled.parent.mkdir(parents=True, exist_ok=True)
        for leftover in compiled.parent.glob(".staging-*"):
            if leftover.stat().st_mtime < time.time() - 3600:  # from a crash, not a compile under way
                shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=compiled.parent, prefix=".staging-"))
        try:
            shutil.copytree(source, staging / "model.mlmodelc")
            try:
                os.replace(staging / "model.mlmodelc", compiled)
            except OSError:
                if not compiled.is_dir():
                    raise  # another worker got there first otherwise, and its copy is as good
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def inputs_for(self, rgb: np.ndarray) -> dict[str, Any]:
        """The model's inputs for one photo; shared preprocessing, in the form this export takes.

        Arrays are float32 and contiguous: coremltools would convert anything else to a fresh float32
        copy that only Core ML then holds (see `predict`)."""
        c = self.contract
        feed: dict[str, Any] = {}
        if c.input_is_image:
            # The export's image input does the [-1, 1] rescale itself; only the resize is ours.
            small = resize_bilinear(rgb, c.input_size, c.input_size)
            feed[c.image_input] = Image.fromarray(np.ascontiguousarray(small), "RGB")
        else:
            feed[c.image_input] = np.ascontiguousarray(model_input(rgb, c.input_size)[None], dtype=np.float32)
        if c.width_input is not None:
            feed[c.width_input] = np.full((1, 1, 1, 1), float(rgb.shape[1]), dtype=np.float32)
        return feed

    def predict(self, rgb: np.ndarray) -> Prediction:
        """The feed stays referenced here until the next prediction replaces it: coremltools 9.0 hands
        Core ML its numpy inputs inside an object that Core ML may release later, on its own queue and
        without the GIL (upstream PRs #2827, #2829); if that were the last reference, freeing the array
        there could crash the worker."""
        feed = self.inputs_for(rgb)
        self._last_feed = feed
        out = self._model.predict(feed)
        return self.prediction_from(out)

    def prediction_from(self, out: dict[str, Any]) -> Prediction:
        c = self.contract
        depth = np.squeeze(np.asarray(out[c.depth_output], dtype=np.float32))  # metric_depth resizes it anyway
        if depth.ndim != 2:
            raise RuntimeError(f"{self.path}: output {c.depth_output} has shape {depth.shape}, not a depth map")
        fov = float(np.asarray(out[c.fov_output]).reshape(-1)[0]) if c.fov_output else None
        if c.kind == "meters":
            inverse = 1.0 / np.maximum(depth, np.float32(1e-6))
            return Prediction(inverse_depth=inverse, fov_deg=fov, already_metric=True)
        return Prediction(inverse_depth=depth, fov_deg=fov)
