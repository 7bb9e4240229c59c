"""producer.clip_probe: what a clip is (size, rotation, rate, frame count, focal length), and clear refusals.

Every clip is made here by testkit/clips.py at 64x48 and 10 frames, so the file runs in about a second.
That the probe loads no numpy is checked in tests/test_layout.py, with the watcher's other promises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest
from av.codec.codec import UnknownCodecError

from producer import clip_probe
from producer.clip_probe import ClipError, ClipInfo, is_clip, probe
from testkit.clips import (
    write_audio_only_clip,
    write_clip,
    write_truncated_clip,
    write_undecodable_clip,
    write_zero_frame_clip,
)


@pytest.mark.parametrize(
    ("name", "codec", "decoder"),
    [
        ("a.mp4", "libx264", "h264"),
        ("a.mov", "libx264", "h264"),
        ("a.m4v", "mpeg4", "mpeg4"),
        ("a.avi", "mpeg4", "mpeg4"),
        ("A.MP4", "mpeg4", "mpeg4"),
    ],
)
def test_size_rate_and_the_containers_own_frame_count(name: str, codec: str, decoder: str, tmp_path: Path) -> None:
    info = probe(write_clip(tmp_path / name, width=64, height=48, frames=10, codec=codec))
    assert (info.width, info.height, info.rotation) == (64, 48, 0)
    assert (info.upright_width, info.upright_height) == (64, 48)
    assert info.fps == 30 and isinstance(info.fps, Fraction)
    assert (info.frame_count, info.frame_count_exact) == (10, True)
    assert info.duration_s == pytest.approx(10 / 30, abs=0.002)
    assert info.codec == decoder
    assert info.focal_length_35mm is None


@pytest.mark.parametrize(("name", "codec"), [("a.mkv", "libx264"), ("a.webm", "libvpx-vp9")])
def test_matroska_keeps_no_frame_count_so_it_is_estimated_from_the_duration(
    name: str, codec: str, tmp_path: Path
) -> None:
    info = probe(write_clip(tmp_path / name, frames=10, codec=codec))
    assert (info.frame_count, info.frame_count_exact) == (10, False)
    assert info.duration_s == pytest.approx(10 / 30, abs=0.002)


def test_an_ntsc_rate_is_exact(tmp_path: Path) -> None:
    info = probe(write_clip(tmp_path / "ntsc.mp4", frames=10, fps=Fraction(30000, 1001)))
    assert info.fps == Fraction(30000, 1001)
    assert info.frame_count == 10
    assert info.duration_s == pytest.approx(10 * 1001 / 30000, abs=0.002)


@pytest.mark.parametrize(("name", "rotation"), [("r.mov", 90), ("r.mp4", 180), ("r.mov", 270), ("r.mkv", 90)])
def test_rotation_from_the_display_matrix_and_the_upright_size(name: str, rotation: int, tmp_path: Path) -> None:
    info = probe(write_clip(tmp_path / name, width=64, height=48, rotation=rotation))
    assert info.rotation == rotation
    assert (info.width, info.height) == (64, 48)  # as stored: the pixels are not turned
    quarter = rotation in (90, 270)
    assert (info.upright_width, info.upright_height) == ((48, 64) if quarter else (64, 48))


@pytest.mark.parametrize("focal_in", ["track", "movie"])
def test_focal_length_from_quicktime_metadata_in_the_track_or_the_movie(focal_in: str, tmp_path: Path) -> None:
    # "track" is an iPhone's layout (a float in the video track's meta atom, which FFmpeg does not
    # read); "movie" is ffmpeg's (text in the movie's metadata, which PyAV shows).
    info = probe(write_clip(tmp_path / "f.mov", focal_35mm=24.5, focal_in=focal_in))  # type: ignore[arg-type]
    assert info.focal_length_35mm == 24.5


def test_an_iphone_portrait_clip(tmp_path: Path) -> None:
    info = probe(write_clip(tmp_path / "IMG_0001.MOV", width=64, height=48, rotation=270, focal_35mm=26))
    assert (info.rotation, info.upright_width, info.upright_height) == (270, 48, 64)
    assert info.focal_length_35mm == 26.0


def test_a_focal_length_that_is_not_positive_is_none(tmp_path: Path) -> None:
    assert probe(write_clip(tmp_path / "z.mov", focal_35mm=0.0)).focal_length_35mm is None


def test_clip_extensions_in_any_case() -> None:
    assert all(is_clip(f"clip.{ext}") for ext in ("mp4", "MOV", "m4v", "Mkv", "webm", "AVI"))
    assert not any(is_clip(name) for name in ("photo.jpg", "clip.mp4.part", "mp4", "clip.m4a"))


# --- refusals ------------------------------------------------------------------------------------------


def _not_a_video(path: Path) -> Path:
    path.write_bytes(b"not a video\n" * 100)
    return path


def _cut(keep: float) -> Callable[[Path], Path]:
    return lambda path: write_truncated_clip(path, keep=keep)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        # Cut before the index, inside its header, and inside its track: each is reported as cut short.
        (_cut(0.02), ["cannot read it as a video", "cut short", "copy it again"]),
        (_cut(0.3), ["cannot read it as a video", "cut short", "copy it again"]),
        (_cut(0.5), ["cut short", "copy it again"]),
        (_cut(0.8), ["cut short", "copy it again"]),
        (_not_a_video, ["cannot read it as a video", "not a video"]),
        (write_audio_only_clip, ["no video stream (only audio)", ".m4a", "out of the watched folder"]),
        (write_zero_frame_clip, ["no video frames", "export or copy it again"]),
        (write_undecodable_clip, ["no decoder", "re-encode it to H.264 or HEVC"]),
    ],
    ids=["cut-2%", "cut-30%", "cut-50%", "cut-80%", "not-a-video", "audio-only", "zero-frames", "undecodable"],
)
def test_a_bad_clip_is_refused_with_a_message_naming_the_file_and_the_fix(
    make: Callable[[Path], Path], says: list[str], tmp_path: Path
) -> None:
    clip = make(tmp_path / "bad clip.mp4")
    with pytest.raises(ClipError) as raised:
        probe(clip)
    message = str(raised.value)
    assert message.startswith(f"{clip}: "), message
    for words in says:
        assert words in message
    assert isinstance(raised.value, ValueError)  # an expected failure: not worth a retry


def test_the_undecodable_clips_codec_has_no_decoder_in_this_ffmpeg() -> None:
    # What write_undecodable_clip relies on: were PyAV's FFmpeg ever built with an EVC decoder, that clip
    # would decode, and the refusal above would fail; this says why.
    with pytest.raises(UnknownCodecError):
        av.Codec("evc", "r")


def test_a_missing_file_is_an_oserror_not_a_bad_clip(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        probe(tmp_path / "gone.mp4")


# --- how much is read ----------------------------------------------------------------------------------


class _CountingContainer:
    """An input container that counts the packets the probe takes from it."""

    def __init__(self, container: Any) -> None:
        self._container = container
        self.packets = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._container, name)

    def __enter__(self) -> _CountingContainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._container.close()

    def demux(self, *streams: Any) -> Iterator[Any]:
        for packet in self._container.demux(*streams):
            self.packets += 1
            yield packet


def test_probing_decodes_the_first_frame_and_reads_no_further(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clip = write_clip(tmp_path / "long.mp4", frames=150)
    opened: list[_CountingContainer] = []
    real_open = av.open

    def counting_open(*args: Any, **kwargs: Any) -> _CountingContainer:
        opened.append(_CountingContainer(real_open(*args, **kwargs)))
        return opened[0]

    monkeypatch.setattr(clip_probe.av, "open", counting_open)
    info = probe(clip)
    assert isinstance(info, ClipInfo) and info.frame_count == 150
    # x264 holds back a few frames (B-frames, lookahead), so the first one takes a few packets, not 150.
    assert 1 <= opened[0].packets <= 10, opened[0].packets
