"""Scale-out over the redis transport: photos per second with 1, 2 and 3 worker hosts.

The hosts are network namespaces on this machine (testkit/cluster.py): host a runs Redis, the producer
and the collector; worker hosts b, c and d share no disk with it, so every photo and every result
crosses the (virtual) network through Redis. Two models, each side by side with its own 1-host row:

- the 300 ms stand-in (bench.standin), which needs no CPU: the ideal is hosts / 0.3 s, and the rest
  is what the transport, the queue and the collector cost;
- the tiny DepthPro on the CPU, one thread per worker (OMP_NUM_THREADS=1), where every host shares
  this machine's cores: it shows where the machine, not depthq, stops the scaling. Left to torch's
  default (a thread per core in every process), three workers on two cores ran slower than one.

Timed as a user sees it: from the first photo written into the watched folder to the last sidecar
written by the collector, with the workers already warm. Needs root and iproute2.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import console, machine, print_table
from bench.standin import DEFAULT_SLEEP_S
from testkit.cluster import Cluster, cluster
from testkit.netns import unavailable_reason
from testkit.photos import write_jpeg
from testkit.tiny_model import build_tiny_model
from testkit.waiting import wait_for

WORKER_HOSTS = ("b", "c", "d")


def _round(c: Cluster, name: str, photos: int) -> float:
    """Seconds from the first photo dropped to the last result written on host a."""
    folder = c.inbox / name
    out = c.out / name
    t0 = time.perf_counter()
    for i in range(photos):
        write_jpeg(folder / f"{i:03d}.jpg", width=160, height=120, seed=hash((name, i)) % 2**32)
    wait_for(lambda: len(list(out.glob("*.jpg.json"))) == photos if out.is_dir() else False, name, timeout=600)
    return time.perf_counter() - t0


def _standin_argv(c: Cluster, host: str) -> list[str]:
    folder = c.host_folder(host)
    return [
        sys.executable, "-m", "bench.standin",
        "--redis-url", c.redis_url,
        "--watch", str(folder / "no-inbox-here"),
        "--output", str(folder / "no-output-here"),
        "--log-level", "WARNING",
    ]  # fmt: skip


def _series(root: Path, model: Path, kind: str, photos: int) -> list[dict[str, Any]]:
    rows = []
    with cluster(root / kind, model, ("a", *WORKER_HOSTS)) as c:
        c.start_redis()
        c.start_producer()
        for n, host in enumerate(WORKER_HOSTS, start=1):
            if kind == "stand-in":
                c.start_worker(host, argv=_standin_argv(c, host))
            else:
                c.start_worker(host, env={"OMP_NUM_THREADS": "1"})
            wait_for(lambda n=n: c.workers_ready(n), f"{n} worker host(s)", timeout=180)
            _round(c, f"warm-{kind}-{n}", n)  # each worker's first job is not the steady state
            seconds = _round(c, f"{kind}-{n}", photos)
            rows.append({"model": kind, "hosts": n, "photos": photos, "seconds": seconds, "per_s": photos / seconds})
    return rows


def run(quick: bool = False) -> dict[str, Any]:
    where = machine()
    console.print(where)
    reason = unavailable_reason()
    if reason is not None:
        console.print(f"scaleout: skipped: {reason}")
        return {"machine": where, "skipped": reason}
    photos = 12 if quick else 60
    with tempfile.TemporaryDirectory(prefix="depthq-bench-scaleout-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model")
        # The tiny model takes ~30 ms a photo: more photos, so a row lasts seconds, not its edges.
        rows = _series(root, model, "stand-in", photos) + _series(root, model, "tiny torch", photos * 4)
    for row in rows:
        one = next(r for r in rows if r["model"] == row["model"] and r["hosts"] == 1)
        row["vs_one"] = row["per_s"] / one["per_s"]
        row["ideal"] = row["hosts"] / DEFAULT_SLEEP_S if row["model"] == "stand-in" else None
    print_table(
        "Scale-out, redis transport, photos of 160x120: first drop to last output on host a",
        ["model", "worker hosts", "photos", "seconds", "photos/s", "vs 1 host", "ideal photos/s", "of ideal"],
        [
            [
                r["model"],
                r["hosts"],
                r["photos"],
                f"{r['seconds']:.2f}",
                f"{r['per_s']:.2f}",
                f"{r['vs_one']:.2f}x",
                "-" if r["ideal"] is None else f"{r['ideal']:.2f}",
                "-" if r["ideal"] is None else f"{r['per_s'] / r['ideal']:.3f}",
            ]
            for r in rows
        ],
    )
    return {"machine": where, "quick": quick, "rows": rows}
