"""Video clips (issue 25): what a clip costs a worker beside photos, its memory, its spread, its flicker.

Five measurements, each beside its own baseline in the same run:

1. **Frames per second end to end** with the tiny DepthPro on the CPU: a clip dropped through the
   producer's Enqueuer, its chunk jobs and its assemble, against the same worker on photos of the
   frame's size.
2. **Per-frame non-model CPU** against a photo of the same size (1920 x 1080): the stand-in backend
   (bench/standin.py, no sleep, DepthPro's 1536 px input, so preprocessing costs what it really does)
   in place of the model; CPU seconds of the worker over a clip of N frames (decode, metric depth,
   staging, the assemble's rescale, depth files and H.264 preview) against N photos (decode, metric
   depth, npy, PNG preview).
3. **Peak RSS of a worker on a 4K clip**, a fresh `python -m bench.standin` process each, over clips of
   16 and 48 frames and one 4K photo: a worker that held the clip would grow with its length.
4. **1, 2 and 3 workers** (stand-ins of 300 ms a frame, each its own process) on one clip, shared
   transport; and 4b, **1, 2 and 3 worker hosts over the redis transport**, as `bench scaleout` runs
   photos: network namespaces that share no disk (root and iproute2; skipped without them).
5. **Flicker** on a static scene whose frames differ only by sensor noise, with a stand-in whose FOV
   estimate jitters (normal, 2 degrees) as a real one does: the frame-to-frame change of the median
   depth with one camera per clip (depthq's outputs) against per-frame FOV (each frame at its own).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
from redis import Redis

from bench.common import console, machine, print_table, private_redis
from bench.standin import FOV_DEG, StandInBackend, start_workers
from depthq.config import Config, load_config
from producer.enqueue import Enqueuer
from testkit.photos import write_jpeg
from testkit.tiny_model import build_tiny_model
from testkit.waiting import wait_for
from worker.backends.base import Prediction
from worker.worker import build_worker, load_backend

MODEL_SIDE = 1536


def _config(redis_url: str, root: Path, **sections: dict[str, Any]) -> Config:
    overrides: dict[str, dict[str, Any]] = {
        "redis": {"url": redis_url},
        "producer": {"watch": str(root / "inbox")},
        "output": {"dir": str(root / "out")},
        "worker": {"warmup": False},
    }
    for name, keys in sections.items():
        overrides.setdefault(name, {}).update(keys)
    root.mkdir(parents=True, exist_ok=True)
    empty = root / "empty.yaml"
    empty.write_text("{}\n")
    return load_config(empty, overrides=overrides, environ={})


def write_scene_clip(path: Path, width: int, height: int, frames: int, noise: float = 0.0, seed: int = 0) -> Path:
    """A static scene (a smooth gradient) as H.264; `noise` adds that much sensor noise (std, 8-bit levels)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    scene = np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) * 127 // (width + height)], -1
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            rgb = scene + rng.normal(0.0, noise, scene.shape) if noise else scene
            frame = av.VideoFrame.from_ndarray(np.clip(rgb, 0, 255).astype(np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _drain(config: Config, connection: Redis, backend: Any) -> float:
    """Run a worker in this process until the queue is empty; its CPU seconds."""
    cpu = time.process_time()
    build_worker(config, connection, backend).work(burst=True, with_scheduler=False)
    return time.process_time() - cpu


def _enqueue(config: Config, connection: Redis, paths: list[Path]) -> None:
    enqueuer = Enqueuer(config, connection)
    for path in paths:
        outcome = enqueuer.submit(path).outcome
        if outcome != "enqueued":
            raise RuntimeError(f"{path}: expected new jobs, got {outcome!r}")


def throughput(redis_url: str, frames: int) -> dict[str, Any]:
    """Frames/s of one tiny-model worker on a 640 x 360 clip, and photos/s on photos of that size."""
    with tempfile.TemporaryDirectory(prefix="depthq-bench-video-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model")
        config = _config(redis_url, root, model={"path": str(model), "device": "cpu"})
        backend, _ = load_backend(config)
        for _ in range(3):  # torch's first passes are slow: neither side of the ratio should pay them
            backend.predict(np.zeros((360, 640, 3), np.uint8))
        connection = Redis.from_url(redis_url)
        clip = write_scene_clip(root / "inbox" / "clip.mp4", 640, 360, frames, noise=2.0)
        t0 = time.perf_counter()
        _enqueue(config, connection, [clip])
        _drain(config, connection, backend)
        clip_s = time.perf_counter() - t0
        assert (config.output.dir / "clip.mp4.json").exists()
        photos = [write_jpeg(root / "inbox" / "photos" / f"p{i}.jpg", 640, 360, seed=i) for i in range(frames)]
        t0 = time.perf_counter()
        _enqueue(config, connection, photos)
        _drain(config, connection, backend)
        photo_s = time.perf_counter() - t0
        connection.flushdb()
    return {"frames": frames, "clip_fps": frames / clip_s, "photo_per_s": frames / photo_s}


def non_model_cpu(redis_url: str, frames: int) -> dict[str, Any]:
    """Worker CPU per 1080p frame of a clip against per 1080p photo, the model a stand-in with no sleep."""
    with tempfile.TemporaryDirectory(prefix="depthq-bench-video-") as tmp:
        root = Path(tmp)
        config = _config(redis_url, root)
        connection = Redis.from_url(redis_url)
        backend = StandInBackend(0.0, MODEL_SIDE)
        clip = write_scene_clip(root / "inbox" / "clip.mp4", 1920, 1080, frames, noise=2.0)
        _enqueue(config, connection, [clip])
        clip_cpu = _drain(config, connection, backend)
        photos = [write_jpeg(root / "inbox" / "p" / f"p{i}.jpg", 1920, 1080, seed=i) for i in range(frames)]
        _enqueue(config, connection, photos)
        photo_cpu = _drain(config, connection, backend)
        connection.flushdb()
    return {"frames": frames, "clip_ms": clip_cpu / frames * 1000, "photo_ms": photo_cpu / frames * 1000}


def _peak_rss_kib(redis_url: str, root: Path, make: Callable[[Path], list[Path]], name: str) -> int:
    """The peak RSS (VmHWM) of one fresh stand-in worker that does every job of `make`'s files."""
    inbox, out = root / name / "inbox", root / name / "out"
    config = _config(redis_url, root / name, producer={"watch": str(inbox)}, output={"dir": str(out)})
    connection = Redis.from_url(redis_url)
    _enqueue(config, connection, make(inbox))
    cmd = [sys.executable, "-m", "bench.standin", "--redis-url", redis_url, "--watch", str(inbox)]
    cmd += [
        "--output",
        str(out),
        "--sleep-ms",
        "0",
        "--input-size",
        str(MODEL_SIDE),
        "--burst",
        "--log-level",
        "WARNING",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
    proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1])
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            break
        time.sleep(0.05)  # sampling the high-water mark, which only grows: no event is missed
    if proc.wait() != 0:
        raise RuntimeError(f"the stand-in worker for {name} exited {proc.returncode}")
    connection.flushdb()
    return peak


def memory(redis_url: str, quick: bool) -> dict[str, Any]:
    lengths = (8, 24) if quick else (16, 48)
    with tempfile.TemporaryDirectory(prefix="depthq-bench-video-") as tmp:
        root = Path(tmp)
        out: dict[str, Any] = {}
        for frames in lengths:
            out[f"clip{frames}"] = _peak_rss_kib(
                redis_url,
                root,
                lambda inbox, n=frames: [write_scene_clip(inbox / "4k.mp4", 3840, 2160, n, noise=2.0)],
                f"clip{frames}",
            )
        out["photo"] = _peak_rss_kib(
            redis_url, root, lambda inbox: [write_jpeg(inbox / "4k.jpg", 3840, 2160, seed=1)], "photo"
        )
    out["lengths"] = lengths
    return out


def scale(redis_url: str, frames: int, chunk: int) -> list[tuple[int, float]]:
    """Seconds from enqueue to the clip's sidecar with 1, 2 and 3 stand-in workers (300 ms a frame)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="depthq-bench-video-") as tmp:
        for workers in (1, 2, 3):
            root = Path(tmp) / f"w{workers}"
            config = _config(redis_url, root, video={"chunk_frames": chunk})
            connection = Redis.from_url(redis_url)
            clip = write_scene_clip(root / "inbox" / "clip.mp4", 640, 360, frames)
            procs = start_workers(workers, redis_url, root / "inbox", root / "out", root / "logs")
            try:
                wait_for(lambda n=workers, c=connection: len(c.keys("rq:worker:*")) >= n, "the workers", timeout=120)
                t0 = time.perf_counter()
                _enqueue(config, connection, [clip])
                wait_for((root / "out" / "clip.mp4.json").exists, "the clip's sidecar", timeout=600)
                rows.append((workers, time.perf_counter() - t0))
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    proc.wait(timeout=60)
                connection.flushdb()
    return rows


def scale_hosts(frames: int, chunk: int) -> list[tuple[int, float]] | str:
    """Seconds from a clip dropped on host a to its sidecar there, with 1, 2 and 3 worker hosts over the
    redis transport (network namespaces, testkit/cluster.py: the hosts share no disk), stand-ins of
    300 ms a frame; or why it cannot run here (it needs root and iproute2)."""
    from bench.scaleout import WORKER_HOSTS, _standin_argv
    from testkit.cluster import cluster
    from testkit.netns import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return reason
    rows = []
    with tempfile.TemporaryDirectory(prefix="depthq-bench-video-hosts-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model")
        with cluster(root / "c", model, ("a", *WORKER_HOSTS)) as c:
            c.start_redis()
            c.start_producer(video={"chunk_frames": chunk})
            for n, host in enumerate(WORKER_HOSTS, start=1):
                c.start_worker(host, argv=_standin_argv(c, host))
                wait_for(lambda n=n: c.workers_ready(n), f"{n} worker host(s)", timeout=180)
                staged = root / f"clip{n}.mp4"
                write_scene_clip(staged, 640, 360, frames, noise=2.0, seed=n)
                t0 = time.perf_counter()
                staged.rename(c.inbox / staged.name)  # dropped whole, as a copy into the folder would be
                wait_for((c.out / staged.name).with_suffix(".mp4.json").exists, f"{staged.name}", timeout=600)
                rows.append((n, time.perf_counter() - t0))
    return rows


class JitteringStandIn(StandInBackend):
    """The stand-in, with a FOV estimate that wanders frame to frame (normal, `sigma_deg`), and an inverse
    depth that moves with each frame's noise as a real model's does a little."""

    def __init__(self, sigma_deg: float, seed: int = 0):
        super().__init__(0.0, 64)
        self.rng = np.random.default_rng(seed)
        self.sigma_deg = sigma_deg
        self.reference: float | None = None

    def predict(self, rgb: np.ndarray) -> Prediction:
        base = super().predict(rgb)
        level = float(rgb.mean())
        self.reference = self.reference or level
        inverse = base.inverse_depth * (1.0 + (level - self.reference) / self.reference)
        return Prediction(inverse, FOV_DEG + float(self.rng.normal(0.0, self.sigma_deg)))


def flicker(redis_url: str, frames: int) -> dict[str, Any]:
    """Mean frame-to-frame relative change of the median depth: one camera per clip, and per-frame FOV."""
    with tempfile.TemporaryDirectory(prefix="depthq-bench-video-") as tmp:
        root = Path(tmp)
        config = _config(redis_url, root, output={"formats": []})
        connection = Redis.from_url(redis_url)
        clip = write_scene_clip(root / "inbox" / "static.mp4", 320, 180, frames, noise=3.0, seed=7)
        _enqueue(config, connection, [clip])
        _drain(config, connection, JitteringStandIn(2.0))
        meta = json.loads((config.output.dir / "static.mp4.json").read_text())
        folder = config.output.dir / "static.mp4.depth"
        medians = np.array([float(np.median(np.load(folder / f"{k:06d}.npy"))) for k in range(1, frames + 1)])
        connection.flushdb()
    width, f_clip = meta["width"], meta["focal_length_px"]
    own = np.array([0.5 * width / math.tan(math.radians(fov / 2)) for fov in meta["frame_fov_deg"]])
    per_frame = medians * own / f_clip  # each frame's depth at its own focal length (depth is proportional to f)

    def change(m: np.ndarray) -> float:
        return float(np.mean(np.abs(np.diff(m)) / m[:-1]))

    return {"frames": frames, "one_camera": change(medians), "per_frame": change(per_frame)}


def run(quick: bool = False) -> dict[str, Any]:
    console.print(machine())
    logging.getLogger("rq.worker").setLevel(logging.WARNING)  # its per-job lines would bury the tables
    n = 16 if quick else 48
    with private_redis() as server:
        url = server.url
        tp = throughput(url, n)
        cpu = non_model_cpu(url, 8 if quick else 24)
        mem = memory(url, quick)
        sc = scale(url, 24 if quick else 48, 8)
        hosts = scale_hosts(24 if quick else 48, 8)
        fl = flicker(url, 30 if quick else 120)
    print_table(
        "1. Frames per second end to end, tiny DepthPro on the CPU, one worker (640 x 360)",
        ["clip frames/s", "photos/s (same size)", "ratio"],
        [[f"{tp['clip_fps']:.1f}", f"{tp['photo_per_s']:.1f}", f"{tp['clip_fps'] / tp['photo_per_s']:.2f}x"]],
    )
    print_table(
        f"2. Worker CPU outside the model, per 1920 x 1080 frame vs photo ({cpu['frames']} each; stand-in, 1536 px)",
        ["per clip frame", "per photo", "ratio"],
        [[f"{cpu['clip_ms']:.0f} ms", f"{cpu['photo_ms']:.0f} ms", f"{cpu['clip_ms'] / cpu['photo_ms']:.2f}x"]],
    )
    short, long = mem["lengths"]
    print_table(
        "3. Peak RSS of a fresh stand-in worker, 3840 x 2160",
        [f"clip of {short} frames", f"clip of {long} frames", "one 4K photo", f"{long} vs {short} frames"],
        [
            [
                f"{mem[f'clip{short}'] / 1024:.0f} MiB",
                f"{mem[f'clip{long}'] / 1024:.0f} MiB",
                f"{mem['photo'] / 1024:.0f} MiB",
                f"{mem[f'clip{long}'] / mem[f'clip{short}']:.2f}x",
            ]
        ],
    )
    one = sc[0][1]
    print_table(
        "4. One clip over 1, 2 and 3 stand-in workers (300 ms a frame, chunks of 8, shared transport)",
        ["workers", "seconds", "speed-up", "ideal"],
        [[w, f"{s:.1f}", f"{one / s:.2f}x", f"{w}x"] for w, s in sc],
    )
    if isinstance(hosts, str):
        console.print(f"4b. worker hosts over the redis transport: skipped: {hosts}")
    else:
        one_host = hosts[0][1]
        print_table(
            "4b. One clip over 1, 2 and 3 worker hosts, redis transport (namespaces, 300 ms a frame, chunks of 8)",
            ["worker hosts", "seconds", "speed-up", "ideal"],
            [[n, f"{s:.1f}", f"{one_host / s:.2f}x", f"{n}x"] for n, s in hosts],
        )
    jitter = f"static scene, FOV jitter 2 deg ({fl['frames']} frames)"
    print_table(
        f"5. Flicker: mean frame-to-frame change of the median depth, {jitter}",
        ["one camera per clip", "per-frame FOV", "per-frame / one camera"],
        [
            [
                f"{fl['one_camera'] * 100:.3f} %",
                f"{fl['per_frame'] * 100:.3f} %",
                f"{fl['per_frame'] / max(fl['one_camera'], 1e-12):.0f}x",
            ]
        ],
    )
    return {"throughput": tp, "cpu": cpu, "memory": mem, "scale": sc, "hosts": hosts, "flicker": fl}
