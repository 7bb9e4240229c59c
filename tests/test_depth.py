"""worker/depth.py and worker/preprocess.py against apple/ml-depth-pro `DepthPro.infer()`, rebuilt here in torch.

The reference (ml-depth-pro, src/depth_pro/depth_pro.py):

    x = interpolate(x, (S, S), mode="bilinear", align_corners=False)          # x already in [-1, 1]
    canonical_inverse_depth, fov_deg = forward(x)
    f_px = 0.5 * W / tan(0.5 * deg2rad(fov_deg))                               # unless given (EXIF)
    inverse_depth = interpolate(canonical_inverse_depth * (W / f_px), (H, W), "bilinear", align_corners=False)
    depth = 1.0 / clamp(inverse_depth, 1e-4, 1e4)

torch's float32 bilinear rounds its source coordinates in float32, which on big images is off from the exact
value by ~1e-4 pixel; cv2 computes them more precisely. So each comparison runs against torch twice: in
float64 (the exact bilinear, tight tolerance) and in float32 (the reference as it runs, looser tolerance).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from worker.depth import (
    MAX_INVERSE_DEPTH,
    MIN_INVERSE_DEPTH,
    MetricDepth,
    focal_px_from_35mm,
    focal_px_from_fov,
    metric_depth,
)
from worker.errors import ModelOutputError
from worker.preprocess import model_input, resize_bilinear


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def torch_resize(array: np.ndarray, width: int, height: int, dtype: torch.dtype = torch.float64) -> np.ndarray:
    """(h, w) or (h, w, c) -> same layout at (height, width), via F.interpolate(bilinear, align_corners=False)."""
    t = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    out = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0]
    out = out[0] if array.ndim == 2 else out.permute(1, 2, 0)
    return out.numpy()


def torch_model_input(rgb: np.ndarray, size: int, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """The reference's input: ToTensor (/255), Normalize(0.5, 0.5), then the resize to size x size."""
    x = torch.from_numpy(rgb).permute(2, 0, 1).to(dtype) / 255.0
    x = (x - 0.5) / 0.5
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0].numpy()


def torch_metric_depth(
    cid: np.ndarray,
    width: int,
    height: int,
    fov_deg: float | None,
    f_px: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, float]:
    """`infer()` from the canonical inverse depth on: returns (depth (H, W), f_px)."""
    c = torch.from_numpy(cid).to(dtype)[None, None]
    if f_px is None:
        assert fov_deg is not None
        f = 0.5 * width / torch.tan(0.5 * torch.deg2rad(torch.tensor(fov_deg, dtype=dtype)))
    else:
        f = torch.tensor(f_px, dtype=dtype)
    inverse = c * (width / f)
    if (height, width) != tuple(cid.shape):
        inverse = F.interpolate(inverse, size=(height, width), mode="bilinear", align_corners=False)
    depth = 1.0 / torch.clamp(inverse, min=1e-4, max=1e4)
    return depth[0, 0].numpy(), float(f)


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def assert_matches_reference(
    depth: np.ndarray, cid: np.ndarray, width: int, height: int, fov_deg: float | None, f_px: float | None = None
) -> None:
    """`depth` against `infer()` in float64 (tight) and in float32 as the reference runs (looser, see top)."""
    exact, _ = torch_metric_depth(cid, width, height, fov_deg, f_px, torch.float64)
    np.testing.assert_allclose(depth, exact, rtol=5e-6)
    as_run, _ = torch_metric_depth(cid, width, height, fov_deg, f_px, torch.float32)
    np.testing.assert_allclose(depth, as_run, rtol=1e-4)


# --- resize_bilinear -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "width", "height"),
    [
        ((16, 16), 53, 37),  # upscale, non-uniform factors
        ((100, 80), 17, 13),  # downscale, non-integer factors
        ((400, 400), 50, 50),  # downscale by 8
        ((400, 300), 50, 50),  # 8 one way, 6 the other
        ((30, 20), 41, 12),  # height down, width up
        ((64, 64), 128, 128),  # upscale by exactly 2
        ((64, 64), 32, 32),  # downscale by exactly 2 (cv2 takes an INTER_AREA shortcut here)
    ],
)
def test_resize_bilinear_matches_torch(shape: tuple[int, int], width: int, height: int) -> None:
    a = _rng(sum(shape) + width).standard_normal(shape).astype(np.float32)
    out = resize_bilinear(a, width, height)

    assert out.shape == (height, width)
    assert out.dtype == np.float32
    exact = torch_resize(a, width, height, torch.float64)
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5)
    # Against torch's own float32 run: it differs only by its float32 source-coordinate rounding.
    np.testing.assert_allclose(out, torch_resize(a, width, height, torch.float32), rtol=1e-4, atol=1e-4)


def test_resize_bilinear_multichannel_matches_torch() -> None:
    a = _rng(1).random((45, 70, 3), dtype=np.float32)
    out = resize_bilinear(a, 31, 19)
    assert out.shape == (19, 31, 3)
    np.testing.assert_allclose(out, torch_resize(a, 31, 19), rtol=1e-5, atol=1e-6)


def test_resize_bilinear_is_half_pixel_not_align_corners_nor_antialiased() -> None:
    # Half-pixel centres, edge-clamped: [0, 1] -> 4 samples at x = -0.25, 0.25, 0.75, 1.25 -> [0, .25, .75, 1].
    row = np.array([[0.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(resize_bilinear(row, 4, 1), [[0.0, 0.25, 0.75, 1.0]], atol=1e-7)

    # The tolerance above does tell the variants apart: align_corners=True and antialias are far away.
    a = _rng(2).standard_normal((400, 400)).astype(np.float32)
    out = resize_bilinear(a, 50, 50)
    t = torch.from_numpy(a)[None, None]
    corners = F.interpolate(t, size=(50, 50), mode="bilinear", align_corners=True)[0, 0].numpy()
    aa = F.interpolate(t, size=(50, 50), mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()
    assert _max_abs(out, corners) > 0.1
    assert _max_abs(out, aa) > 0.1
    assert _max_abs(out, torch_resize(a, 50, 50)) < 1e-5


def test_resize_bilinear_same_size_is_identity() -> None:
    a = _rng(3).standard_normal((12, 7)).astype(np.float32)
    np.testing.assert_array_equal(resize_bilinear(a, 7, 12), a)


# --- model_input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "size"),
    [
        (150, 230, 64),  # larger than S, landscape
        (210, 97, 64),  # larger than S, portrait
        (20, 33, 64),  # smaller than S
        (48, 80, 64),  # smaller than S, closer to it
        (64, 64, 64),  # already S x S: no resize in the reference either
    ],
)
def test_model_input_matches_reference(height: int, width: int, size: int) -> None:
    rgb = _rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    before = rgb.copy()
    x = model_input(rgb, size)

    assert x.dtype == np.float32
    assert x.shape == (3, size, size)
    assert x.flags.c_contiguous
    np.testing.assert_array_equal(rgb, before)  # input untouched
    ref = torch_model_input(rgb, size)
    diff = _max_abs(x, ref)
    assert diff < 1e-4, diff
    assert _max_abs(x, torch_model_input(rgb, size, torch.float64)) < 1e-5
    assert x.min() >= -1.0 - 1e-6
    assert x.max() <= 1.0 + 1e-6


def test_model_input_channel_order_and_range() -> None:
    rgb = np.zeros((10, 20, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # red: +1
    rgb[..., 1] = 0  # green: -1
    rgb[..., 2] = 51  # blue: 51/255*2-1 = -0.6
    x = model_input(rgb, 8)
    np.testing.assert_allclose(x[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(x[1], -1.0, atol=1e-6)
    np.testing.assert_allclose(x[2], -0.6, atol=1e-6)


# --- metric_depth ----------------------------------------------------------------------------------------------

S = 48


def _cid(seed: int, size: int = S) -> np.ndarray:
    # DepthPro's canonical inverse depth is positive, of order 0.01..10.
    return _rng(seed).uniform(0.02, 3.0, (size, size)).astype(np.float32)


@pytest.mark.parametrize(
    ("width", "height", "fov"),
    [
        (150, 100, 60.0),  # upscale, landscape
        (71, 113, 47.5),  # upscale, portrait, odd sizes
        (40, 30, 75.0),  # downscale
        (S, S, 55.0),  # no resize
    ],
)
def test_metric_depth_matches_reference_from_model_fov(width: int, height: int, fov: float) -> None:
    cid = _cid(width + height)
    md = metric_depth(cid, width, height, fov)
    _, ref_f = torch_metric_depth(cid, width, height, fov)

    assert isinstance(md, MetricDepth)
    assert md.depth.dtype == np.float32
    assert md.depth.shape == (height, width)
    assert md.focal_length_source == "model"
    assert md.focal_length_px == pytest.approx(0.5 * width / math.tan(math.radians(fov) / 2), rel=1e-12)
    assert md.focal_length_px == pytest.approx(ref_f, rel=1e-6)
    assert_matches_reference(md.depth, cid, width, height, fov)


def test_metric_depth_exif_overrides_model_fov() -> None:
    width, height, f35 = 160, 120, 26.0
    cid = _cid(7)
    expected_f = f35 * math.sqrt(width**2 + height**2) / math.sqrt(36**2 + 24**2)

    md = metric_depth(cid, width, height, 60.0, f35)
    assert md.focal_length_source == "exif"
    assert md.focal_length_px == pytest.approx(expected_f, rel=1e-12)
    assert_matches_reference(md.depth, cid, width, height, None, f_px=expected_f)

    # The model's FOV played no part: same result without one, and a different one from the FOV alone.
    no_fov = metric_depth(cid, width, height, None, f35)
    np.testing.assert_array_equal(no_fov.depth, md.depth)
    assert no_fov.focal_length_source == "exif"
    from_fov = metric_depth(cid, width, height, 60.0)
    assert from_fov.focal_length_source == "model"
    assert abs(from_fov.focal_length_px - md.focal_length_px) > 1.0
    assert _max_abs(from_fov.depth, md.depth) > 1e-3


def test_metric_depth_fov_outputs_consistent_with_focal() -> None:
    width, height = 300, 200
    model = metric_depth(_cid(8), width, height, 63.0)
    assert model.fov_deg == pytest.approx(63.0, rel=1e-9)
    assert model.fov_vertical_deg == pytest.approx(
        math.degrees(2 * math.atan(0.5 * height / model.focal_length_px)), rel=1e-12
    )
    # tan(v/2) / tan(h/2) = H / W
    assert math.tan(math.radians(model.fov_vertical_deg) / 2) == pytest.approx(
        math.tan(math.radians(63.0) / 2) * height / width, rel=1e-9
    )

    exif = metric_depth(_cid(8), width, height, 63.0, 50.0)
    f = exif.focal_length_px
    assert exif.fov_deg == pytest.approx(math.degrees(2 * math.atan(0.5 * width / f)), rel=1e-12)
    assert exif.fov_vertical_deg == pytest.approx(math.degrees(2 * math.atan(0.5 * height / f)), rel=1e-12)
    # 50 mm on a 3:2 frame: 36 x 24 mm sensor -> horizontal FOV 2*atan(18/50) = 39.6 degrees.
    assert exif.fov_deg == pytest.approx(math.degrees(2 * math.atan(18 / 50)), rel=1e-9)
    assert exif.fov_vertical_deg == pytest.approx(math.degrees(2 * math.atan(12 / 50)), rel=1e-9)


def test_focal_helpers() -> None:
    assert focal_px_from_fov(90.0, 400) == pytest.approx(200.0, rel=1e-12)
    assert focal_px_from_fov(60.0, 400) == pytest.approx(200.0 * math.sqrt(3), rel=1e-12)
    # 36 x 24 px with a "36 mm" equivalent lens: f_px == 36.
    assert focal_px_from_35mm(36.0, 36, 24) == pytest.approx(36.0, rel=1e-12)
    assert focal_px_from_35mm(26.0, 4032, 3024) == pytest.approx(26.0 * 5040.0 / math.hypot(36, 24), rel=1e-12)


def test_metric_depth_clamps_both_ends() -> None:
    width, height = 70, 50
    zeros = metric_depth(np.zeros((S, S), np.float32), width, height, 60.0)
    np.testing.assert_allclose(zeros.depth, 1.0 / MIN_INVERSE_DEPTH, rtol=1e-6)
    assert MIN_INVERSE_DEPTH == 1e-4
    assert MAX_INVERSE_DEPTH == 1e4

    huge = metric_depth(np.full((S, S), 1e9, np.float32), width, height, 60.0)
    np.testing.assert_allclose(huge.depth, 1.0 / MAX_INVERSE_DEPTH, rtol=1e-6)

    negative = metric_depth(np.full((S, S), -3.0, np.float32), width, height, 60.0)
    np.testing.assert_allclose(negative.depth, 1e4, rtol=1e-6)

    # Mixed: the clamped pixels match the reference too.
    cid = _cid(9)
    cid[:10] = 0.0
    cid[-10:] = 1e8
    md = metric_depth(cid, width, height, 60.0)
    assert_matches_reference(md.depth, cid, width, height, 60.0)
    assert md.depth.max() == pytest.approx(1e4, rel=1e-6)
    assert md.depth.min() == pytest.approx(1e-4, rel=1e-6)
    assert md.depth.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_metric_depth_output_is_float32_for_any_input_dtype(dtype: type[np.floating]) -> None:
    cid = _cid(10).astype(dtype)
    md = metric_depth(cid, 90, 60, 60.0)
    assert md.depth.dtype == np.float32
    assert md.depth.shape == (60, 90)
    assert_matches_reference(md.depth, cid.astype(np.float32), 90, 60, 60.0)


@pytest.mark.parametrize("fov", [None, 0.0, -10.0, 180.0, 200.0, float("nan"), float("inf")])
def test_metric_depth_rejects_missing_or_bad_fov(fov: float | None) -> None:
    """No FOV at all is the photo's lack (no EXIF) with a model that has no FOV head; an absurd FOV is
    the model's output gone wrong, and says so."""
    expected = (ValueError, "no usable focal length") if fov is None else (ModelOutputError, "which no camera has")
    with pytest.raises(expected[0], match=expected[1]):
        metric_depth(_cid(11), 64, 48, fov)
    # No EXIF focal (None, or the 0 some cameras write) changes nothing.
    with pytest.raises(expected[0], match=expected[1]):
        metric_depth(_cid(11), 64, 48, fov, 0.0)
    with pytest.raises(expected[0], match=expected[1]):
        metric_depth(_cid(11), 64, 48, fov, None)


def test_metric_depth_bad_fov_is_fine_with_exif() -> None:
    md = metric_depth(_cid(12), 64, 48, None, 35.0)
    assert md.focal_length_source == "exif"
    assert np.isfinite(md.depth).all()


def test_metric_depth_closed_form_constant_cid() -> None:
    width, height, c = 400, 300, 0.25
    md = metric_depth(np.full((S, S), c, np.float32), width, height, 60.0)
    f_px = 0.5 * width / math.tan(math.radians(30.0))
    expected = f_px / (c * width)  # = 1 / (c * W / f_px): 0.5 / (0.25 * tan 30deg) = 3.4641 m
    assert expected == pytest.approx(2.0 / math.tan(math.radians(30.0)), rel=1e-12)
    assert md.depth.shape == (height, width)
    np.testing.assert_allclose(md.depth, expected, rtol=1e-6)
    assert float(md.depth.max() - md.depth.min()) < 1e-5  # bilinear of a constant stays constant


# --- metric_depth at a focal length the caller knows (a video clip's one camera) -------------------------------


def test_metric_depth_given_focal_wins_over_fov_and_exif() -> None:
    width, height, f_px = 160, 90, 140.0
    cid = _cid(13)
    md = metric_depth(cid, width, height, 55.0, 26.0, focal_length_px=f_px)

    assert md.focal_length_source == "clip"
    assert md.focal_length_px == f_px
    assert md.fov_deg == pytest.approx(math.degrees(2 * math.atan(0.5 * width / f_px)), rel=1e-12)
    assert md.fov_vertical_deg == pytest.approx(math.degrees(2 * math.atan(0.5 * height / f_px)), rel=1e-12)
    assert md.camera is not None and md.camera.fx == f_px
    assert_matches_reference(md.depth, cid, width, height, None, f_px=f_px)
    # Neither the model's FOV nor EXIF played a part: the same depth without them.
    bare = metric_depth(cid, width, height, None, focal_length_px=f_px)
    np.testing.assert_array_equal(bare.depth, md.depth)


def test_metric_depth_given_focal_equal_to_the_fovs_is_the_same_depth() -> None:
    """Handing over the f_px the model's FOV gives changes nothing but the source: no second formula."""
    width, height, fov, c = 120, 200, 60.0, 0.25
    cid = np.full((S, S), c, np.float32)
    from_fov = metric_depth(cid, width, height, fov)
    given = metric_depth(cid, width, height, None, focal_length_px=focal_px_from_fov(fov, width))

    np.testing.assert_array_equal(given.depth, from_fov.depth)
    assert given.focal_length_px == from_fov.focal_length_px
    assert (given.fov_deg, given.fov_vertical_deg) == (from_fov.fov_deg, from_fov.fov_vertical_deg)
    assert (given.focal_length_source, from_fov.focal_length_source) == ("clip", "model")
    # The closed form: depth = f_px / (c * W) = 0.5 / (c * tan(fov / 2)), whatever the orientation.
    np.testing.assert_allclose(given.depth, 0.5 / (c * math.tan(math.radians(fov / 2))), rtol=1e-6)


def test_metric_depth_given_focal_is_reported_not_used_when_already_metric() -> None:
    meters = _rng(14).uniform(0.1, 2.0, (S, S)).astype(np.float32)  # 1/m, from a meters-only export
    md = metric_depth(meters, 64, 48, None, already_metric=True, focal_length_px=80.0)
    plain = metric_depth(meters, 64, 48, None, already_metric=True)
    np.testing.assert_array_equal(md.depth, plain.depth)
    assert (md.focal_length_px, md.focal_length_source) == (80.0, "clip")
    assert (plain.focal_length_px, plain.focal_length_source) == (None, None)


@pytest.mark.parametrize("f_px", [0.0, -5.0, float("nan"), float("inf")])
def test_metric_depth_rejects_a_given_focal_no_camera_has(f_px: float) -> None:
    with pytest.raises(ValueError, match="not a focal length"):
        metric_depth(_cid(15), 64, 48, 60.0, focal_length_px=f_px)
