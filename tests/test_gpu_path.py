"""The torch worker's GPU path, run on the CPU: torch tensors on the CPU device stand in for CUDA ones.

The per-pixel math is written once (worker/preprocess.py, worker/depth.py) and runs on numpy or on
torch as its input is; these tests hold the two sides against each other at the released geometry
(1536 input, 12 MP photos). Precision and torch.compile are tested on the released-geometry model with
tiny widths; their speed is bench/gpu.py's business, never a pass/fail here.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from depthq.config import ModelConfig, load_config
from depthq.supervisor import THREAD_ENV, _cores, _worker_env, worker_threads
from testkit.photos import synthetic_photo as photo
from testkit.tiny_model import RELEASED_INPUT_SIZE, build_released_geometry_model
from worker.backends.torch_backend import TorchBackend, pick_dtype
from worker.depth import metric_depth
from worker.errors import ModelOutputError
from worker.preprocess import model_input

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: the CPU tests above run the same code on torch's CPU")
# A 12 MP photo's upright size, and a smaller one whose resizes are cheap on a CPU.
W12, H12 = 4032, 3024
W, H = 1600, 1200


def smooth_cid(size: int = RELEASED_INPUT_SIZE, seed: int = 0) -> np.ndarray:
    """A canonical inverse depth of DepthPro's order (0.02..3), smooth as the model's output is."""
    low = np.random.default_rng(seed).uniform(0.02, 3.0, (8, 8)).astype(np.float32)
    return np.clip(cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC), 0.02, 3.0)


def relative_error(depth: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.abs(depth.astype(np.float64) / reference.astype(np.float64) - 1.0)


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_released_geometry_model(tmp_path_factory.mktemp("released") / "model")


def backend(folder: Path, **settings: Any) -> TorchBackend:
    b = TorchBackend(ModelConfig(path=str(folder), device="cpu", **settings))
    b.load()
    return b


# --- preprocessing: OpenCV on the CPU against F.interpolate on the tensor's device ---------------------------


@pytest.mark.parametrize(
    ("width", "height", "kind"),
    [
        (W12, H12, "photo"),  # 12 MP landscape, down to 1536
        (H12, W12, "noise"),  # portrait; noise is the worst case for any difference in the sample positions
        (900, 700, "photo"),  # smaller than the model's side: upsampled
        (RELEASED_INPUT_SIZE, RELEASED_INPUT_SIZE, "photo"),  # already S x S: no resize on either side
    ],
)
def test_model_input_on_torch_matches_numpy(width: int, height: int, kind: str) -> None:
    rgb = photo(width, height) if kind == "photo" else np.random.default_rng(1).integers(0, 256, (height, width, 3))
    rgb = rgb.astype(np.uint8)
    tensor = torch.from_numpy(rgb.copy())
    on_cpu = model_input(rgb, RELEASED_INPUT_SIZE)
    on_torch = model_input(tensor, RELEASED_INPUT_SIZE)
    assert isinstance(on_torch, torch.Tensor) and on_torch.dtype == torch.float32 and on_torch.is_contiguous()
    assert tuple(on_torch.shape) == on_cpu.shape == (3, RELEASED_INPUT_SIZE, RELEASED_INPUT_SIZE)
    np.testing.assert_array_equal(tensor.numpy(), rgb)  # the uploaded photo is not written
    diff = np.abs(on_torch.numpy() - on_cpu)
    # torch computes each sample's source position in float32, OpenCV in float64: at x ~ 4000 that is
    # ~1e-4 px apart, which only a pixel-to-pixel jump of the full range (noise) makes visible.
    assert diff.max() < (1e-3 if kind == "noise" else 2e-4), diff.max()
    assert diff.mean() < 1e-4, diff.mean()


# --- metric depth: the same function on numpy and on a tensor ------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "fov", "focal_35mm", "already_metric"),
    [
        (W12, H12, 65.0, None, False),  # the model's FOV, 12 MP
        (H12, W12, 65.0, 26.0, False),  # EXIF wins, portrait
        (W12, H12, None, 26.0, True),  # a meters model: resize and clamp only
        (RELEASED_INPUT_SIZE, RELEASED_INPUT_SIZE, 50.0, None, False),  # no resize
        (RELEASED_INPUT_SIZE, RELEASED_INPUT_SIZE, None, None, True),  # neither resize nor scaling
    ],
)
def test_metric_depth_on_torch_matches_numpy(
    width: int, height: int, fov: float | None, focal_35mm: float | None, already_metric: bool
) -> None:
    cid = smooth_cid()
    cid[:40, :40] = 0.0  # ReLU's zeros: the clamp to 10 km must agree too
    tensor = torch.from_numpy(cid.copy())
    on_cpu = metric_depth(cid, width, height, fov, focal_35mm, already_metric=already_metric)
    on_torch = metric_depth(tensor, width, height, fov, focal_35mm, already_metric=already_metric)
    assert isinstance(on_torch.depth, np.ndarray) and on_torch.depth.dtype == np.float32
    assert on_torch.depth.shape == on_cpu.depth.shape == (height, width)
    np.testing.assert_allclose(on_torch.depth, on_cpu.depth, rtol=1e-4)
    assert on_torch.depth.max() == on_cpu.depth.max() == pytest.approx(1e4)
    assert (on_torch.focal_length_px, on_torch.focal_length_source, on_torch.fov_deg, on_torch.fov_vertical_deg) == (
        on_cpu.focal_length_px,
        on_cpu.focal_length_source,
        on_cpu.fov_deg,
        on_cpu.fov_vertical_deg,
    )
    np.testing.assert_array_equal(tensor.numpy(), cid)  # the backend's output is never written


def test_metric_depth_on_torch_refuses_what_numpy_refuses() -> None:
    tensor = torch.from_numpy(smooth_cid(64))
    with pytest.raises(ModelOutputError, match="no camera has"):
        metric_depth(tensor, 80, 60, -3.5)
    with pytest.raises(ValueError, match="no usable focal length"):
        metric_depth(tensor, 80, 60, None)


# --- the backend: device path against CPU path, precision, compile ------------------------------------------


def test_backend_on_device_path_matches_the_numpy_path(released: Path) -> None:
    """`on_device` (CUDA's setting) uploads uint8, prepares and finishes on the device: here the CPU's."""
    b = backend(released)
    assert not b.on_device  # a CPU model keeps OpenCV's faster path
    rgb = photo(W, H, seed=2)
    numpy_pred = b.predict(rgb)
    b.on_device = True
    torch_pred = b.predict(rgb)
    assert isinstance(numpy_pred.inverse_depth, np.ndarray)
    assert isinstance(torch_pred.inverse_depth, torch.Tensor) and torch_pred.inverse_depth.device.type == "cpu"
    assert not torch_pred.inverse_depth.is_inference()  # metric_depth may work on it in place
    assert torch_pred.fov_deg == pytest.approx(numpy_pred.fov_deg, rel=1e-4)
    a = metric_depth(numpy_pred.inverse_depth, W, H, None, 26.0).depth
    b_ = metric_depth(torch_pred.inverse_depth, W, H, None, 26.0).depth
    rel = relative_error(b_, a)
    # Random weights amplify the inputs' 1e-5-level difference (above); still far below any precision's.
    assert np.median(rel) < 1e-4 and np.percentile(rel, 99) < 1e-3, (np.median(rel), np.percentile(rel, 99))


def test_auto_precision_is_float16_on_cuda_and_float32_elsewhere() -> None:
    assert pick_dtype("auto", "cuda") == "float16"
    assert pick_dtype("auto", "cpu") == pick_dtype("auto", "mps") == "float32"
    assert pick_dtype("bfloat16", "cuda") == "bfloat16"


def test_half_precisions_against_float32(released: Path) -> None:
    """The parity the defaults are chosen by: median relative depth error under 0.5 % against float32.

    On the CPU with tiny widths float16 (CUDA's default) is at ~0.08 % and bfloat16 at ~0.7 %: its
    8-bit mantissa, mostly on the input, where half a uint8 level is lost. bench/RESULTS.md has the figures.
    """
    rgb = photo(W, H, seed=3)
    reference = backend(released)
    ref_pred = reference.predict(rgb)
    ref = metric_depth(ref_pred.inverse_depth, W, H, None, 26.0).depth
    errors = {}
    for dtype in ("float16", "bfloat16"):
        b = backend(released, dtype=dtype)
        assert next(b._model.parameters()).dtype == getattr(torch, dtype)
        assert b.model_info["precision"] == dtype and b.attention == "sdpa"
        pred = b.predict(rgb)
        assert pred.inverse_depth.dtype == np.float32  # the map leaves the model as float32 whatever it ran in
        assert pred.fov_deg == pytest.approx(ref_pred.fov_deg, abs=0.05)
        errors[dtype] = float(np.median(relative_error(metric_depth(pred.inverse_depth, W, H, None, 26.0).depth, ref)))
    assert errors["float16"] < 0.005, errors
    assert errors["bfloat16"] < 0.05, errors  # within its own precision, not garbage


def _aot_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile without inductor's C++ codegen (60-80 s for this graph on two cores): dynamo traces
    and AOT autograd functionalises as for inductor. The inductor test below runs the codegen too."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, **{**kw, "backend": "aot_eager"}))


def test_compile_happens_in_load_as_one_graph_and_matches_eager(
    released: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rgb = photo(W, H, seed=4)
    eager = backend(released).predict(rgb)
    _aot_eager(monkeypatch)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with caplog.at_level(logging.INFO, logger="worker.backends.torch_backend"):
        compiled = backend(released, compile="default")
    assert compiled.compile_s is not None and compiled.compile_s > 0
    assert any("compiled the model in" in r.getMessage() for r in caplog.records)
    # The whole model is one graph: a graph break would leave eager gaps (and split any CUDA graph).
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    frames_before = counters["stats"]["calls_captured"]
    pred = compiled.predict(rgb)  # the input's shape never changes: no recompile at the first photo
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["stats"]["calls_captured"] == frames_before
    np.testing.assert_allclose(pred.inverse_depth, eager.inverse_depth, rtol=1e-4, atol=1e-4)
    assert pred.fov_deg == pytest.approx(eager.fov_deg, rel=1e-5)
    torch._dynamo.reset()


@pytest.mark.skipif(
    os.environ.get("DEPTHQ_TEST_INDUCTOR") != "1",
    reason="inductor's C++ codegen of DepthPro takes 60-80 s on two cores; DEPTHQ_TEST_INDUCTOR=1 runs it "
    "(python -m bench gpu compiles with inductor on CUDA)",
)
def test_inductor_compile_matches_eager(released: Path) -> None:
    rgb = photo(W, H, seed=5)
    eager = backend(released).predict(rgb)
    torch._dynamo.reset()
    compiled = backend(released, compile="default")
    pred = compiled.predict(rgb)
    np.testing.assert_allclose(pred.inverse_depth, eager.inverse_depth, rtol=1e-3, atol=1e-3)
    torch._dynamo.reset()


@needs_cuda
def test_cuda_backend_keeps_the_map_on_the_gpu(released: Path) -> None:
    b = TorchBackend(ModelConfig(path=str(released), device="cuda"))
    b.load()
    assert b.on_device and b.model_info["precision"] == "float16"
    rgb = photo(W12, H12, seed=6)
    pred = b.predict(rgb)
    assert pred.inverse_depth.device.type == "cuda"
    on_gpu = metric_depth(pred.inverse_depth, W12, H12, None, 26.0).depth
    on_cpu = metric_depth(pred.inverse_depth.cpu().numpy(), W12, H12, None, 26.0).depth
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-4)


# --- several workers on one host: each gets its share of the cores -------------------------------------------

_PROBE = (
    "import json, os, cv2, torch; "
    "print(json.dumps({'torch': torch.get_num_threads(), 'cv2': cv2.getNumThreads(), "
    f"'env': {{k: os.environ.get(k) for k in {list(THREAD_ENV)!r}}}}}))"
)


def _threads_seen(env: dict[str, str]) -> dict[str, Any]:
    """What a process started with `env` (as depthq up starts its workers) actually runs with."""
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _env_for(workers: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name in THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "config.yaml").write_text(f"up:\n  workers: {workers}\n")
    config = load_config(tmp_path / "config.yaml")
    return _worker_env(dict(os.environ), config, 0)


def test_worker_threads_divide_the_cores() -> None:
    assert [worker_threads(n, 16) for n in (1, 2, 4, 8, 16, 32)] == [16, 8, 4, 2, 1, 1]
    assert worker_threads(3, 2) == 1


@pytest.mark.parametrize("workers", [2, 3])
def test_each_worker_process_runs_its_share_of_threads(
    workers: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _threads_seen(_env_for(workers, tmp_path, monkeypatch))
    share = max(1, _cores() // workers)
    assert seen["torch"] == seen["cv2"] == share, seen


def test_one_worker_and_the_operators_setting_are_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not any(name in _env_for(1, tmp_path, monkeypatch) for name in THREAD_ENV)
    env = _env_for(4, tmp_path, monkeypatch)
    assert env["OMP_NUM_THREADS"] == str(max(1, _cores() // 4))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the operator exported it before depthq up
    env = _worker_env(dict(os.environ), load_config(tmp_path / "config.yaml"), 0)
    assert _threads_seen(env)["torch"] == 2
