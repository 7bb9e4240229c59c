"""The one small interface every backend implements: load once, then predict many times."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """What a model says about one photo, at the model's input size (S, S).

    `inverse_depth` is DepthPro's canonical inverse depth (float32), unless `already_metric`: then it
    is 1/meters from a model that output meters itself. `fov_deg` is horizontal, or None if the model
    gives none.
    """

    # np.ndarray, or a torch tensor on the model's device (CUDA), for `metric_depth` to finish there
    inverse_depth: Any
    fov_deg: float | None
    already_metric: bool = False


class Backend(Protocol):
    name: str
    device: str
    model_name: str
    # Optional: what was loaded, for every sidecar (name, path, precision, revision, source...).
    # A backend without it is described by model_name alone.
    input_size: int  # square side in pixels, read from the loaded model
    # Caveats about this model's output that every sidecar should carry (e.g. "no FOV head").
    warnings: tuple[str, ...]
    # Optional, False if absent: whether `predict` holds the GIL throughout (coremltools' bindings
    # do), so no other thread of the worker runs meanwhile: the worker then announces how long the
    # prediction may take before it starts (`DepthWorker.predicting`).

    def load(self) -> None:
        """Load weights. Slow; called once per worker process, before it takes jobs."""

    def predict(self, rgb: np.ndarray) -> Prediction:
        """`rgb`: uint8 (H, W, 3), upright."""


def describe_model(backend: Backend) -> dict[str, object]:
    """What this worker actually runs, as every sidecar records it: the loaded model, not the asked-for one."""
    info = getattr(backend, "model_info", None)
    return dict(info) if info else {"name": backend.model_name}
