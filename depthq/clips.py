"""What the watcher and the workers must read the same way from a video clip: which stream is its
video, how its frames are numbered and sought, and how they stand upright. The watcher probes a clip
(`producer.clip_probe`) and cuts its chunks (`producer.clip_slicer`), a worker decodes them
(`worker.clip_frames`); one reading keeps the two in agreement. PyAV only, no numpy: the watcher
imports it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import av
from av.container import InputContainer
from av.stream import Disposition
from av.video.frame import VideoFrame
from av.video.stream import VideoStream


def rotation(frame: VideoFrame, stream: VideoStream) -> int:
    """Counter-clockwise degrees (0, 90, 180, 270) to stand a decoded frame upright, to the nearest
    quarter turn, so that `numpy.rot90(pixels, rotation // 90)` turns it.

    From the display matrix FFmpeg puts on each decoded frame (MP4/MOV's track matrix, Matroska's
    projection); else from a `rotate` tag, clockwise, which older tools wrote. A mirroring in the matrix
    is not reported: no camera records one."""
    try:
        degrees = frame.rotation
    except ValueError:  # a singular matrix has no angle (NaN)
        degrees = 0
    if degrees == 0:
        tag = next((v for k, v in stream.metadata.items() if k.lower() == "rotate"), None)
        try:
            degrees = -float(tag) if tag is not None else 0
        except ValueError:
            degrees = 0
        if not math.isfinite(degrees):
            degrees = 0
    return round(degrees / 90) * 90 % 360


@dataclass(frozen=True)
class FrameClock:
    """How a clip's frames are numbered, the same on the watcher (which cuts chunks) and on a worker
    (which decodes them): index = round((pts - origin) x time_base x fps), the clip's 0-based display
    index on its average frame rate, so a variable-rate gap is an index with no frame of its own."""

    origin: int
    time_base: Fraction
    fps: Fraction

    @classmethod
    def of(cls, stream: VideoStream) -> FrameClock | None:
        """None when the stream gives no frame rate or time base (the caller says how to fix the file)."""
        fps = next((Fraction(r) for r in (stream.average_rate, stream.guessed_rate, stream.base_rate) if r), None)
        if fps is None or stream.time_base is None:
            return None
        return cls(origin=stream.start_time or 0, time_base=Fraction(stream.time_base), fps=fps)

    def seconds(self, pts: int) -> Fraction:
        """A timestamp's time from the clip's first frame, in seconds."""
        return (pts - self.origin) * self.time_base

    def index(self, pts: int) -> int:
        return round(self.seconds(pts) * self.fps)

    def seek_target(self, start: int) -> int:
        """The timestamp to seek to (backward, to a keyframe) for frame `start`: the last one that still
        rounds to it, so frame `start` itself is reached if it is a keyframe, however its time base
        rounded its stamp, and frame `start + 1` never is."""
        ticks_per_frame = 1 / (self.time_base * self.fps)
        return math.ceil(self.origin + (start + Fraction(1, 2)) * ticks_per_frame) - 1


def video_stream(container: InputContainer) -> VideoStream | None:
    """The clip's video: the first video stream that is not a cover picture (one camera per clip)."""
    for stream in container.streams.video:
        if not stream.disposition & Disposition.attached_pic:
            return stream
    return None


def ffmpeg_reason(exc: av.error.FFmpegError) -> str:
    """FFmpeg's own words for an error, for a message that also names the file and the fix."""
    return exc.strerror or type(exc).__name__
