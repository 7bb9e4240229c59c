"""producer.clip_slicer: a chunk's compressed packets, cut out on the watcher host, decode on a worker to
exactly the frames the whole clip gives.

Clips are made by testkit/clips.py at 64x48, 90 frames, a keyframe every 30 (x264 with B-frames, so
frames are decoded out of display order). The reference is `worker.clip_frames` run on the whole clip;
the slice is decoded by the same function, renumbered by the slice's header, and must match it frame for
frame: the same indices, the same times, the same pixels (uint8 for uint8).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from producer.clip_probe import ClipError
from producer.clip_slicer import SlicedChunk, slice_chunk
from testkit.clips import frame_pixels, write_clip, write_truncated_clip
from worker.clip_frames import chunk_frames

FRAMES = 90
GOP = 30
# (start, count, every_nth): the first chunk, one across the keyframe at 30, one the clip ends inside,
# and the same with every third frame.
CHUNKS = [(0, 16, 1), (24, 16, 1), (80, 16, 1), (0, 8, 3), (20, 16, 3), (70, 8, 3)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {
        name: write_clip(folder / name, frames=FRAMES, gop=GOP, rotation=270 if name.endswith(".mov") else 0)
        for name in ("bframes.mp4", "bframes.mkv", "portrait.mov")
    }


Decoded = list[tuple[int, float, np.ndarray]]


def from_clip(path: Path, start: int, count: int, every_nth: int) -> Decoded:
    return [(f.index, f.time_s, f.rgb) for f in chunk_frames(path, start, count, every_nth)]


def from_slice(chunk: SlicedChunk, start: int, count: int, every_nth: int) -> Decoded:
    """The slice decoded as a worker will: its own numbering, moved to the clip's by the header."""
    frames = chunk_frames(chunk.data, start - chunk.first_index, count, every_nth)
    return [(chunk.first_index + f.index, chunk.first_time_s + f.time_s, f.rgb) for f in frames]


@pytest.mark.parametrize("name", ["bframes.mp4", "bframes.mkv", "portrait.mov"])
@pytest.mark.parametrize(("start", "count", "every_nth"), CHUNKS)
def test_a_slice_decodes_to_the_clips_own_frames(
    clips: dict[str, Path], name: str, start: int, count: int, every_nth: int
) -> None:
    chunk = slice_chunk(clips[name], start, count, every_nth)
    expected = from_clip(clips[name], start, count, every_nth)
    got = from_slice(chunk, start, count, every_nth)
    assert [i for i, _, _ in got] == [i for i, _, _ in expected]
    # The header's time is a float added to the slice's: equal to the clip's up to float rounding.
    assert [t for _, t, _ in got] == pytest.approx([t for _, t, _ in expected], abs=1e-9)
    for (index, _, rgb), (_, _, want) in zip(got, expected, strict=True):
        assert rgb.shape == want.shape and np.array_equal(rgb, want), f"frame {index} differs"


@pytest.mark.parametrize(("start", "count", "every_nth"), CHUNKS)
def test_a_slice_carries_packets_not_pixels(clips: dict[str, Path], start: int, count: int, every_nth: int) -> None:
    clip = clips["bframes.mp4"]
    chunk = slice_chunk(clip, start, count, every_nth)
    assert chunk.first_index % GOP == 0  # it starts at a keyframe
    assert chunk.first_index <= start
    assert chunk.packet_bytes <= clip.stat().st_size
    # One decoded 64x48 frame is 9 KB of RGB; the whole slice is its packets and a container around them.
    assert len(chunk.data) < 2 * chunk.packet_bytes + 4096


def test_a_slice_stops_before_the_gop_past_the_chunk(clips: dict[str, Path]) -> None:
    # Frames 0 to 15 need the packets of the first GOP up to frame 15's references, not the next GOP,
    # nor the rest of this one.
    chunk = slice_chunk(clips["bframes.mp4"], 0, 16)
    whole_gop = slice_chunk(clips["bframes.mp4"], 0, GOP)
    assert chunk.first_index == whole_gop.first_index == 0
    assert 16 <= chunk.packets < GOP <= whole_gop.packets < 2 * GOP


def test_a_rotated_clips_slice_decodes_upright(clips: dict[str, Path]) -> None:
    chunk = slice_chunk(clips["portrait.mov"], 30, 4)
    frames = from_slice(chunk, 30, 4, 1)
    assert [rgb.shape for _, _, rgb in frames] == [(64, 48, 3)] * 4  # 64x48 stored, turned a quarter


def test_a_clip_whose_packets_cannot_be_read_is_refused_by_name(tmp_path: Path) -> None:
    cut = write_truncated_clip(tmp_path / "cut.mp4")
    with pytest.raises(ClipError, match=r"cut\.mp4: .*export or copy it again"):
        slice_chunk(cut, 0, 16)
    garbage = tmp_path / "garbage.mkv"
    garbage.write_bytes(b"not a video" * 100)
    with pytest.raises(ClipError, match=r"garbage\.mkv: FFmpeg cannot read its packets"):
        slice_chunk(garbage, 0, 16)


def test_a_variable_rate_clip_the_slice_would_misnumber_is_refused(tmp_path: Path) -> None:
    # 30 fps, then 15: a slice reads its own rate from its own frames, so its numbering would drift from
    # the clip's; the slicer refuses rather than send frames under the wrong index.
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 600)
        pts = 0
        for index in range(60):
            frame = av.VideoFrame.from_ndarray(frame_pixels(64, 48, index), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 600)
            pts += 20 if index < 30 else 40
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(ClipError, match=r"vfr\.mp4: a slice of it would misnumber frame .*constant frame rate"):
        slice_chunk(path, 40, 8)


def test_a_missing_clip_stays_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        slice_chunk(tmp_path / "gone.mp4", 0, 16)


def test_a_chunk_needs_frames() -> None:
    with pytest.raises(ValueError, match="count >= 1"):
        slice_chunk("any.mp4", 0, 0)
