"""worker.clip_frames: one chunk job's frames, decoded from one seek, upright, the same as one pass gives.

Every clip is made here by testkit/clips.py at 64x48 and 30 to 60 frames. The reference is the same
decoder run once from the first frame to the last, so frames compare exactly (uint8 for uint8); the
gradient it encodes is deterministic, so a turned frame is also checked against the source pattern.
"""

from __future__ import annotations

import errno
import io
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from testkit.clips import frame_pixels, write_clip
from worker.clip_frames import Frame, chunk_frames
from worker.errors import BadClipError, BadInputError, ClipEndedError

FPS = 30


def one_pass(path: Path) -> list[np.ndarray]:
    """Every frame of the clip as stored (not turned), decoded from first to last in one go."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])]


def chunks(frame_count: int, chunk: int, every_nth: int) -> list[tuple[int, int]]:
    """(start, count) of each chunk job, as issue 25 cuts a clip: `chunk` computed frames apiece."""
    computed = range(0, frame_count, every_nth)
    return [(computed[i], len(computed[i : i + chunk])) for i in range(0, len(computed), chunk)]


def open_fds(path: Path) -> list[str]:
    """This process's file descriptors open on `path`."""
    fds = Path("/proc/self/fd")
    return [fd.name for fd in fds.iterdir() if os.path.realpath(fd) == str(path.resolve())]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A keyframe every 12 frames, and x264's B-frames: chunks start before, on and after keyframes, and
    # the decoder hands frames back in another order than the file keeps them.
    return write_clip(tmp_path_factory.mktemp("clips") / "gop12.mp4", frames=60, gop=12)


@pytest.mark.parametrize("every_nth", [1, 3])
def test_chunks_of_16_give_the_frames_of_one_pass_with_no_gap_or_duplicate(clip: Path, every_nth: int) -> None:
    reference = one_pass(clip)
    got: list[Frame] = []
    for start, count in chunks(60, 16, every_nth):
        with chunk_frames(clip, start, count, every_nth) as frames:
            got.extend(frames)
            assert frames.shortfall is None
    assert [f.index for f in got] == list(range(0, 60, every_nth))
    for frame in got:
        assert frame.time_s == pytest.approx(frame.index / FPS, abs=1e-9)
        assert frame.rgb.dtype == np.uint8 and frame.rgb.shape == (48, 64, 3) and frame.rgb.flags.c_contiguous
        np.testing.assert_array_equal(frame.rgb, reference[frame.index], err_msg=f"frame {frame.index}")


@pytest.mark.parametrize("name", ["gop30.mp4", "gop30.mkv"])
def test_a_chunk_decodes_from_the_keyframe_before_it_and_stops_at_its_last_frame(name: str, tmp_path: Path) -> None:
    path = write_clip(tmp_path / name, frames=60, gop=30)
    middle = chunk_frames(path, 40, 16)
    assert [f.index for f in middle] == list(range(40, 56))
    assert middle.decoded == 56 - 30  # keyframe 30 to frame 55: not the 30 before it, nor the 4 after
    first = chunk_frames(path, 0, 16)
    assert [f.index for f in first] == list(range(16))
    assert first.decoded == 16
    on_keyframe = chunk_frames(path, 30, 2, every_nth=3)
    assert [f.index for f in on_keyframe] == [30, 33]
    assert on_keyframe.decoded == 4


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_a_rotated_clip_gives_upright_frames(rotation: int, tmp_path: Path) -> None:
    path = write_clip(tmp_path / "portrait.mov", frames=30, rotation=rotation)
    stored = one_pass(path)
    frames = list(chunk_frames(path, 16, 14))
    assert [f.index for f in frames] == list(range(16, 30))
    for frame in frames:
        upright = np.rot90(stored[frame.index], rotation // 90)
        np.testing.assert_array_equal(frame.rgb, upright)
        assert frame.rgb.flags.c_contiguous
        # Against the pattern encoded, to know the turn is the right way round, not just the same turn.
        source = np.rot90(frame_pixels(64, 48, frame.index), rotation // 90).astype(int)
        assert np.abs(frame.rgb.astype(int) - source).mean() < 4
    quarter = rotation in (90, 270)
    assert frames[0].rgb.shape == ((64, 48, 3) if quarter else (48, 64, 3))


def test_bytes_a_path_and_an_open_file_give_the_same_frames(clip: Path) -> None:
    from_path = list(chunk_frames(clip, 20, 16, every_nth=2))
    from_bytes = list(chunk_frames(clip.read_bytes(), 20, 16, every_nth=2))
    with clip.open("rb") as f:
        from_file = list(chunk_frames(f, 20, 16, every_nth=2))
        assert not f.closed  # the caller's file stays the caller's
    assert [f.index for f in from_path] == list(range(20, 52, 2))
    for a, b, c in zip(from_path, from_bytes, from_file, strict=True):
        assert a.index == b.index == c.index and a.time_s == b.time_s == c.time_s
        np.testing.assert_array_equal(a.rgb, b.rgb)
        np.testing.assert_array_equal(a.rgb, c.rgb)


def test_a_chunk_past_the_end_is_a_bad_clip_naming_the_file_and_where_it_ends(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "short.mp4", frames=30)
    with pytest.raises(ClipEndedError, match=r"short\.mp4: the video ends after frame 29.*frames 32 to 47") as err:
        list(chunk_frames(path, 32, 16))
    assert isinstance(err.value, BadInputError)  # recorded once, never retried
    with pytest.raises(ClipEndedError, match=r"clip\.mp4: .* frames 30 to 45 do not exist"):
        list(chunk_frames(path.read_bytes(), 30, 16, name="clip.mp4"))


def test_a_chunk_the_clip_ends_inside_keeps_its_frames_and_reports_the_rest(tmp_path: Path) -> None:
    # The last chunk when the frame count was overstated (Matroska's is estimated from its duration).
    path = write_clip(tmp_path / "short.mkv", frames=30)
    frames = chunk_frames(path, 16, 16)
    assert [f.index for f in frames] == list(range(16, 30))
    assert frames.shortfall is not None
    assert frames.shortfall.missing == (30, 31)
    assert frames.shortfall.last_index == 29
    assert "short.mkv: the video ends after frame 29" in frames.shortfall.message


def test_a_clip_cut_short_gives_the_frames_before_the_cut_and_refuses_a_chunk_after_it(tmp_path: Path) -> None:
    # "faststart" puts the index first, so the cut copy still opens and claims all 60 frames.
    whole = write_clip(tmp_path / "whole.mp4", frames=60, gop=30, movflags="faststart")
    reference = one_pass(whole)
    cut = tmp_path / "cut.mp4"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])
    frames = chunk_frames(cut, 16, 16)
    got = list(frames)
    assert frames.shortfall is not None
    last = frames.shortfall.last_index
    assert last is not None and 16 <= last < 31
    assert [f.index for f in got] == list(range(16, last + 1))
    assert frames.shortfall.missing == tuple(range(last + 1, 32))
    assert "cut short" in frames.shortfall.message
    for frame in got:
        np.testing.assert_array_equal(frame.rgb, reference[frame.index])
    with pytest.raises(ClipEndedError, match=r"cut\.mp4: the video ends"):
        list(chunk_frames(cut, 48, 12))


def test_a_damaged_frame_mid_chunk_is_a_bad_clip_naming_that_frame(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "damaged.mp4", frames=60, gop=30)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frame_ticks = int(1 / (stream.time_base * FPS))
        packet = next(p for p in container.demux(stream) if p.pts == 40 * frame_ticks)
        position, size = packet.pos, packet.size
    data = bytearray(path.read_bytes())
    data[position : position + size] = bytes(size)
    path.write_bytes(bytes(data))
    got: list[int] = []
    with pytest.raises(BadClipError, match=r"damaged\.mp4: frame 40 cannot be decoded"):
        for frame in chunk_frames(path, 32, 16):
            got.append(frame.index)
    assert got[:1] == [32] and got == list(range(32, 32 + len(got))) and len(got) < 16


def test_a_clip_over_the_pixel_limit_is_refused_before_decoding(clip: Path) -> None:
    frames = chunk_frames(clip, 0, 16, max_pixels=64 * 48 - 1)
    with pytest.raises(BadClipError, match=r"gop12\.mp4: 64x48 = 3072 pixels a frame exceeds worker.max_image_pixels"):
        next(iter(frames))
    assert frames.decoded == 0
    assert len(list(chunk_frames(clip, 0, 16, max_pixels=64 * 48))) == 16


@pytest.mark.parametrize(
    ("data", "reason"), [(b"", "the clip is empty"), (b"not a video at all" * 100, "FFmpeg cannot read it")]
)
def test_bytes_that_are_no_video_are_a_bad_clip(data: bytes, reason: str) -> None:
    with pytest.raises(BadClipError, match=f"upload.mp4: {reason}"):
        list(chunk_frames(data, 0, 16, name="upload.mp4"))


class FailingShare(io.RawIOBase):
    """A clip on a share that fails part way: reads past `fail_at` bytes raise EIO."""

    def __init__(self, data: bytes, fail_at: int):
        self.data, self.fail_at, self.position = data, fail_at, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: len(self.data)}[whence] + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.position >= self.fail_at:
            raise OSError(errno.EIO, "Input/output error")
        chunk = self.data[self.position : min(self.position + len(buffer), self.fail_at)]
        buffer[: len(chunk)] = chunk
        self.position += len(chunk)
        return len(chunk)


def test_a_read_error_of_the_share_stays_an_oserror_to_be_retried(tmp_path: Path) -> None:
    data = write_clip(tmp_path / "noise.mp4", frames=30, pattern="noise", width=128, height=96).read_bytes()
    for fail_at in (0, len(data) // 3):
        with pytest.raises(OSError) as err:
            list(chunk_frames(FailingShare(data, fail_at), 0, 30, name="noise.mp4"))
        assert err.value.errno == errno.EIO and not isinstance(err.value, BadInputError)
    with pytest.raises(FileNotFoundError):
        list(chunk_frames(tmp_path / "gone.mp4", 0, 16))


def test_the_clip_is_closed_when_the_consumer_stops_early(clip: Path) -> None:
    for _ in chunk_frames(clip, 0, 16):
        assert open_fds(clip)  # open while decoding
        break
    assert open_fds(clip) == []
    with chunk_frames(clip, 16, 16) as frames:
        running = iter(frames)
        next(running)
        assert open_fds(clip)
    assert open_fds(clip) == []  # closed by the with block, though `running` is still referenced
    list(chunk_frames(clip, 32, 16))
    assert open_fds(clip) == []


def test_an_index_no_frame_is_stamped_with_gets_the_frame_on_display_then(tmp_path: Path) -> None:
    # A variable-rate clip: frame 3's time has no frame, as when a phone drops its rate in low light.
    path = tmp_path / "variable.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for stamp in (0, 1, 2, 4, 5, 6):
            frame = av.VideoFrame.from_ndarray(frame_pixels(64, 48, stamp), format="rgb24")
            frame.pts, frame.time_base = stamp, Fraction(1, FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    frames = list(chunk_frames(path, 1, 5))
    assert [f.index for f in frames] == [1, 2, 3, 4, 5]
    assert [round(f.time_s * FPS) for f in frames] == [1, 2, 2, 4, 5]  # index 3 is frame 2, still shown
    np.testing.assert_array_equal(frames[2].rgb, frames[1].rgb)
