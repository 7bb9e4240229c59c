"""Backends around a real one, for tests that need a model that looks around, falls over or answers
otherwise: `Around` hands everything to the backend it wraps (loaded already), and a test's own
stand-in overrides `predict`. Worker code sees a backend like any other (`worker.backends.base.Backend`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from worker.backends.base import Prediction


class Around:
    """The wrapped backend as it is: its name, device, model, input side and warnings, and its predictions."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.name, self.device, self.model_name = inner.name, inner.device, inner.model_name
        self.input_size, self.warnings = inner.input_size, inner.warnings

    def load(self) -> None:
        """Nothing: the wrapped backend is loaded once, by the test session."""

    def predict(self, rgb: np.ndarray) -> Prediction:
        return self.inner.predict(rgb)


class Looking(Around):
    """Calls `look` in the middle of each prediction: while a job is running, which is when a user looks."""

    def __init__(self, inner: Any, look: Callable[[], None]):
        super().__init__(inner)
        self.look = look

    def predict(self, rgb: np.ndarray) -> Prediction:
        self.look()
        return self.inner.predict(rgb)


class Failing(Around):
    """Falls over on every prediction: an unexpected error, which rq retries."""

    def predict(self, rgb: np.ndarray) -> Prediction:
        raise RuntimeError("the model fell over")
