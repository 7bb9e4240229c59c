"""DepthPro on PyTorch via transformers (`DepthProForDepthEstimation` with its FOV head): CUDA, MPS or CPU."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from depthq.config import ModelConfig
from worker.backends.base import Prediction
from worker.models import resolve_model_dir
from worker.preprocess import model_input

log = logging.getLogger(__name__)


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def input_size_of(config: Any) -> int:
    """The patch encoder tiles the largest scaled image: patch_size / smallest ratio (1536 for DepthPro)."""
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    return round(patch / min(config.scaled_images_ratios))


def revision_of(folder: Path) -> str:
    """The hub commit a download came from (huggingface_hub keeps it beside the files), else a hash of
    the checkpoint's config and its weight files' names and sizes: cheap, and different when they are."""
    for metadata in sorted((folder / ".cache" / "huggingface" / "download").glob("*.metadata")):
        with contextlib.suppress(OSError, IndexError):
            commit = metadata.read_text(encoding="utf-8").splitlines()[0].strip()
            if commit:
                return commit
    digest = hashlib.sha256()
    with contextlib.suppress(OSError):
        digest.update((folder / "config.json").read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return "sha256:" + digest.hexdigest()[:16]


class TorchBackend:
    name = "torch"

    def __init__(self, model: ModelConfig):
        self.model_config = model
        self.model_name = model.path
        self.device = "unloaded"
        self.input_size = 0
        self._model: Any = None
        self._dtype: Any = None
        self._has_fov = False
        self.warnings: tuple[str, ...] = ()
        self.model_info: dict[str, object] = {"name": model.path}

    def load(self) -> None:
        import torch
        from transformers import DepthProForDepthEstimation

        folder = resolve_model_dir(self.model_config)
        self.device = pick_device(self.model_config.device)
        dtype_name = self.model_config.dtype
        if dtype_name == "auto":
            dtype_name = "float16" if self.device == "cuda" else "float32"
        self._dtype = getattr(torch, dtype_name)
        model, info = DepthProForDepthEstimation.from_pretrained(folder, use_fov_model=True, output_loading_info=True)
        # A checkpoint without FOV weights would get a randomly initialised FOV head: never trust that.
        self._has_fov = not any("fov_model" in k for k in info.get("missing_keys", []))
        if not self._has_fov:
            self.warnings = (
                f"{folder} has no FOV head weights: the focal length comes from EXIF only, "
                "and photos without it cannot be measured",
            )
            log.warning("%s", self.warnings[0])
        self._model = model.to(self.device, dtype=self._dtype).eval()
        self.input_size = input_size_of(model.config)
        self.model_info = {
            "name": self.model_config.path,
            "source": self.model_config.path,
            "path": str(folder),
            "precision": dtype_name,
            "revision": revision_of(folder),
        }
        log.info(
            "loaded %s on %s (%s), input %dx%d",
            folder,
            self.device,
            dtype_name,
            self.input_size,
            self.input_size,
        )

    def predict(self, rgb: np.ndarray) -> Prediction:
        import torch

        x = torch.from_numpy(model_input(rgb, self.input_size))[None]
        x = x.to(self.device, dtype=self._dtype)
        with torch.inference_mode():
            out = self._model(pixel_values=x)
        cid = out.predicted_depth[0].float().cpu().numpy()
        fov = None
        if self._has_fov and out.field_of_view is not None:
            fov = float(out.field_of_view.flatten()[0].float().cpu())
        return Prediction(inverse_depth=cid, fov_deg=fov)
