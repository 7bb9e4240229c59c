"""Loaded by every Python process whose PYTHONPATH names this folder: a worker then runs its real
backend inside tests/faulty_backend.py's FaultyBackend. Other processes (`depthq up` itself) are
untouched: the hook acts only when worker.worker is imported."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any


class _WrapBackends(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "worker.worker":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = spec.loader
        load = loader.exec_module

        def exec_module(module: Any) -> None:
            load(module)
            from tests.faulty_backend import FaultyBackend

            real = module.create_backend
            module.create_backend = lambda config: FaultyBackend(real(config))

        loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _WrapBackends())
