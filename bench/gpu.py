"""Benchmark 7, GPU: the torch worker on CUDA at full size, next to the paper and to its peers.

The weights are random: speed depends on the architecture and the input size, not on the values, so
no 1.9 GB download is needed and the machine needs no network. The architecture is apple/DepthPro-hf's
(three DINOv2 ViT-L/16 encoders at 384 px: patch, image and FOV). transformers' `DepthProConfig()`
defaults are not that model (they give DINOv2 ViT-B/14 encoders, about a third of the parameters), so
the released encoder settings are spelled out below; the parameter count and the FLOPs per image, both
taken on torch's meta device without allocating a byte, show which one was built, and run anywhere.

On CUDA, in one run (issue 18):
- the forward pass in ms per image, input already on the GPU: fp32, fp16 and bf16 eager, bf16 with only
  SDPA's flash and memory-efficient kernels allowed, torch.compile in each mode, channels_last; each
  with its TFLOP/s and its share of the device's peak (MFU). A variant that fails is reported as failed.
- parity: fp16 and bf16, eager and compiled, against fp32 eager on the same model and the same 12 MP
  photos, through the worker's own pre- and post-processing on the GPU: median and p99 relative depth
  error, and the FOV difference.
- the whole job (decode -> GPU pre -> forward -> GPU post -> preview -> write) in photos/s for 12 MP
  JPEGs with 1, 2, 4 and 8 worker processes on one GPU, each a real TorchBackend.
On a machine without CUDA every one of those rows prints as skipped, quickly.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import console, machine, median, ms, p95, print_table, timed, verdict

# Bochkovskii et al., "Depth Pro: Sharp Monocular Metric Depth in Less Than a Second" (2024): 0.341 s
# for a 1536x1536 depth map on a V100.
PAPER_S = 0.341
PAPER_GPU = "V100"
# Each encoder of apple/DepthPro-hf (its config.json): DINOv2 ViT-L with 16-pixel patches at 384 px.
VIT_L16 = {
    "model_type": "dinov2",
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 16,
    "image_size": 384,
    "use_mask_token": False,
}
RUNS = 20
QUICK_RUNS = 5
# Untimed calls after the first: cuDNN and cuBLAS pick their kernels, the allocator settles.
WARMUP = 3
SKIP_REASON = "no CUDA device (this benchmark needs the device tool's GPU machine)"
SKIPPED = "skipped: no CUDA device"
# Issue 18's goals on one H200, and its peers (ml-depth-pro issues #25 and #90), both on an H100.
GOAL_FORWARD_S = 0.040
GOAL_PHOTOS_S = 15.0
PEERS = "PyTorch 500 ms and TensorRT fp16 60 ms, both on an H100"
# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by name fragment, for
# (fp16/bf16, fp32 without TF32: torch's default for matmuls). Unknown devices get no MFU.
PEAK_TFLOPS = {
    "H200": (989.0, 67.0),
    "H100 PCIe": (756.0, 51.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
    "A10": (125.0, 31.2),
    "V100": (125.0, 15.7),
}
# The whole job: worker processes per GPU, 12 MP photos, the settings the workers run with.
JOB_WORKERS = (1, 2, 4, 8)
JOB_SIZE = (4032, 3024)
JOB_PHOTOS = 8  # different JPEGs, cycled
JOB_SECONDS = 20.0
QUICK_JOB_SECONDS = 8.0
JOB_DTYPE = "float16"
JOB_COMPILE = "default"
# Parity: photos through the worker's pre/post, with an EXIF focal length: a random FOV head's answer
# is no angle, so the depth is scaled by the same f_px on every side and only the precision differs.
PARITY_PHOTOS = 3
PARITY_FOCAL_35MM = 26.0

FORWARD_ROWS = (
    "fp32 eager",
    "fp16 eager (the worker's default on CUDA)",
    "bf16 eager",
    "bf16 eager, SDPA flash/memory-efficient kernels only",
    "fp16 torch.compile (default)",
    "bf16 torch.compile (default)",
    "bf16 torch.compile (reduce-overhead: CUDA graphs)",
    "bf16 torch.compile (max-autotune)",
    "fp16 channels_last (eager)",
    "bf16 channels_last (eager)",
)
PARITY_ROWS = ("fp16 eager", "bf16 eager", "fp16 torch.compile (default)", "bf16 torch.compile (default)")


def depthpro_config() -> Any:
    """The released DepthPro's architecture (with its FOV head), as transformers describes it."""
    from transformers import DepthProConfig

    return DepthProConfig(
        use_fov_model=True,
        image_model_config=dict(VIT_L16),
        patch_model_config=dict(VIT_L16),
        fov_model_config=dict(VIT_L16),
    )


def count_params(config: Any) -> dict[str, int]:
    """Parameters per part, counted on the meta device: shapes only, no memory, any machine."""
    import torch
    from transformers import DepthProForDepthEstimation

    with torch.device("meta"):
        model = DepthProForDepthEstimation(config, use_fov_model=True)

    def n(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    encoder = model.depth_pro.encoder
    total = n(model)
    parts = {
        "patch encoder": n(encoder.patch_encoder),
        "image encoder": n(encoder.image_encoder),
        "FOV model": n(model.fov_model),
    }
    parts["neck, fusion and head"] = total - sum(parts.values())
    return {"total": total, **parts}


def _mparams(count: int) -> str:
    return f"{count / 1e6:.1f} M"


def _time_forward(forward: Callable[[], Any], runs: int, device: Any) -> list[float]:
    """Seconds per call. On CUDA, events around each call time the GPU's work, not the launch."""
    import torch

    if device.type != "cuda":
        return timed(forward, runs, warmup=0)
    out = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1000.0)
    return out


def _measure(
    name: str, prepare: Callable[[], Callable[[], Any]], runs: int, device: Any, keep_compiled: bool = False
) -> dict[str, Any]:
    """One variant: its first call (a compile, for torch.compile), warm-up, then `runs` timed calls.

    `keep_compiled`: the caller still uses the compiled function, and resets dynamo itself."""
    import torch

    cuda = device.type == "cuda"
    try:
        with torch.inference_mode():
            forward = prepare()
            t0 = time.perf_counter()
            forward()
            if cuda:
                torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            for _ in range(WARMUP):
                forward()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = _time_forward(forward, runs, device)
        peak = torch.cuda.max_memory_allocated() if cuda else None
        return {"name": name, "times_s": times, "first_call_s": first_s, "peak_bytes": peak}
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:160]
        return {"name": name, "error": f"{type(exc).__name__}: {first_line}"}
    finally:
        if not keep_compiled:
            torch._dynamo.reset()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()


def count_flops(config: Any) -> int:
    """FLOPs of one forward at the model's input size (2 per multiply-add), counted by
    torch.utils.flop_counter on the meta device: shapes only, any machine, a second or two."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import DepthProForDepthEstimation

    from worker.backends.torch_backend import input_size_of

    size = input_size_of(config)
    with torch.device("meta"):
        model = DepthProForDepthEstimation(config, use_fov_model=True).eval()
        x = torch.zeros(1, 3, size, size)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(pixel_values=x)
    return int(counter.get_total_flops())


def peak_tflops(gpu: str, dtype_name: str) -> float | None:
    """The device's dense peak for this precision, or None for a device not in PEAK_TFLOPS."""
    for fragment, (half, single) in PEAK_TFLOPS.items():
        if fragment in gpu:
            return single if dtype_name == "fp32" else half
    return None


def _sdpa_fast_only() -> Any:
    """A context that lets SDPA use only its flash and memory-efficient kernels: if the model's
    attention needed the slow math kernel, this variant fails instead of timing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def forward_variants(
    config: Any, device: Any, quick: bool
) -> list[tuple[str, str, Callable[[], Callable[..., Any]] | None]]:
    """(row name, precision, prepare) for each FORWARD_ROWS entry; prepare returns `forward(x)`.

    One set of random weights (seed 0), copied into each precision, so parity compares like with like.
    """
    import contextlib

    import torch
    from transformers import DepthProForDepthEstimation

    torch.manual_seed(0)
    with torch.device(device):
        fp32 = DepthProForDepthEstimation(config, use_fov_model=True).eval()
    models: dict[str, Any] = {"fp32": fp32}

    def model(precision: str) -> Any:
        if precision not in models:
            dtype = torch.float16 if precision == "fp16" else torch.bfloat16
            copy = DepthProForDepthEstimation(config, use_fov_model=True)
            copy.load_state_dict(fp32.state_dict())
            models[precision] = copy.to(device, dtype=dtype).eval()
        return models[precision]

    def eager(precision: str, context: Callable[[], Any] = contextlib.nullcontext) -> Callable[[], Callable[..., Any]]:
        def prepare() -> Callable[..., Any]:
            m = model(precision)

            def forward(x: Any) -> Any:
                with context():
                    return m(pixel_values=x)

            return forward

        return prepare

    def compiled(precision: str, mode: str) -> Callable[[], Callable[..., Any]]:
        def prepare() -> Callable[..., Any]:
            m = model(precision)
            x = torch.zeros(1, 3, input_size_of(config), input_size_of(config), device=device, dtype=m.dtype)
            m(pixel_values=x)  # as the worker does: transformers' first-call hooks, then the compile
            fn = torch.compile(m, mode=mode, dynamic=False)
            return lambda x: fn(pixel_values=x)

        return prepare

    def channels_last(precision: str) -> Callable[[], Callable[..., Any]]:
        def prepare() -> Callable[..., Any]:
            m = model(precision)
            m.to(memory_format=torch.channels_last)
            return lambda x: m(pixel_values=x.contiguous(memory_format=torch.channels_last))

        return prepare

    from worker.backends.torch_backend import input_size_of

    prepares: dict[str, Callable[[], Callable[..., Any]] | None] = {
        FORWARD_ROWS[0]: eager("fp32"),
        FORWARD_ROWS[1]: eager("fp16"),
        FORWARD_ROWS[2]: eager("bf16"),
        FORWARD_ROWS[3]: eager("bf16", _sdpa_fast_only),
        FORWARD_ROWS[4]: compiled("fp16", "default"),
        FORWARD_ROWS[5]: compiled("bf16", "default"),
        FORWARD_ROWS[6]: compiled("bf16", "reduce-overhead"),
        FORWARD_ROWS[7]: None if quick else compiled("bf16", "max-autotune"),
        # Last: they convert the weights in place.
        FORWARD_ROWS[8]: channels_last("fp16"),
        FORWARD_ROWS[9]: channels_last("bf16"),
    }
    return [(name, name.split()[0], prepares[name]) for name in FORWARD_ROWS]


def _measure_variant(
    name: str, precision: str, prepare: Callable[[], Callable[..., Any]], runs: int, device: Any, photos: list[Any]
) -> dict[str, Any]:
    """Timing as `_measure` does, then the variant's answer on each parity photo (its model input)."""
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    holder: dict[str, Callable[..., Any]] = {}
    x = torch.rand(1, 3, photos[0].shape[-1], photos[0].shape[-1], device=device).mul_(2).sub_(1).to(dtype)

    def prepared() -> Callable[[], Any]:
        holder["forward"] = prepare()
        return lambda: holder["forward"](x)

    result = _measure(name, prepared, runs, device, keep_compiled=True)
    if "error" not in result and "forward" in holder:
        answers = []
        for photo in photos:
            with torch.inference_mode():
                out = holder["forward"](photo.to(dtype))
            # Copied at once, outside inference mode: CUDA graphs reuse the output's memory at the next call.
            answers.append((out.predicted_depth[0].to(torch.float32, copy=True), float(out.field_of_view.flatten()[0])))
        result["answers"] = answers
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    return result


def parity(answers: dict[str, list[tuple[Any, float]]], sizes: list[tuple[int, int]]) -> list[tuple[Any, ...]]:
    """Each precision's depth against fp32 eager's, through metric_depth on the GPU at the photo's size."""
    from worker.depth import metric_depth

    def depth(cid: Any, size: tuple[int, int]) -> np.ndarray:
        return metric_depth(cid, size[0], size[1], None, PARITY_FOCAL_35MM).depth

    reference = [depth(cid, size) for (cid, _), size in zip(answers["fp32 eager"], sizes, strict=True)]
    rows = []
    for name in PARITY_ROWS:
        row_name = next((n for n in answers if n.startswith(name)), None)
        if row_name is None:
            rows.append((name, "failed or skipped above", "", "", ""))
            continue
        errors = []
        for (cid, _), size, ref in zip(answers[row_name], sizes, reference, strict=True):
            errors.append(np.abs(depth(cid, size).astype(np.float64) / ref - 1.0)[::2, ::2].ravel())
        rel = np.concatenate(errors)
        fov = max(abs(a[1] - r[1]) for a, r in zip(answers[row_name], answers["fp32 eager"], strict=True))
        med = float(np.median(rel))
        rows.append(
            (
                name,
                f"{med * 100:.3f} %",
                f"{float(np.percentile(rel, 99)) * 100:.3f} %",
                f"{fov:.4f}°",
                verdict(med < 0.005),
            )
        )
    return rows


def _job_worker(
    device: str,
    compile_mode: str | bool,
    folder: str,
    jpegs: list[bytes],
    out: str,
    start: Any,
    seconds: float,
    results: Any,
) -> None:
    """One worker process: the real TorchBackend, then the job's stages on each photo until time is up.

    Tells `results` ("ready", pid) once loaded, then ("done", photos), or ("error", why) instead."""
    try:
        from depthq.config import ModelConfig
        from worker.backends.torch_backend import TorchBackend
        from worker.depth import metric_depth
        from worker.images import load_image
        from worker.preview import preview_png

        backend = TorchBackend(ModelConfig(path=folder, device=device, dtype=JOB_DTYPE, compile=compile_mode))
        backend.load()
        backend.predict(np.zeros((backend.input_size, backend.input_size, 3), np.uint8))
        target = Path(out) / str(os.getpid())
        results.put(("ready", os.getpid()))
        start.wait()
        t0 = time.perf_counter()
        done = 0
        while time.perf_counter() - t0 < seconds:
            image = load_image(jpegs[done % len(jpegs)], f"photo{done}.jpg", 10**9)
            prediction = backend.predict(image.rgb)
            md = metric_depth(prediction.inverse_depth, image.width, image.height, None, PARITY_FOCAL_35MM)
            preview = preview_png(md.depth, backend.input_size)
            with open(f"{target}.npy.tmp", "wb") as f:
                np.save(f, md.depth)
            os.replace(f"{target}.npy.tmp", f"{target}.npy")
            Path(f"{target}.png").write_bytes(preview)
            if time.perf_counter() - t0 > seconds:
                break  # finished after the bell: not counted
            done += 1
        results.put(("done", done))
    except Exception as exc:
        results.put(("error", f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:100]}"))


def _collect(results: Any, procs: list[Any], kind: str, timeout_s: float) -> list[Any]:
    """One `kind` message from each worker, or an error as soon as one reports or dies."""
    import queue

    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < len(procs):
        try:
            what, value = results.get(timeout=1.0)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a worker process died (exit code {dead[0]})") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(procs) - len(got)} worker(s) silent for {timeout_s:.0f} s") from None
            continue
        if what == "error":
            raise RuntimeError(value)
        if what == kind:
            got.append(value)
    return got


def whole_job(
    config: Any,
    seconds: float,
    workers: tuple[int, ...] = JOB_WORKERS,
    device: str = "cuda",
    compile_mode: str | bool = JOB_COMPILE,
) -> list[tuple[Any, ...]]:
    """Photos/s for 12 MP JPEGs with each of `workers` worker processes sharing one GPU, each with its
    share of the cores' threads as `depthq up --workers N` gives it. `device` and `compile_mode` let
    the same code be tried on a CPU with a tiny config."""
    import io

    from PIL import Image
    from transformers import DepthProForDepthEstimation

    from depthq.supervisor import THREAD_ENV, worker_threads
    from testkit.photos import synthetic_photo

    rows = []
    with tempfile.TemporaryDirectory(prefix="depthq-bench-gpu-") as tmp:
        folder = Path(tmp) / "model"
        DepthProForDepthEstimation(config, use_fov_model=True).save_pretrained(folder)
        jpegs = []
        for seed in range(JOB_PHOTOS):
            buffer = io.BytesIO()
            Image.fromarray(synthetic_photo(*JOB_SIZE, seed=seed)).save(buffer, format="JPEG", quality=90)
            jpegs.append(buffer.getvalue())
        ctx = mp.get_context("spawn")  # never fork a process that holds CUDA
        cores = len(os.sched_getaffinity(0))
        single = None
        for n in workers:
            saved = {k: os.environ.get(k) for k in THREAD_ENV}
            os.environ.update(dict.fromkeys(THREAD_ENV, str(worker_threads(n, cores))))
            start, results = ctx.Event(), ctx.Queue()
            procs = [
                ctx.Process(
                    target=_job_worker,
                    args=(device, compile_mode, str(folder), jpegs, tmp, start, seconds, results),
                )
                for _ in range(n)
            ]
            for proc in procs:
                proc.start()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            try:
                _collect(results, procs, "ready", 900)  # loads, and compiles: minutes for max-autotune
                start.set()
                done = sum(_collect(results, procs, "done", seconds + 300))
                rate = done / seconds
                single = single or rate
                rows.append(
                    (
                        n,
                        worker_threads(n, cores),
                        done,
                        f"{rate:.2f}",
                        f"{rate / single:.2f}x",
                        verdict(rate >= GOAL_PHOTOS_S),
                    )
                )
            except Exception as exc:
                rows.append((n, worker_threads(n, cores), "", f"failed: {type(exc).__name__}: {exc}"[:120], "", ""))
                for proc in procs:
                    proc.kill()
            finally:
                for proc in procs:
                    proc.join(timeout=60)
                    if proc.is_alive():
                        proc.kill()
    return rows


def _skipped_tables(size: int) -> None:
    """What a CUDA run prints, each row skipped: the same tables, so a CPU run shows what it would measure."""
    print_table(
        f"GPU: DepthPro forward, 1x3x{size}x{size}, random weights",
        ["variant", "median"],
        [(r, SKIPPED) for r in FORWARD_ROWS],
    )
    print_table(
        "GPU parity against fp32 eager (12 MP photos)",
        ["precision", "median rel. error"],
        [(r, SKIPPED) for r in PARITY_ROWS],
    )
    print_table(
        f"GPU: whole job, 12 MP JPEGs, {JOB_DTYPE}, compile {JOB_COMPILE}",
        ["workers", "photos/s"],
        [(n, SKIPPED) for n in JOB_WORKERS],
    )


def run(quick: bool = False) -> dict[str, Any]:
    """Parameters and FLOPs everywhere; every timed and parity row where CUDA is available."""
    import torch
    from transformers import DepthProConfig

    from worker.backends.torch_backend import input_size_of

    console.print(machine())
    config = depthpro_config()
    params = count_params(config)
    default_params = count_params(DepthProConfig(use_fov_model=True))["total"]
    size = input_size_of(config)
    flops = count_flops(config)
    rows: list[tuple[Any, ...]] = [
        ("total (3 x ViT-L/16 + decoder + FOV head)", f"{params['total']:,} ({_mparams(params['total'])})")
    ]
    rows += [(f"  {part}", _mparams(count)) for part, count in params.items() if part != "total"]
    rows += [
        ("input (patch_size / smallest scale ratio)", f"1x3x{size}x{size}"),
        ("FLOPs per image (torch.utils.flop_counter)", f"{flops / 1e12:.2f} TFLOP"),
        ("DepthProConfig() defaults, for comparison", f"{_mparams(default_params)} (ViT-B/14: not the release)"),
    ]
    print_table(
        "DepthPro (apple/DepthPro-hf architecture): parameters and FLOPs, counted on the meta device",
        ["figure", "value"],
        rows,
    )
    result: dict[str, Any] = {
        "params": params,
        "params_default_config": default_params,
        "input_size": size,
        "flops": flops,
    }

    if not torch.cuda.is_available():
        _skipped_tables(size)
        console.print(f"skipped: {SKIP_REASON}")
        return {"skipped": SKIP_REASON, **result}

    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    console.print(f"GPU: {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    from testkit.photos import synthetic_photo
    from worker.preprocess import model_input

    sizes = [JOB_SIZE] * PARITY_PHOTOS
    photos = [
        model_input(torch.from_numpy(synthetic_photo(*JOB_SIZE, seed=100 + i)).to(device), size)[None]
        for i in range(PARITY_PHOTOS)
    ]
    runs = QUICK_RUNS if quick else RUNS
    measured = []
    for name, precision, prepare in forward_variants(config, device, quick):
        if prepare is None:
            measured.append({"name": name, "error": "skipped with --quick (its compile takes minutes)"})
        else:
            measured.append(_measure_variant(name, precision, prepare, runs, device, photos))
        console.print(f"  {name}: {'failed' if 'error' in measured[-1] else 'done'}")
    table = []
    for v in measured:
        if "error" in v:
            table.append((v["name"], v["error"], "", "", "", "", "", ""))
            continue
        med = median(v["times_s"])
        peak = peak_tflops(gpu, v["name"].split()[0])
        achieved = flops / med / 1e12
        compiled_bf16 = v["name"].startswith("bf16 torch.compile")
        table.append(
            (
                v["name"],
                ms(med),
                ms(p95(v["times_s"])),
                f"{v['first_call_s']:.1f} s",
                f"{v['peak_bytes'] / 2**30:.2f} GiB",
                f"{achieved:.0f}",
                f"{achieved / peak * 100:.1f} %" if peak else "peak unknown",
                verdict(med <= GOAL_FORWARD_S) if compiled_bf16 else "",
            )
        )
    print_table(
        f"GPU: DepthPro forward, 1x3x{size}x{size}, random weights, {gpu}; goal: bf16 compiled <= "
        f"{ms(GOAL_FORWARD_S)}; paper {ms(PAPER_S)} on a {PAPER_GPU}; peers: {PEERS}",
        ["variant", "median", "p95", "first call", "peak memory", "TFLOP/s", "MFU", "verdict"],
        table,
    )
    answers = {v["name"]: v["answers"] for v in measured if "answers" in v}
    parity_rows = (
        parity(answers, sizes)
        if "fp32 eager" in answers
        else [(r, "fp32 eager failed", "", "", "") for r in PARITY_ROWS]
    )
    print_table(
        f"GPU parity against fp32 eager: {PARITY_PHOTOS} photos of {JOB_SIZE[0]}x{JOB_SIZE[1]}, "
        "through the worker's GPU pre/post",
        ["precision", "median rel. error", "p99 rel. error", "max FOV difference", "median < 0.5 %"],
        parity_rows,
    )
    for v in measured:
        v.pop("answers", None)
    job_rows = whole_job(config, QUICK_JOB_SECONDS if quick else JOB_SECONDS)
    print_table(
        f"GPU: whole job (decode, GPU pre, forward, GPU post, preview, write), 12 MP JPEGs, {JOB_DTYPE}, "
        f"compile {JOB_COMPILE}, one {gpu}; goal >= {GOAL_PHOTOS_S:.0f} photos/s",
        ["workers", "threads each", "photos", "photos/s", "vs 1 worker", "verdict"],
        job_rows,
    )
    return {**result, "gpu": gpu, "variants": measured, "parity": parity_rows, "whole_job": job_rows}
