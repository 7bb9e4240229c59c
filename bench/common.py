"""What every benchmark shares: the machine's description, a private Redis, timing summaries, tables.

Each benchmark measures its baseline in the same run as its own figures, so a ratio holds on a noisy,
shared machine even when the absolute numbers drift.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# Wide when captured (rich folds at 80 columns otherwise), so a table pasted into RESULTS.md stays whole.
console = Console(width=None if sys.stdout.isatty() else 200)


def machine() -> str:
    """One line for RESULTS.md: CPU, cores, memory, Python, date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 0.0
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GiB, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, {datetime.now(UTC):%Y-%m-%d}"
    )


@contextmanager
def private_redis() -> Iterator[Any]:
    """A redis-server of our own on a free port (never the machine's 6379), gone afterwards.

    Imported here, not at the top: `bench gpu` runs on a GPU machine that has torch but not redis."""
    from depthq.redis_server import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="depthq-bench-redis-") as data:
        server = EmbeddedRedis(Path(data))
        server.start()
        try:
            yield server
        finally:
            server.stop()


def timed(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> list[float]:
    """Seconds per call, after `warmup` untimed calls (first-call costs are not the steady state)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def p95(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[94]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def verdict(ok: bool) -> str:
    return "[green]met[/green]" if ok else "[red]missed[/red]"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    console.print(table)
