"""What the watcher and the workers must read the same way from a video clip: how its frames stand
upright. The watcher probes a clip's upright size (`producer.clip_probe`), a worker turns each decoded
frame (`worker.clip_frames`); one reading keeps the two in agreement. PyAV only, no numpy: the watcher
imports it."""

from __future__ import annotations

import math

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
