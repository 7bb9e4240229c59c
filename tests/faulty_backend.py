"""A backend that misbehaves for real on photos of chosen colours, around the real tiny model.

Real workers (`python -m worker`, also the ones `depthq up` starts) load it through
tests/faults/sitecustomize.py when PYTHONPATH names that folder: the fault is chosen by the photo's
mean colour, so the test picks it by the file it drops, and every other photo is computed as usual.
- red: SIGSEGV (a read at address 0), as a crashing decoder or Core ML would;
- green: SIGABRT (abort()), as a failed assertion in native code would;
- blue: a deadlock inside C with the GIL released (pthread_mutex_lock twice), which no in-thread
  timeout can interrupt;
- yellow: a plain sleep of FAULT_SLEEP_S seconds (default 3) before computing: a slow photo;
- magenta: a deadlock inside C with the GIL held (the same mutex, called through ctypes.PyDLL, which
  keeps the GIL), as a hang inside coremltools' bindings would: no Python thread runs again;
- cyan: a sleep of FAULT_SLEEP_S seconds with the GIL held (libc's sleep through ctypes.PyDLL), then
  computing: a long prediction of coremltools', during which no Python thread runs.
With FAULT_HOLDS_GIL=1 the backend says it holds the GIL, as the Core ML backend does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import time
from typing import Any

import numpy as np

from worker.backends.base import Prediction

SOLID = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}


def fault_of(rgb: np.ndarray) -> str | None:
    mean = rgb.reshape(-1, 3).mean(axis=0)
    for name, colour in SOLID.items():
        if np.all(np.abs(mean - np.array(colour)) < 10):
            return name
    return None


def _deadlock(keep_gil: bool = False) -> None:
    # PyDLL keeps the GIL through the call; CDLL releases it.
    libc = (ctypes.PyDLL if keep_gil else ctypes.CDLL)(ctypes.util.find_library("c") or None)
    mutex = ctypes.create_string_buffer(64)  # pthread_mutex_t, zeroed: a default (non-recursive) mutex
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)  # never returns


def _sleep_holding_gil(seconds: float) -> None:
    ctypes.PyDLL(ctypes.util.find_library("c") or None).sleep(math.ceil(seconds))


class FaultyBackend:
    def __init__(self, inner: Any):
        self.inner = inner
        self.name, self.device, self.model_name = inner.name, inner.device, inner.model_name
        self.warnings = inner.warnings
        self.holds_gil = os.environ.get("FAULT_HOLDS_GIL") == "1"

    @property
    def input_size(self) -> int:
        return self.inner.input_size

    def load(self) -> None:
        self.inner.load()

    def predict(self, rgb: np.ndarray) -> Prediction:
        fault = fault_of(rgb)
        if fault == "red":
            ctypes.string_at(0)
        elif fault == "green":
            os.abort()
        elif fault == "blue":
            _deadlock()
        elif fault == "yellow":
            time.sleep(float(os.environ.get("FAULT_SLEEP_S", "3")))
        elif fault == "magenta":
            _deadlock(keep_gil=True)
        elif fault == "cyan":
            _sleep_holding_gil(float(os.environ.get("FAULT_SLEEP_S", "3")))
        return self.inner.predict(rgb)
