"""Benchmark 6, overlap of CPU and accelerator work: when is `depthq up --workers 2` worth it on one host?

A worker does two kinds of work per photo: CPU work outside the model (decode, preprocessing, metric
depth at full resolution, preview, writes) and the model on the accelerator. One process does them one
after the other, so the accelerator waits while the CPU works and the CPU waits for the accelerator.
A second process can fill those waits, for the price of a second model copy in memory.

Here the model is the stand-in (bench.standin): 300 ms of sleep where the accelerator would compute,
after the real preprocessing at DepthPro's 1536 x 1536; everything else is the real job. The photos are
realistic JPEGs (12 MP, 4032 x 3024, and 2 MP), generated once from smooth noise with fine grain, so
they decode and compress like camera photos. Baseline, in the same run: one worker process. Then two,
in two ways:
- "shared": both sleep at once, as with an accelerator that has room for both (or two of them);
- "one at a time": a file lock lets one process at a time into the sleep, as with one GPU or Neural
  Engine that runs one model call at a time.

Each is timed from the first job's start to the last job's end (rq's started_at/ended_at), with the
workers loaded and idle before the first photo is enqueued. The expected gain follows from the
one-process run: with per-photo time outside the model c, model time s, and k the speed-up a second
process gets on CPU work (2 on two free cores), two processes do at most 2/(c+s) photos a second, the
cores k/c and an accelerator that runs one call at a time 1/s; so the gain is min(2, k(c+s)/c), and
also at most (c+s)/s with one accelerator. k is measured too, just before (`cpu_probe`): a shared or
hyper-threaded machine gives less than 2, and then no worker layout can do better.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from redis import Redis

from bench.common import console, machine, median, ms, print_table, private_redis, verdict
from bench.standin import DEFAULT_SLEEP_S, fleet, smooth_inverse_depth, span_s, wait_done, worker_config
from producer.enqueue import Enqueuer

# DepthPro's own input side, so that preprocessing and the resize back cost what they really do.
DEPTHPRO_INPUT = 1536
SIZES = {"12 MP": (4032, 3024), "2 MP": (1632, 1224)}
PHOTOS = {"12 MP": 14, "2 MP": 24}
QUICK_PHOTOS = {"12 MP": 4, "2 MP": 4}
# Photos each probe process works through (see cpu_probe).
PROBE_PHOTOS = {"12 MP": 4, "2 MP": 12}
QUICK_PROBE_PHOTOS = {"12 MP": 2, "2 MP": 4}
# The measured gain should reach this share of what the arithmetic above allows.
GOAL_SHARE = 0.9
MODES = {1: ("one process", None), 2: ("two, shared", False), 3: ("two, one at a time", True)}
# Model seconds per photo on other hardware, for the "when is it worth it" table (see the README).
MODEL_S = {"GPU box (the stand-in's time)": DEFAULT_SLEEP_S, "Mac mini (README: 3 to 5 s)": 4.0}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def photo_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """Smooth colour fields plus sensor-like grain: about the bytes per pixel, and so the decode cost, of
    a camera JPEG (plain noise would be far larger, a flat image far smaller)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    smooth = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    grain = rng.normal(0.0, 6.0, (height, width, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same picture with a JPEG comment (COM) after SOI: new bytes, so a new job, at the same cost."""
    payload = text.encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _write_photos(folder: Path, size: tuple[int, int], count: int) -> list[Path]:
    base = photo_jpeg(*size)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"IMG_{i:04d}.jpg"
        path.write_bytes(with_comment(base, f"depthq bench photo {i}"))
        paths.append(path)
    return paths


def cpu_probe(photo: Path, count: int, start_at: float) -> float:
    """Seconds for `count` rounds of the job's main CPU work on one photo (decode, preprocessing, metric
    depth at full resolution), without depthq around it: no Redis, no model, no writes. Starts at the
    wall-clock `start_at`, so that two probe processes really run at the same time."""
    from worker.depth import metric_depth
    from worker.images import load_image
    from worker.preprocess import model_input

    data = photo.read_bytes()
    inverse = smooth_inverse_depth(DEPTHPRO_INPUT)
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.perf_counter()
    for _ in range(count):
        image = load_image(data, photo.name, 10**9)
        model_input(image.rgb, DEPTHPRO_INPUT)
        metric_depth(inverse, image.width, image.height, 60.0)
    return time.perf_counter() - t0


def _probe_scaling(photo: Path, count: int) -> dict[str, float]:
    """The machine's own speed-up from a second process on this work: the baseline for `gain`. Fresh
    interpreters, as the workers are; on a shared machine this is what its cores really give."""
    code = (
        "import sys; from pathlib import Path; from bench.overlap import cpu_probe; "
        "print(cpu_probe(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))"
    )
    seconds = {}
    for processes in (1, 2):
        start_at = time.time() + 3.0  # after every interpreter has imported numpy, cv2 and Pillow
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(photo), str(count), str(start_at)],
                cwd=Path(__file__).resolve().parents[1],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(processes)
        ]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"the CPU probe failed: {outs}")
        seconds[processes] = max(float(o) for o in outs)
    return {
        "one_s_per_photo": seconds[1] / count,
        "two_s_per_photo": seconds[2] / (2 * count),
        "scaling": 2 * seconds[1] / seconds[2],
    }


def _one(
    processes: int, lock: bool | None, photos: list[Path], redis_url: str, connection: Redis, root: Path
) -> dict[str, Any]:
    connection.flushall()
    config = worker_config(redis_url, photos[0].parent, root / "out")
    lock_path = root / "accelerator.lock" if lock else None
    with fleet(
        processes,
        redis_url,
        config,
        root / "logs",
        input_size=DEPTHPRO_INPUT,
        accelerator_lock=lock_path,
    ) as workers:
        enqueuer = Enqueuer(config, connection)
        cpu0 = workers.cpu_s()
        submitted = [enqueuer.submit(p) for p in photos]
        if any(s.outcome != "enqueued" for s in submitted):
            raise RuntimeError(f"not all photos were enqueued: {[s.outcome for s in submitted]}")
        runs = wait_done(connection, config, [s.job_id for s in submitted], timeout_s=120 + 10 * len(photos))
        cpu1 = workers.cpu_s()
        load = os.getloadavg()[0]
    seconds = span_s(runs)
    timings = [json.loads(p.read_text())["timings_ms"] for p in sorted((root / "out").glob("*.jpg.json"))]
    return {
        "processes": processes,
        "one_at_a_time": bool(lock),
        "photos": len(runs),
        "seconds": seconds,
        "photos_per_s": len(runs) / seconds,
        "cpu_per_photo_s": (cpu1 - cpu0) / len(runs) if cpu0 is not None and cpu1 is not None else None,
        "load_1min": load,
        "timings_ms": {k: median([t[k] for t in timings]) for k in ("decode", "inference", "postprocess", "write")},
    }


def expected_gain(c: float, s: float, cores: float, one_at_a_time: bool) -> float:
    """Two processes against one, from per-photo seconds outside the model c and model seconds s, with
    `cores` the speed-up a second process gets on CPU work (2 on two free cores; see the docstring)."""
    gain = min(2.0, min(cores, 2) * (c + s) / c)
    return min(gain, (c + s) / s) if one_at_a_time else gain


def _outside_model_ms(t: dict[str, float]) -> float:
    """A job's own time outside the model's sleep: decode, preprocessing, postprocess, write."""
    return t["decode"] + t["inference"] - DEFAULT_SLEEP_S * 1000 + t["postprocess"] + t["write"]


def run(quick: bool = False) -> dict[str, Any]:
    """Photos per second with one and two worker processes, and the CPU time per photo outside the model."""
    where = machine()
    console.print(where)
    cores = _cores()
    counts = QUICK_PHOTOS if quick else PHOTOS
    results: dict[str, dict[str, Any]] = {}
    with private_redis() as server, tempfile.TemporaryDirectory(prefix="depthq-bench-overlap-") as tmp:
        connection = Redis.from_url(server.url)
        try:
            for label, size in SIZES.items():
                folder = Path(tmp) / label.replace(" ", "")
                t0 = time.perf_counter()
                photos = _write_photos(folder / "inbox", size, counts[label])
                made_s = time.perf_counter() - t0
                probe = _probe_scaling(photos[0], (QUICK_PROBE_PHOTOS if quick else PROBE_PHOTOS)[label])
                rows = []
                for key, (_, lock) in MODES.items():
                    processes = 1 if lock is None else 2
                    rows.append(_one(processes, lock, photos, server.url, connection, folder / f"run{key}"))
                results[label] = {
                    "size": size,
                    "jpeg_bytes": photos[0].stat().st_size,
                    "made_s": made_s,
                    "cpu_probe": probe,
                    "rows": rows,
                }
        finally:
            connection.close()

    table = []
    for label, result in results.items():
        one = result["rows"][0]
        # Seconds per photo outside the model: one process's wall time per photo, less the model's.
        c = max(1 / one["photos_per_s"] - DEFAULT_SLEEP_S, 1e-3)
        result["outside_model_s"] = c
        for row, (name, _) in zip(result["rows"], MODES.values(), strict=True):
            row["gain"] = row["photos_per_s"] / one["photos_per_s"]
            if row["processes"] == 1:
                row["ideal_gain"] = row["expected_gain"] = 1.0
            else:
                lock = row["one_at_a_time"]
                row["ideal_gain"] = expected_gain(c, DEFAULT_SLEEP_S, min(cores, 2), lock)
                # What this machine's cores gave the CPU work alone just before, instead of two free cores.
                row["expected_gain"] = expected_gain(c, DEFAULT_SLEEP_S, result["cpu_probe"]["scaling"], lock)
            row["met"] = row["gain"] >= GOAL_SHARE * row["expected_gain"]
            two = row["processes"] == 2
            table.append(
                [
                    label,
                    name,
                    row["photos"],
                    f"{row['seconds']:.2f}",
                    f"{row['photos_per_s']:.2f}",
                    f"{row['gain']:.2f}x",
                    f"{row['ideal_gain']:.2f}x",
                    f"{result['cpu_probe']['scaling']:.2f}x" if two else "",
                    f"{row['expected_gain']:.2f}x",
                    verdict(row["met"]) if two else "baseline",
                    f"{_outside_model_ms(row['timings_ms']):.0f} ms",
                    "-" if row["cpu_per_photo_s"] is None else ms(row["cpu_per_photo_s"]),
                    f"{row['load_1min']:.1f}",
                ]
            )
    print_table(
        f"Overlap: {DEFAULT_SLEEP_S * 1000:.0f} ms stand-in model + real pre/post-processing, {cores} cores, "
        "first job start to last job end",
        [
            "photos",
            "workers",
            "n",
            "seconds",
            "photos/s",
            "gain",
            "2 free cores",
            "CPU alone",
            "expected here",
            f">= {GOAL_SHARE:.0%} of it",
            "job outside model",
            "CPU/photo",
            "load",
        ],
        table,
    )

    print_table(
        "Per photo outside the model, one process (medians of the sidecars' timings_ms)",
        ["photos", "JPEG", "decode", "preprocess", "postprocess", "write", "outside model", "model", "outside / model"],
        [
            [
                label,
                f"{r['jpeg_bytes'] / 1e6:.1f} MB",
                f"{t['decode']:.0f} ms",
                f"{t['inference'] - DEFAULT_SLEEP_S * 1000:.0f} ms",
                f"{t['postprocess']:.0f} ms",
                f"{t['write']:.0f} ms",
                ms(r["outside_model_s"]),
                ms(DEFAULT_SLEEP_S),
                f"{r['outside_model_s'] / DEFAULT_SLEEP_S:.2f}",
            ]
            for label, r in results.items()
            for t in [r["rows"][0]["timings_ms"]]
        ],
    )

    worth = []
    for label, r in results.items():
        c = r["outside_model_s"]
        for host, s in MODEL_S.items():
            worth.append(
                [label, host, ms(s), f"{expected_gain(c, s, 2, True):.2f}x", f"{expected_gain(c, s, 1, True):.2f}x"]
            )
    print_table(
        "When --workers 2 is worth it: expected gain with one accelerator, from the time outside the model above",
        ["photos", "host", "model per photo", "2 free cores", "1 free core"],
        worth,
    )
    console.print(
        "2 free cores: the gain the arithmetic allows with two free cores. CPU alone: this machine's own "
        "gain from a second process on the same CPU work without depthq (decode, preprocessing, metric depth; "
        "no Redis, model or writes), measured just before. expected here: the arithmetic with that gain in "
        "place of two free cores; the goal is 90% of it. "
        "preprocess: the model's timing less the stand-in's sleep (model_input, a stage save, the sleep's "
        "overrun). job outside model: decode + preprocess + postprocess + write, per job (with one accelerator "
        "it includes waiting for it). outside model: one process's seconds per photo less the model's, so it "
        "includes rq and Redis. CPU/photo: the workers' CPU time (user + system) per photo. load: the 1-minute "
        "load average after the run (this machine is shared). An accelerator with room for two processes "
        "gives up to 2x whenever two cores are free."
    )
    return {
        "machine": where,
        "cores": cores,
        "model_s": DEFAULT_SLEEP_S,
        "goal_share_of_expected": GOAL_SHARE,
        "quick": quick,
        "sizes": results,
        "advice": (
            "--workers 2 pays when the time per photo outside the model (c) is a sizeable fraction of the "
            "model's time (s) and a core is free for it: with one accelerator taking one call at a time "
            "(Neural Engine, one GPU) the gain is at most min(2, (c+s)/s), and (c+s)/max(c, s) with one free "
            "core; up to 2 where the accelerator can serve both. It costs a second model in memory "
            "(DepthPro: about 1.9 GB of float32 weights, plus activations)."
        ),
    }
