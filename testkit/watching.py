"""The producer's watcher run in a thread of this process, for a test or a benchmark to drop photos at."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from producer.watcher import Watcher


@contextmanager
def watching(watcher: Watcher, join_s: float = 10.0) -> Iterator[Watcher]:
    """The watcher's loop in a thread for the block, stopped (and checked stopped) after it. It must
    still be running when the block ends: a watcher that stopped by itself, or failed, is a failure,
    since what the block measured or checked was then not a running watcher's doing.

    `join_s` bounds the wait for it to stop: a benchmark's tree of 100k photos can take longer than a
    test's to leave a rescan."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            watcher.run(stop)
        except BaseException as exc:
            errors.append(exc)
            raise

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield watcher
    finally:
        stopped_by_itself = not thread.is_alive()
        stop.set()
        thread.join(join_s)
    assert not thread.is_alive()
    assert not errors, f"the watcher failed: {errors!r}"
    assert not stopped_by_itself, "the watcher stopped by itself"
