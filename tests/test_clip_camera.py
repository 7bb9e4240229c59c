"""worker/clip_camera.py: one focal length per clip, reaching depth through worker/depth.py's metric_depth.

A synthetic canonical inverse depth stands in for the model's output on a static scene: the same map
every frame, with only the model's FOV estimate wobbling, which is what makes per-frame depth flicker.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.clip_camera import (
    MAX_DEPTH_M,
    MIN_DEPTH_M,
    ClipFocal,
    clip_focal_px,
    rescale_depth,
)
from worker.depth import focal_px_from_35mm, focal_px_from_fov, metric_depth
from worker.errors import ModelOutputError

S = 48  # the model's output side
W, H = 160, 90  # a 16:9 frame, upright


def _scene(seed: int = 0) -> np.ndarray:
    """A static scene's canonical inverse depth: a floor receding to the top, a box, a little texture."""
    rows = np.linspace(0.2, 2.5, S, dtype=np.float32)[:, None]
    cid = np.repeat(rows, S, axis=1)
    cid[20:34, 14:30] = 1.8
    return cid + np.random.default_rng(seed).uniform(0.0, 0.05, (S, S)).astype(np.float32)


def _jittering_fovs(n: int = 24, seed: int = 25) -> list[float]:
    """The model's FOV estimate for a 55 degree lens, wobbling by up to 3 degrees frame to frame."""
    return [float(v) for v in np.random.default_rng(seed).uniform(52.0, 58.0, n)]


def _frame_to_frame_change(depths: list[np.ndarray]) -> np.ndarray:
    """|m[i+1] / m[i] - 1| of each frame's median depth: how much a static scene breathes."""
    medians = np.array([float(np.median(d)) for d in depths])
    return np.abs(medians[1:] / medians[:-1] - 1.0)


# --- (a) computed at the clip's f_px == computed at the frame's own, then rescaled ---------------------------


@pytest.mark.parametrize("frame_fov", [52.0, 55.0, 58.5])
def test_depth_at_clip_focal_equals_rescaled_frame_depth(frame_fov: float) -> None:
    cid = _scene()
    clip_f = focal_px_from_fov(55.3, W)
    own = metric_depth(cid, W, H, frame_fov)
    at_clip = metric_depth(cid, W, H, frame_fov, focal_length_px=clip_f)
    rescaled = rescale_depth(own.depth, own.focal_length_px, clip_f)

    assert at_clip.focal_length_source == "clip"
    assert rescaled.dtype == np.float32
    assert rescaled.shape == (H, W)
    np.testing.assert_allclose(rescaled, at_clip.depth, rtol=1e-6)
    # ...and the test can tell: the frame's own depth is off by the focal ratio.
    assert abs(float(np.median(own.depth / at_clip.depth)) - own.focal_length_px / clip_f) < 1e-6


def test_rescale_depth_is_exact_on_the_closed_form() -> None:
    """A constant canonical inverse depth c: depth = f_px / (c * W) at any f_px."""
    c = 0.25
    own = metric_depth(np.full((S, S), c, np.float32), W, H, 60.0)
    clip_f = focal_px_from_fov(50.0, W)
    np.testing.assert_allclose(rescale_depth(own.depth, own.focal_length_px, clip_f), clip_f / (c * W), rtol=1e-6)


def test_rescale_depth_at_the_clamp() -> None:
    """A clamped pixel stands for anything beyond the bound: re-clamped, exact when pushed further out."""
    cid = _scene()
    cid[:4] = 0.0  # sky: inverse depth clamped, depth 10 km
    cid[-4:] = 1e9  # on the lens: depth 0.1 mm
    frame_f = focal_px_from_fov(55.0, W)
    own = metric_depth(cid, W, H, None, focal_length_px=frame_f)
    sky, lens = own.depth[0, 0], own.depth[-1, 0]
    assert sky == pytest.approx(MAX_DEPTH_M, rel=1e-6)
    assert lens == pytest.approx(MIN_DEPTH_M, rel=1e-6)

    for ratio in (1.1, 0.9):
        clip_f = frame_f * ratio
        rescaled = rescale_depth(own.depth, frame_f, clip_f)
        truth = metric_depth(cid, W, H, None, focal_length_px=clip_f).depth
        # The bounds as float32 holds them, as metric_depth's own clamp does.
        assert np.float32(MIN_DEPTH_M) <= rescaled.min() and rescaled.max() <= np.float32(MAX_DEPTH_M)
        # Away from the clamp: exact.
        np.testing.assert_allclose(rescaled[10:-10], truth[10:-10], rtol=1e-6)
        # At it: the bound the rescale pushes further out is exact, the other is off by the ratio.
        far, near = rescaled[0, 0], rescaled[-1, 0]
        if ratio > 1:
            assert far == pytest.approx(truth[0, 0], rel=1e-6)
            assert near == pytest.approx(MIN_DEPTH_M * ratio, rel=1e-6)
            assert truth[-1, 0] == pytest.approx(MIN_DEPTH_M, rel=1e-6)
        else:
            assert near == pytest.approx(truth[-1, 0], rel=1e-6)
            assert far == pytest.approx(MAX_DEPTH_M * ratio, rel=1e-6)
            assert truth[0, 0] == pytest.approx(MAX_DEPTH_M, rel=1e-6)


def test_rescale_depth_leaves_the_callers_map_alone() -> None:
    depth = np.full((H, W), 3.0, np.float32)
    out = rescale_depth(depth, 100.0, 100.0)
    assert out is not depth
    out *= 2
    assert float(depth.max()) == 3.0


# --- (b) one camera: the median FOV, and no flicker --------------------------------------------------------


def test_one_camera_stops_the_flicker_of_per_frame_fov() -> None:
    cid = _scene()
    fovs = _jittering_fovs()
    clip = clip_focal_px(W, H, fovs, None)

    assert clip.source == "median of frames' FOV"
    assert clip.spread is not None
    assert clip.spread.median_deg == pytest.approx(float(np.median(fovs)), rel=1e-12)
    assert clip.f_px == pytest.approx(focal_px_from_fov(float(np.median(fovs)), W), rel=1e-12)
    assert clip.fov_deg == pytest.approx(clip.spread.median_deg, rel=1e-12)
    assert clip.frame_fov_deg == tuple(fovs)
    assert 52.0 <= clip.spread.min_deg < clip.spread.max_deg <= 58.0
    assert 0.0 < clip.spread.iqr_deg < clip.spread.max_deg - clip.spread.min_deg

    per_frame = [metric_depth(cid, W, H, fov) for fov in fovs]
    one_camera = [metric_depth(cid, W, H, fov, focal_length_px=clip.f_px).depth for fov in fovs]
    rescaled = [rescale_depth(md.depth, md.focal_length_px, clip.f_px) for md in per_frame]

    flicker = _frame_to_frame_change([md.depth for md in per_frame])
    steady = _frame_to_frame_change(one_camera)
    steady_rescaled = _frame_to_frame_change(rescaled)
    assert float(steady.max()) < 1e-6
    assert float(steady_rescaled.max()) < 1e-6
    assert float(flicker.mean()) > 1e-2
    # The flicker is the focal lengths' own jitter, frame to frame: depth is proportional to f_px.
    focals = np.array([md.focal_length_px for md in per_frame])
    np.testing.assert_allclose(flicker, np.abs(focals[1:] / focals[:-1] - 1.0), rtol=1e-4, atol=1e-7)


def test_median_is_not_moved_by_one_wild_frame() -> None:
    steady = clip_focal_px(W, H, [55.0] * 9, None)
    wild = clip_focal_px(W, H, [55.0] * 8 + [120.0], None)
    assert wild.f_px == steady.f_px
    assert wild.spread is not None and wild.spread.max_deg == 120.0


# --- (c) the container's 35 mm equivalent wins ------------------------------------------------------------


def test_metadata_wins_over_the_frames_fov() -> None:
    fovs = _jittering_fovs()
    clip = clip_focal_px(W, H, fovs, 26.0)

    assert clip.source == "metadata"
    assert clip.f_px == pytest.approx(26.0 * math.hypot(W, H) / math.hypot(36, 24), rel=1e-12)
    assert clip.f_px == focal_px_from_35mm(26.0, W, H)
    # The same f_px a photo's EXIF gives, through the one metric function.
    photo = metric_depth(_scene(), W, H, 55.0, 26.0)
    assert photo.focal_length_px == clip.f_px
    assert (clip.fov_deg, clip.fov_vertical_deg) == (photo.fov_deg, photo.fov_vertical_deg)
    # The frames' estimates are still kept for the sidecar.
    assert clip.frame_fov_deg == tuple(fovs)
    assert clip.spread is not None and clip.spread.frames == len(fovs)
    assert abs(clip.f_px - focal_px_from_fov(clip.spread.median_deg, W)) > 1.0


@pytest.mark.parametrize("unknown", [None, 0.0, -1.0, float("nan"), float("inf")])
def test_metadata_that_says_nothing_falls_back_to_the_frames(unknown: float | None) -> None:
    clip = clip_focal_px(W, H, [54.0, 55.0, 56.0], unknown)
    assert clip.source == "median of frames' FOV"
    assert clip.f_px == focal_px_from_fov(55.0, W)


def test_metadata_alone_is_enough() -> None:
    clip = clip_focal_px(W, H, [None, None], 26.0)
    assert clip.source == "metadata"
    assert clip.spread is None
    assert clip.frame_fov_deg == (None, None)


# --- (d) no FOV anywhere: per-frame depth is kept -------------------------------------------------------


def test_no_fov_and_no_metadata_has_no_clip_focal() -> None:
    clip = clip_focal_px(W, H, [None, None, None], None)
    assert clip == ClipFocal(
        width=W,
        height=H,
        f_px=None,
        source=None,
        fov_deg=None,
        fov_vertical_deg=None,
        frame_fov_deg=(None, None, None),
        spread=None,
    )
    # A meters-only model's frame has no focal length either: there is nothing to rescale.
    meters = metric_depth(_scene(), W, H, None, already_metric=True)
    assert meters.focal_length_px is None
    with pytest.raises(ValueError, match="keeps its own depth"):
        rescale_depth(meters.depth, meters.focal_length_px, clip.f_px)
    with pytest.raises(ValueError, match="keeps its own depth"):
        rescale_depth(meters.depth, 100.0, clip.f_px)


def test_no_frames_at_all() -> None:
    assert clip_focal_px(W, H, [], None).source is None
    assert clip_focal_px(W, H, [], 26.0).source == "metadata"


@pytest.mark.parametrize("f_px", [0.0, -3.0, float("nan"), float("inf")])
def test_rescale_depth_refuses_a_focal_no_camera_has(f_px: float) -> None:
    depth = np.ones((H, W), np.float32)
    with pytest.raises(ValueError, match="not a focal length"):
        rescale_depth(depth, f_px, 100.0)
    with pytest.raises(ValueError, match="not a focal length"):
        rescale_depth(depth, 100.0, f_px)


# --- (e) frames without a FOV are skipped; a FOV no camera has is the model's fault ---------------------------


def test_frames_without_fov_are_skipped() -> None:
    fovs = [57.0, None, 53.0, None, 55.5]
    clip = clip_focal_px(W, H, fovs, None)
    assert clip.frame_fov_deg == tuple(fovs)
    assert clip.spread is not None
    assert clip.spread.frames == 3
    assert clip.spread.median_deg == 55.5
    assert (clip.spread.min_deg, clip.spread.max_deg) == (53.0, 57.0)
    assert clip.spread.iqr_deg == pytest.approx(56.25 - 54.25, rel=1e-12)
    assert clip.f_px == focal_px_from_fov(55.5, W)


@pytest.mark.parametrize("bad", [0.0, -5.0, 180.0, 200.0, float("nan"), float("inf")])
def test_a_fov_no_camera_has_is_refused(bad: float) -> None:
    with pytest.raises(ModelOutputError, match="frame 1, which no camera has"):
        clip_focal_px(W, H, [55.0, bad, 56.0], None)


# --- (f) portrait and landscape -----------------------------------------------------------------------------


def test_portrait_and_landscape_share_the_35mm_diagonal() -> None:
    landscape = clip_focal_px(1920, 1080, [], 26.0)
    portrait = clip_focal_px(1080, 1920, [], 26.0)
    assert landscape.f_px == pytest.approx(26.0 * math.hypot(1920, 1080) / math.hypot(36, 24), rel=1e-12)
    assert portrait.f_px == landscape.f_px
    # The upright frame decides which FOV is horizontal.
    assert portrait.fov_deg == pytest.approx(landscape.fov_vertical_deg, rel=1e-12)
    assert portrait.fov_vertical_deg == pytest.approx(landscape.fov_deg, rel=1e-12)
    assert portrait.fov_deg < portrait.fov_vertical_deg
    # As metric_depth measures a portrait photo with the same EXIF.
    photo = metric_depth(np.full((S, S), 0.5, np.float32), 108, 192, None, 26.0)
    assert photo.focal_length_px == clip_focal_px(108, 192, [], 26.0).f_px


def test_portrait_fov_is_across_the_upright_width() -> None:
    portrait = clip_focal_px(90, 160, [40.0], None)
    assert portrait.f_px == pytest.approx(0.5 * 90 / math.tan(math.radians(20.0)), rel=1e-12)
    assert portrait.fov_deg == pytest.approx(40.0, rel=1e-12)
