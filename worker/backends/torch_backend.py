"""DepthPro on PyTorch via transformers (`DepthProForDepthEstimation` with its FOV head): CUDA, MPS or CPU.

On CUDA the photo goes up as uint8 and everything per pixel stays on the GPU: the conversion and
resize to the model's input here (`worker.preprocess.model_input`), and the resize back, clamp and
reciprocal in `worker.depth.metric_depth`, which gets this backend's output as a CUDA tensor. Only
the float32 depth map comes back down. Elsewhere the same functions run on numpy.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
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


def pick_dtype(requested: str, device: str) -> str:
    """`auto`: float16 on CUDA (ml-depth-pro's own choice there), float32 elsewhere.

    Not bfloat16, though every GPU since Ampere has it and its float32-sized exponent cannot overflow:
    its 8-bit mantissa put the median depth error against float32 at 0.7 % on the released geometry
    (CPU, tiny widths; float16: 0.08 %), over the 0.5 % allowed. `python -m bench gpu` measures both
    on the full-size model; `model.dtype: bfloat16` asks for it.
    """
    if requested != "auto":
        return requested
    return "float16" if device == "cuda" else "float32"


def attention_of(model: Any) -> str:
    """The attention implementation every sub-model runs ("sdpa" when they all use PyTorch's fused
    scaled_dot_product_attention, whose flash and memory-efficient kernels CUDA picks), comma-joined
    if they differ."""
    kinds = {
        getattr(module.config, "_attn_implementation", None) for module in model.modules() if hasattr(module, "config")
    }
    return ",".join(sorted(k for k in kinds if k)) or "unknown"


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
        self._forward: Any = None
        self._dtype: Any = None
        self._has_fov = False
        # Whether pre- and post-processing run on the model's device: the photo goes up as uint8 and
        # the inverse depth stays there for metric_depth. On CUDA; on a CPU it would only swap OpenCV
        # for torch's slower resize. Tests turn it on for a CPU model to run the tensor path.
        self.on_device = False
        self.compile_s: float | None = None
        self.attention = "unloaded"
        self.warnings: tuple[str, ...] = ()
        self.model_info: dict[str, object] = {"name": model.path}

    def load(self) -> None:
        import torch
        from transformers import DepthProForDepthEstimation

        folder = resolve_model_dir(self.model_config)
        self.device = pick_device(self.model_config.device)
        dtype_name = pick_dtype(self.model_config.dtype, self.device)
        self._dtype = getattr(torch, dtype_name)
        model, info = DepthProForDepthEstimation.from_pretrained(
            folder, use_fov_model=True, output_loading_info=True, attn_implementation="sdpa"
        )
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
        self.on_device = self.device == "cuda"
        self._forward = self._model
        mode = self.model_config.compile
        if mode:
            self._forward = torch.compile(self._model, mode=mode, dynamic=False)
            self.compile_s = self._compile(mode)
        self.model_info = {
            "name": self.model_config.path,
            "source": self.model_config.path,
            "path": str(folder),
            "precision": dtype_name,
            "revision": revision_of(folder),
        }
        self.attention = attention_of(self._model)
        log.info(
            "loaded %s on %s (%s, attention %s, %s), input %dx%d",
            folder,
            self.device,
            dtype_name,
            self.attention,
            f"torch.compile {mode}" if mode else "eager",
            self.input_size,
            self.input_size,
        )

    def _compile(self, mode: str) -> float:
        """torch.compile compiles at the first call: make that call now, before the worker takes a job.

        The input's shape never changes (1 x 3 x S x S), so this one compile serves every photo. One
        eager call first: transformers installs its output hooks at a model's first call, under a lock
        that dynamo cannot trace, and a compile then would split the model into 8 graphs instead of 1.
        """
        import torch

        x = torch.zeros(1, 3, self.input_size, self.input_size, device=self.device, dtype=self._dtype)
        with torch.inference_mode():
            self._model(pixel_values=x)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self._forward(pixel_values=x)
        if self.device == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - t0
        log.info("torch.compile (%s) compiled the model in %.1f s, before taking jobs", mode, took)
        return took

    def predict(self, rgb: np.ndarray) -> Prediction:
        """On CUDA the inverse depth in the Prediction is a float32 CUDA tensor (S, S), for metric_depth
        to finish on the GPU; elsewhere float32 numpy."""
        import torch

        image: Any = torch.from_numpy(rgb).to(self.device) if self.on_device else rgb
        x = torch.as_tensor(model_input(image, self.input_size))[None].to(self.device, dtype=self._dtype)
        with torch.inference_mode():
            out = self._forward(pixel_values=x)
        # A copy, made outside inference mode so that metric_depth may work on it in place; and under
        # CUDA graphs (reduce-overhead) the next call reuses the output's memory.
        cid = out.predicted_depth[0].to(torch.float32, copy=True)
        fov = None
        if self._has_fov and out.field_of_view is not None:
            fov = float(out.field_of_view.flatten()[0].float().cpu())
        return Prediction(inverse_depth=cid if self.on_device else cid.cpu().numpy(), fov_deg=fov)
