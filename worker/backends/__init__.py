"""Backends by name, as `worker.backend` in config.yaml chooses them. Imported lazily: torch is heavy."""

from __future__ import annotations

import platform
import sys

from depthq.config import Config
from worker.backends.base import Backend, Prediction

__all__ = ["Backend", "Prediction", "choose_backend", "create_backend"]


def choose_backend(config: Config, system: str = sys.platform, machine: str = platform.machine()) -> str:
    """`auto`: Core ML on an Apple Silicon Mac that has a Core ML model, PyTorch everywhere else."""
    if config.worker.backend != "auto":
        return config.worker.backend
    if system == "darwin" and machine == "arm64":
        from worker.backends.coreml_backend import find_coreml_model

        if find_coreml_model(config.model) is not None:
            return "coreml"
    return "torch"


def create_backend(config: Config) -> Backend:
    name = choose_backend(config)
    if name == "coreml":
        from worker.backends.coreml_backend import CoreMLBackend

        return CoreMLBackend(config.model)
    from worker.backends.torch_backend import TorchBackend

    return TorchBackend(config.model)
