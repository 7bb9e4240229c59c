"""Decode one chunk job's frames of a video clip on a worker: seek once, decode forward, stop (issue 25).

A clip is cut into chunk jobs of `video.chunk_frames` computed frames, every `video.every_nth` frame of
it, and any worker takes any chunk. So a chunk is decoded on its own, without the rest of the clip:
one seek to the keyframe at or before its first frame, then forward through the decoder, discarding
what comes before that frame, and stopping at the chunk's last. A 4K clip is never held in memory: at
most the frame last decoded, the one just decoded, and the array the caller holds (and, at the clip's
very end, the few frames the decoder gives back at once when it is flushed).

Frames are numbered by the clip's own 0-based display index, the numbering `producer.clip_probe`'s
frame count is in, so every chunk agrees where its frames are whatever it was cut from. The index is
the frame's timestamp on the clip's average frame rate: `round((pts - start_time) * time_base * fps)`.
For a constant-rate clip (every camera's, in practice) that is its place in display order. An index no
frame is stamped with gets the frame on display then, the one before it, as FFmpeg's `fps` filter
does: a variable-rate clip's long-shown frame serves two indices (its `time_s` says which frame it
is), and a briefly shown one may serve none.

The clip ending inside a chunk is not an error: the watcher's frame count is the header's, which a
file cut short after its header overstates, or for Matroska an estimate from the duration that can
miss by a frame, so the last chunk may reach past the end. The frames that exist are real work to
keep, and the missing ones a fact about the clip to record (`ChunkFrames.shortfall`). Only a chunk
with no frame at all fails (`ClipEndedError`): that job can never succeed, so it is a bad input.

The decoder keeps PyAV's default slice threading: frame threading would hold a frame per thread in
flight (12 MB each at 4K), and the depth model, not the decoder, sets a chunk's pace.
"""

from __future__ import annotations

import io
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
from av.container import InputContainer
from av.video.frame import VideoFrame
from av.video.stream import VideoStream

from depthq.clips import FrameClock, ffmpeg_reason, rotation, video_stream
from worker.errors import BadClipError, ClipEndedError

_FIX_EXPORT = "export or copy the clip again"


@dataclass(frozen=True)
class Frame:
    """One decoded frame, upright. `index` is the clip's 0-based display index; `time_s` is when it is
    shown, in seconds from the clip's first frame; `rgb` is uint8, H x W x 3, C-contiguous, in pixels of
    the upright frame (the container's rotation already applied)."""

    index: int
    time_s: float
    rgb: np.ndarray


@dataclass(frozen=True)
class Shortfall:
    """The frames of a chunk the clip did not have: it ended (or could be read no further) after some of
    them. `missing` are the display indices not returned; `last_index` is the clip's last frame that
    was, or None if none of this chunk's frames existed; `message` names the clip and says why."""

    missing: tuple[int, ...]
    last_index: int | None
    message: str


def chunk_frames(
    source: bytes | Path | BinaryIO,
    start: int,
    count: int,
    every_nth: int = 1,
    max_pixels: int | None = None,
    name: str | None = None,
) -> ChunkFrames:
    """The frames start, start + every_nth, ... (`count` of them, so below start + count * every_nth) of
    the clip in `source`, as an iterable of `Frame` (each iteration decodes afresh), best used in a
    `with` block.

    `source` is the clip's bytes (the redis transport; read in place, not copied), its path (the shared
    one), or an open binary file (left open). `max_pixels` refuses a clip larger than that many pixels a frame, as
    worker.max_image_pixels refuses a photo, before any frame is decoded. `name` is how messages call the
    clip (default: the path).

    Nothing is read until iteration starts. Raises `BadClipError` for a clip that cannot be decoded there
    and `ClipEndedError` when none of the chunk's frames exist; a chunk the clip ends inside yields what
    it has and sets `.shortfall`. A read error from the file itself (EIO on a share, a file gone) is
    raised as the OSError it is, for the transport to judge, never as a bad clip.
    """
    if start < 0 or count < 1 or every_nth < 1:
        raise ValueError(f"a chunk needs start >= 0, count >= 1, every_nth >= 1; got {start}, {count}, {every_nth}")
    if name is None:
        name = str(source) if isinstance(source, Path) else getattr(source, "name", None) or "the clip"
    return ChunkFrames(source, start, count, every_nth, max_pixels, str(name))


class ChunkFrames:
    """One chunk's frames: iterate to decode them. Each iteration opens the clip, seeks once and closes
    it when the chunk is done, when the consumer stops early (leaving a `for` loop, or `close()`), or
    on an error, so no file descriptor or decoder outlives its use.

    After an iteration, `decoded` is how many frames the decoder returned (the chunk's own and those
    between the keyframe and its first frame) and `shortfall` is None, or the frames the clip lacked.
    """

    def __init__(
        self, source: bytes | Path | BinaryIO, start: int, count: int, every_nth: int, max_pixels: int | None, name: str
    ):
        self.source = source
        self.start = start
        self.count = count
        self.every_nth = every_nth
        self.max_pixels = max_pixels
        self.name = name
        self.decoded = 0
        self.shortfall: Shortfall | None = None
        self._ended: str | None = None  # why the demuxer or decoder stopped early, for the shortfall's message
        # Weak, so that a consumer leaving its loop drops the generator, which closes the clip at once.
        self._running: weakref.ref[Generator[Frame, None, None]] | None = None

    @property
    def indices(self) -> range:
        """The display indices this chunk covers."""
        return range(self.start, self.start + self.count * self.every_nth, self.every_nth)

    def __iter__(self) -> Iterator[Frame]:
        frames = self._frames()
        self._running = weakref.ref(frames)
        return frames

    def close(self) -> None:
        """Close the clip if an iteration is still open (a consumer that stopped part way)."""
        frames = self._running() if self._running is not None else None
        if frames is not None:
            frames.close()

    def __enter__(self) -> ChunkFrames:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _frames(self) -> Generator[Frame, None, None]:
        self.decoded = 0
        self.shortfall = None
        owned: BinaryIO | None = None
        if isinstance(self.source, Path):
            # Python reads the file, not FFmpeg: an error reading it then reaches us as the OSError it is
            # (EIO on a share, retried), while FFmpeg's own errors are all about the clip's bytes.
            owned = file = self.source.open("rb")
        elif isinstance(self.source, bytes | bytearray | memoryview):
            if not self.source:
                raise BadClipError(f"{self.name}: the clip is empty (0 bytes); {_FIX_EXPORT}")
            file = io.BytesIO(self.source)
        else:
            file = self.source
        try:
            container = self._open(file)
            try:
                yield from self._decode(container)
            finally:
                container.close()
        finally:
            if owned is not None:
                owned.close()

    def _open(self, file: BinaryIO) -> InputContainer:
        try:
            # "replace": a camera's metadata in another encoding is no reason to refuse its clip.
            return av.open(file, metadata_errors="replace")
        except av.error.FFmpegError as exc:
            raise BadClipError(
                f"{self.name}: FFmpeg cannot read it as a video ({ffmpeg_reason(exc)}); {_FIX_EXPORT}"
            ) from None

    def _decode(self, container: InputContainer) -> Iterator[Frame]:
        stream = self._video_stream(container)
        context = stream.codec_context
        if context is None:
            raise BadClipError(f"{self.name}: its video codec has no decoder in this FFmpeg; re-encode it to H.264")
        self._check_pixels(context.width, context.height)
        clock = FrameClock.of(stream)
        if clock is None:
            raise BadClipError(f"{self.name}: its frame rate is unknown; remux it (ffmpeg -i CLIP -c copy OUT.mp4)")

        if self.start > 0:
            try:
                container.seek(clock.seek_target(self.start), backward=True, any_frame=False, stream=stream)
            except av.error.FFmpegError as exc:
                raise BadClipError(
                    f"{self.name}: cannot seek to frame {self.start} ({ffmpeg_reason(exc)}); "
                    "remux it (ffmpeg -i CLIP -c copy OUT.mp4)"
                ) from None

        wanted = iter(self.indices)
        want = next(wanted)
        # The frame last decoded, while it may still be the one on display at `want` (a variable-rate gap).
        held: VideoFrame | None = None
        last_index: int | None = None

        index_of = clock.index

        for frame in self._decoded(container, stream, index_of):
            self.decoded += 1
            if frame.pts is None:
                raise BadClipError(
                    f"{self.name}: frame {want} has no timestamp; remux it (ffmpeg -i CLIP -c copy OUT.mp4)"
                )
            index = index_of(frame.pts)
            last_index = index
            while want is not None and want < index:
                # No frame is stamped `want`: the one on display then is the last before it (or, if the
                # clip's first timestamp is late, this first one).
                yield self._upright(held if held is not None else frame, stream, want, clock)
                want = next(wanted, None)
            held = None
            if want is not None and want == index:
                yield self._upright(frame, stream, want, clock)
                want = next(wanted, None)
            if want is None:
                return
            held = frame
        # The clip ended first. Its last frame serves no index after its own: past it there is no video.
        missing = tuple(i for i in self.indices if i >= want)
        where = f"after frame {last_index}" if last_index is not None else f"before frame {self.start}"
        why = f" ({self._ended})" if self._ended else ""
        frames = f"frames {_span(missing)} do" if len(missing) > 1 else f"frame {missing[0]} does"
        message = (
            f"{self.name}: the video ends {where}{why}, so {frames} not exist (of the chunk of frames "
            f"{_span(tuple(self.indices))}): the clip was cut short, or its header overstates its length; "
            f"{_FIX_EXPORT}"
        )
        if len(missing) == self.count:
            raise ClipEndedError(message)
        self.shortfall = Shortfall(missing=missing, last_index=last_index, message=message)

    def _decoded(
        self, container: InputContainer, stream: VideoStream, index_of: Callable[[int], int]
    ) -> Iterator[VideoFrame]:
        """The decoder's frames, in display order, until the clip ends. A packet the demuxer flags
        corrupt (the last one of a clip cut short) may fail to decode: the clip ends there. Any other
        decoding error is the clip's damage, named by the frame in that packet."""
        self._ended = None
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.FFmpegError as exc:
                self._ended = f"it cannot be read further: {ffmpeg_reason(exc)}"
                return
            try:
                frames = packet.decode()
            except av.error.FFmpegError as exc:
                if packet.is_corrupt:
                    self._ended = f"its last packet is cut short: {ffmpeg_reason(exc)}"
                    continue
                which = f"frame {index_of(packet.pts)}" if packet.pts is not None else "a frame"
                raise BadClipError(
                    f"{self.name}: {which} cannot be decoded ({ffmpeg_reason(exc)}): the clip is damaged "
                    f"there; {_FIX_EXPORT}"
                ) from None
            # One at a time out of the decoder's list, so each is let go once the next is taken.
            frames.reverse()
            while frames:
                frame = frames.pop()
                self._check_pixels(frame.width, frame.height)
                yield frame

    def _video_stream(self, container: InputContainer) -> VideoStream:
        stream = video_stream(container)
        if stream is not None:
            return stream
        raise BadClipError(f"{self.name}: has no video stream; {_FIX_EXPORT}")

    def _check_pixels(self, width: int, height: int) -> None:
        """Refuse a frame too large to decode safely, from the header, before its pixels exist."""
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise BadClipError(
                f"{self.name}: {width}x{height} = {width * height} pixels a frame exceeds "
                f"worker.max_image_pixels ({self.max_pixels}); downscale the clip or raise the limit"
            )

    def _upright(self, frame: VideoFrame, stream: VideoStream, index: int, clock: FrameClock) -> Frame:
        """The frame as RGB pixels, turned upright by its display matrix."""
        rgb = frame.to_ndarray(format="rgb24")
        turns = rotation(frame, stream) // 90
        if turns:
            rgb = np.rot90(rgb, turns)
        return Frame(
            index=index,
            time_s=float(clock.seconds(frame.pts)),
            rgb=np.ascontiguousarray(rgb),
        )


def _span(indices: tuple[int, ...]) -> str:
    if len(indices) == 1:
        return str(indices[0])
    return f"{indices[0]} to {indices[-1]}"
