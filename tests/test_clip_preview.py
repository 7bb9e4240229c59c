"""worker.clip_preview: a clip's preview MP4 has every frame, the clip's timing, even sides and one colour scale.

Frames are 96x64 or smaller and clips 12 frames, so the file runs in about a second; every preview is
decoded back with PyAV, as a player would read it.
"""

from __future__ import annotations

import io
import logging
import math
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import pytest

from worker.clip_preview import PreviewWriter, clip_depth_range, pick_codec, preview_size
from worker.preview import turbo_bgr

NTSC = Fraction(30000, 1001)


def _decoded(src: Path | BinaryIO) -> tuple[list[np.ndarray], av.video.stream.VideoStream, float]:
    """Every frame (BGR), the video stream, and the stream's length in seconds."""
    with av.open(src) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="bgr24") for frame in container.decode(stream)]
        return frames, stream, float(stream.duration * stream.time_base)


def _maps(width: int, height: int, count: int) -> list[np.ndarray]:
    """Depth maps in meters: a ramp from 1 m to 20 m that moves a little each frame."""
    x = np.linspace(1.0, 20.0, width, dtype=np.float32)
    return [np.tile(np.roll(x, index), (height, 1)) for index in range(count)]


@pytest.mark.parametrize(
    ("width", "height", "side", "expected"),
    [
        (64, 48, 128, (64, 48)),  # smaller than the model: as is, never enlarged
        (96, 64, 48, (48, 32)),  # shrunk to the model's side, keeping its shape
        (65, 47, 128, (64, 46)),  # odd and unshrunk: the last column and row cropped
        (97, 65, 64, (64, 42)),  # shrunk to 64x43, then the odd side made even
    ],
)
def test_every_frame_at_the_clips_rate_with_even_sides_no_longer_than_the_model(
    width: int, height: int, side: int, expected: tuple[int, int], tmp_path: Path
) -> None:
    assert preview_size(width, height, side) == expected
    out = tmp_path / "a.preview.mp4.tmp"  # a staging name: the container is MP4 whatever the name says
    with PreviewWriter(out, NTSC, width, height, (1.0, 20.0), side) as writer:
        for depth in _maps(width, height, 12):
            writer.add(depth)
    frames, stream, seconds = _decoded(out)
    assert len(frames) == 12 and stream.codec_context.name == "h264"
    assert frames[0].shape == (expected[1], expected[0], 3)
    assert stream.average_rate == NTSC
    assert seconds == pytest.approx(12 / NTSC, abs=1e-3)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # written where told, nothing renamed


def test_a_preview_of_every_nth_frame_plays_at_fps_over_n_and_lasts_as_long_as_the_clip() -> None:
    out = io.BytesIO()  # a file object works as well as a path
    with PreviewWriter(out, NTSC, 64, 48, (1.0, 20.0), 128, every_nth=3) as writer:
        for depth in _maps(64, 48, 10):  # frames 0, 3, ..., 27 of a 30-frame clip
            writer.add(depth)
    out.seek(0)
    frames, stream, seconds = _decoded(out)
    assert len(frames) == 10
    assert stream.average_rate == NTSC / 3
    assert seconds == pytest.approx(30 / NTSC, abs=1e-3)


def test_one_colour_scale_keeps_a_still_region_still_where_per_frame_scales_flicker(tmp_path: Path) -> None:
    """A still scene (1 m on the left, 5 m in the middle) with a far region that comes and goes (6 m or
    200 m): the middle's colour must not move. The same measurement on a preview whose range follows
    each frame, as the photo preview's would, sees it move, so this test would catch flicker."""
    width, height, count = 96, 64, 12
    fars = [6.0 if index % 3 == 1 else 200.0 for index in range(count)]
    maps = []
    for far in fars:
        depth = np.full((height, width), 5.0, np.float32)
        depth[:, :32], depth[:, 64:] = 1.0, far
        maps.append(depth)
    ranges = [(float(d.min()), float(d.max())) for d in maps]
    clip_range = clip_depth_range(ranges)
    assert clip_range == (1.0, 200.0)

    def middle_colours(name: str, per_frame: bool) -> np.ndarray:
        with PreviewWriter(tmp_path / name, Fraction(24), width, height, clip_range, 128) as writer:
            for depth, own in zip(maps, ranges, strict=True):
                if per_frame:
                    writer.depth_range = own
                writer.add(depth)
        frames, _, _ = _decoded(tmp_path / name)
        # The middle block's mean colour, 8 px clear of its edges (chroma is at half resolution).
        return np.array([f[8:-8, 40:56].reshape(-1, 3).mean(axis=0) for f in frames])

    steady = middle_colours("steady.mp4", per_frame=False)
    flicker = middle_colours("flicker.mp4", per_frame=True)
    assert np.abs(steady - steady[0]).max() < 4  # codec noise only
    assert np.abs(flicker - flicker[0]).max() > 40  # the colour a per-frame range gives jumps
    # And it is the photo preview's colour for 5 m on the clip's scale.
    expected = turbo_bgr(np.full((1, 1), 5.0, np.float32), clip_range)[0, 0]
    np.testing.assert_allclose(steady.mean(axis=0), expected, atol=8)


def test_the_clips_range_spans_every_frame_within_the_photo_previews_clamps() -> None:
    assert clip_depth_range(iter([(2.0, 5.0), (1.5, 4.0), (3.0, 9.0)])) == (1.5, 9.0)  # any iterable, once
    assert clip_depth_range([(0.0, 3.0), (0.5, 1000.0)]) == (0.1, 250.0)
    assert clip_depth_range([(0.05, math.inf)]) == (0.1, 250.0)
    assert clip_depth_range([(math.nan, math.nan), (2.0, 3.0)]) == (2.0, 3.0)  # a map with no valid depth
    with pytest.raises(ValueError, match="at least one frame"):
        clip_depth_range([])


def test_without_libx264_the_preview_falls_back_to_mpeg4(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setattr(av, "codecs_available", av.codecs_available - {"libx264"})
    with (
        caplog.at_level(logging.WARNING, "worker.clip_preview"),
        PreviewWriter(tmp_path / "a.mp4", NTSC, 64, 48, (1.0, 20.0), 128) as writer,
    ):
        for depth in _maps(64, 48, 12):
            writer.add(depth)
    assert "no libx264 encoder" in caplog.text
    frames, stream, seconds = _decoded(tmp_path / "a.mp4")
    assert stream.codec_context.name == "mpeg4" and len(frames) == 12
    assert seconds == pytest.approx(12 / NTSC, abs=1e-3)
    monkeypatch.setattr(av, "codecs_available", set())
    with pytest.raises(RuntimeError, match="none of the encoders libx264, mpeg4"):
        pick_codec()


def test_a_map_of_another_size_is_refused(tmp_path: Path) -> None:
    with PreviewWriter(tmp_path / "a.mp4", NTSC, 64, 48, (1.0, 20.0), 128) as writer:
        with pytest.raises(ValueError, match=r"\(48, 64\) map in a preview of \(64, 48\)"):
            writer.add(np.ones((64, 48), np.float32))
        writer.add(np.ones((48, 64), np.float32))
    assert len(_decoded(tmp_path / "a.mp4")[0]) == 1
