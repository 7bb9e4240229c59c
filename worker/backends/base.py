"""The one small interface every backend implements: load once, then predict many times."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """`canonical_inverse_depth`: float32 (S, S) at the model's input size; `fov_deg`: horizontal, or None."""

    canonical_inverse_depth: np.ndarray
    fov_deg: float | None


class Backend(Protocol):
    name: str
    device: str
    model_name: str
    input_size: int  # square side in pixels, read from the loaded model

    def load(self) -> None:
        """Load weights. Slow; called once per worker process, before it takes jobs."""

    def predict(self, rgb: np.ndarray) -> Prediction:
        """`rgb`: uint8 (H, W, 3), upright."""
