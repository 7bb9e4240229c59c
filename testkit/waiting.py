"""Waiting for something that happens in another process or thread."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 60.0) -> float:
    """Poll until true and return the seconds it took. The deadline only bounds a failure: it is not a
    timing assertion, and a slow, busy machine passes."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
