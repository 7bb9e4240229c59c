"""Backends by name, as `worker.backend` in config.yaml chooses them. Imported lazily: torch is heavy."""

from __future__ import annotations

from producer.config import Config
from worker.backends.base import Backend, Prediction

__all__ = ["Backend", "Prediction", "create_backend"]


def create_backend(config: Config) -> Backend:
    name = config.worker.backend
    if name == "torch":
        from worker.backends.torch_backend import TorchBackend

        return TorchBackend(config.model)
    raise ValueError(f"worker.backend: unknown backend {name!r}; allowed: torch")
