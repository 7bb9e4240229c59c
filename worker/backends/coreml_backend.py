"""DepthPro on Core ML (Apple Silicon Neural Engine / GPU), for the Mac minis.

The backend acts on the contract `worker.coreml_spec` reads from the model's spec: canonical inverse
depth + FOV runs the metric math shared with the torch backend; meters are used as given, and every
sidecar says the FOV is unknown; normalized inverse depth is refused.

Reading the spec works anywhere; loading for prediction needs macOS. `MLModel(path)` compiles the
model on every load (minutes for DepthPro on the Neural Engine), so the compiled form is kept under
`models/.compiled/` and later starts load it with `CompiledMLModel`.
"""

from __future__ import annotations

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
from worker.errors import BackendUnavailableError, ModelUnavailableError
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
        model = ct.models.MLModel(str(self.path), compute_units=units)
        if getattr(model, "__proxy__", None) is None:
            # coremltools only warns when Core ML cannot load a model; say why, and stop here.
            raise BackendUnavailableError(
                f"model.coreml_path: Core ML could not load {self.path}: "
                f"{getattr(model, '_framework_error', 'unknown error')}"
            )
        self._model = model
        try:
            self._keep_compiled(Path(model.get_compiled_model_path()), compiled)
        except OSError as exc:  # a full or read-only disk costs the next start time, not this one
            log.warning("could not keep the compiled model in %s (%s); the next start compiles again", compiled, exc)

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
        """The model's inputs for one photo; shared preprocessing, in the form this export takes."""
        c = self.contract
        feed: dict[str, Any] = {}
        if c.input_is_image:
            # The export's image input does the [-1, 1] rescale itself; only the resize is ours.
            small = resize_bilinear(rgb, c.input_size, c.input_size)
            feed[c.image_input] = Image.fromarray(np.ascontiguousarray(small), "RGB")
        else:
            feed[c.image_input] = model_input(rgb, c.input_size)[None]
        if c.width_input is not None:
            feed[c.width_input] = np.full((1, 1, 1, 1), float(rgb.shape[1]), dtype=np.dtype(c.width_dtype))
        return feed

    def predict(self, rgb: np.ndarray) -> Prediction:
        out = self._model.predict(self.inputs_for(rgb))
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
