"""Benchmark 7, GPU: full-size DepthPro's forward in ms per image on CUDA, next to the paper's V100 figure.

The weights are random: speed depends on the architecture and the input size, not on the values, so
no 1.9 GB download is needed and the machine needs no network. The architecture is apple/DepthPro-hf's
(three DINOv2 ViT-L/16 encoders at 384 px: patch, image and FOV). transformers' `DepthProConfig()`
defaults are not that model (they give DINOv2 ViT-B/14 encoders, about a third of the parameters), so
the released encoder settings are spelled out below; the parameter count, taken on torch's meta device
without allocating a byte, shows which one was built, and runs on any machine.

On CUDA it times, in fp16 with the input already on the GPU, the forward pass the torch worker runs
today (eager), and the variants that might make it faster: channels_last and torch.compile. Each
variant that fails is reported as failed instead of stopping the others.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

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


def _measure(name: str, prepare: Callable[[], Callable[[], Any]], runs: int, device: Any) -> dict[str, Any]:
    """One variant: its first call (a compile, for torch.compile), warm-up, then `runs` timed calls."""
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
        torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def measure(config: Any, device: Any, dtype: Any, runs: int, max_autotune: bool = True) -> dict[str, Any]:
    """Build DepthPro from `config` with random weights on `device`, then time each variant.

    `device` and `dtype` are parameters so that the same code can be tried on a CPU with a tiny
    config; the figures that mean something are CUDA's in fp16.
    """
    import torch
    from transformers import DepthProForDepthEstimation

    from worker.backends.torch_backend import input_size_of

    torch.manual_seed(0)
    with torch.device(device):
        model = DepthProForDepthEstimation(config, use_fov_model=True)
    model = model.to(dtype=dtype).eval()
    size = input_size_of(config)
    # What the worker feeds it: RGB rescaled to [-1, 1] at the model's input size.
    x = (torch.rand(1, 3, size, size, device=device) * 2 - 1).to(dtype)

    with torch.inference_mode():
        out = model(pixel_values=x)
        finite = bool(torch.isfinite(out.predicted_depth).all()) and bool(torch.isfinite(out.field_of_view).all())
    del out

    def eager() -> Callable[[], Any]:
        return lambda: model(pixel_values=x)

    def channels_last() -> Callable[[], Any]:
        model.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        return lambda: model(pixel_values=xc)

    def compiled(mode: str | None) -> Callable[[], Callable[[], Any]]:
        def prepare() -> Callable[[], Any]:
            fn = torch.compile(model, mode=mode)
            return lambda: fn(pixel_values=x)

        return prepare

    variants: list[tuple[str, Callable[[], Callable[[], Any]] | None]] = [
        ("eager (what the worker runs)", eager),
        ("torch.compile (default)", compiled(None)),
        ("torch.compile (max-autotune)", compiled("max-autotune") if max_autotune else None),
        # Last: it converts the model's weights in place.
        ("channels_last (eager)", channels_last),
    ]
    results = []
    for name, prepare in variants:
        if prepare is None:
            results.append({"name": name, "error": "skipped with --quick (its compile takes minutes)"})
            continue
        results.append(_measure(name, prepare, runs, device))
        console.print(f"  {name}: {'failed' if 'error' in results[-1] else 'done'}")
    return {"input_size": size, "output_finite": finite, "variants": results}


def run(quick: bool = False) -> dict[str, Any]:
    """Parameter count everywhere; ms/image of each variant where CUDA is available."""
    import torch
    from transformers import DepthProConfig

    from worker.backends.torch_backend import input_size_of

    console.print(machine())
    config = depthpro_config()
    params = count_params(config)
    default_params = count_params(DepthProConfig(use_fov_model=True))["total"]
    size = input_size_of(config)
    rows: list[tuple[Any, ...]] = [
        ("total (3 x ViT-L/16 + decoder + FOV head)", f"{params['total']:,} ({_mparams(params['total'])})")
    ]
    rows += [(f"  {part}", _mparams(count)) for part, count in params.items() if part != "total"]
    rows += [
        ("input (patch_size / smallest scale ratio)", f"1x3x{size}x{size}"),
        ("DepthProConfig() defaults, for comparison", f"{_mparams(default_params)} (ViT-B/14: not the release)"),
    ]
    print_table(
        "DepthPro (apple/DepthPro-hf architecture): parameters, counted on the meta device", ["figure", "value"], rows
    )
    result: dict[str, Any] = {"params": params, "params_default_config": default_params, "input_size": size}

    if not torch.cuda.is_available():
        console.print(f"skipped: {SKIP_REASON}")
        return {"skipped": SKIP_REASON, **result}

    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    console.print(f"GPU: {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    measured = measure(config, device, torch.float16, QUICK_RUNS if quick else RUNS, max_autotune=not quick)
    table = []
    for v in measured["variants"]:
        if "error" in v:
            table.append((v["name"], v["error"], "", "", "", "", ""))
            continue
        med = median(v["times_s"])
        table.append(
            (
                v["name"],
                ms(med),
                ms(p95(v["times_s"])),
                f"{v['first_call_s']:.1f} s",
                f"{v['peak_bytes'] / 2**30:.2f} GiB",
                f"{PAPER_S / med:.1f}x faster" if med <= PAPER_S else f"{med / PAPER_S:.1f}x slower",
                verdict(med <= PAPER_S),
            )
        )
    print_table(
        f"GPU: DepthPro forward, fp16, 1x3x{size}x{size}, random weights, {gpu} "
        f"(paper: {ms(PAPER_S)} on a {PAPER_GPU}); output finite: {measured['output_finite']}",
        ["variant", "median", "p95", "first call", "peak memory", f"vs {ms(PAPER_S)}", "verdict"],
        table,
    )
    return {**result, "gpu": gpu, **measured}
