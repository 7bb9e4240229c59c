"""The preview PNG: the turbo colormap of inverse depth, never larger than the model's resolution."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from worker.preview import preview_png


def _decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return np.asarray(img)


def test_a_large_map_is_previewed_at_the_models_side_keeping_its_shape() -> None:
    depth = np.full((300, 400), 5.0, np.float32)
    assert _decoded(preview_png(depth, 128)).shape == (96, 128, 3)
    assert _decoded(preview_png(depth.T.copy(), 128)).shape == (128, 96, 3)
    assert _decoded(preview_png(depth[:60, :80], 128)).shape == (60, 80, 3)  # smaller: as is


def test_near_is_warm_and_far_is_cold_as_turbo_says() -> None:
    depth = np.tile(np.linspace(1.0, 50.0, 256, dtype=np.float32), (16, 1))  # near on the left
    rgb = _decoded(preview_png(depth, 128))
    turbo = cv2.applyColorMap(np.array([[255, 0]], np.uint8), cv2.COLORMAP_TURBO)[0, :, ::-1]
    np.testing.assert_allclose(rgb[4, 0], turbo[0], atol=40)  # nearest: the top of the map (dark red)
    np.testing.assert_allclose(rgb[4, -1], turbo[1], atol=40)  # farthest: its bottom (dark blue)


def test_depth_stats_median_is_exact_on_small_maps_and_close_on_large_ones() -> None:
    from worker.depth import depth_stats

    small = np.arange(1, 8, dtype=np.float32).reshape(1, 7)
    assert depth_stats(small, 128) == {"unit": "m", "min": 1.0, "max": 7.0, "median": 4.0}
    assert depth_stats(small[:, :6], 128)["median"] == 3.5
    # A 12 MP map made like the worker makes it: a model-sized map resized up.
    coarse = np.random.default_rng(0).uniform(0.5, 50.0, (48, 48)).astype(np.float32)
    model = cv2.resize(coarse, (256, 256), interpolation=cv2.INTER_CUBIC)
    full = cv2.resize(model, (4032, 3024), interpolation=cv2.INTER_LINEAR)
    stats = depth_stats(full, 256)
    assert (stats["min"], stats["max"]) == (float(full.min()), float(full.max()))
    assert abs(stats["median"] - float(np.median(full))) / float(np.median(full)) < 1e-3


def test_a_given_range_is_the_same_mapping_as_the_maps_own_within_the_same_clamps() -> None:
    """A clip's preview colours each frame with one range through turbo_bgr: given the map's own nearest
    and farthest points, it is exactly the photo preview's colouring."""
    from worker.preview import turbo_bgr

    depth = np.random.default_rng(0).uniform(0.05, 400.0, (64, 96)).astype(np.float32)
    own = turbo_bgr(depth)
    np.testing.assert_array_equal(turbo_bgr(depth, (float(depth.min()), float(depth.max()))), own)
    np.testing.assert_array_equal(turbo_bgr(depth, (0.0, np.inf)), own)  # clamped to 0.1 m and 250 m as well
