"""A clip's preview video, `<clip>.preview.mp4`: its depth maps in the photo preview's colours, as H.264.

One colour scale for the whole clip: each frame scaled between its own nearest and farthest points would
flicker whenever something far walks in or out. The scale comes from each frame's (min, max) depth, which
the chunk jobs already report, so the assembling job never re-reads a map to find it.

Frames are coloured and encoded one at a time as they arrive, so the clip is never held in memory; the
encoder itself keeps only its look-ahead (a few dozen preview-sized frames at most).

The writer writes where it is told, a path or a file object; it renames nothing, since the output store
stages files and renames them itself.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable
from fractions import Fraction
from types import TracebackType
from typing import BinaryIO

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace

from worker.preview import FAR_M, NEAR_M, fit_size, shrink, turbo_bgr

log = logging.getLogger(__name__)

# H.264 plays everywhere, browsers included; FFmpeg's own MPEG-4 Part 2 encoder is always built in, and
# plays in desktop players but not in browsers, so it is only the fallback for a build without libx264.
CODECS = ("libx264", "mpeg4")
# A preview, not a master: x264's default quality (crf 23), and "veryfast" for the worker's CPU, which
# the next chunk's inference needs more than the preview needs a few percent fewer bytes.
_OPTIONS = {
    "libx264": {"crf": "23", "preset": "veryfast"},
    # Constant quantiser 4 (global_quality is in lambda units: FFmpeg's FF_QP2LAMBDA is 118), which looks
    # about like crf 23; mpeg4's default is a fixed 200 kb/s, blocky at the model's 1536 px.
    "mpeg4": {"flags": "+qscale", "global_quality": str(4 * 118)},
}


def clip_depth_range(per_frame_ranges: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """The clip's one colour scale, (nearest, farthest) in meters, from each frame's (min, max) in meters.

    The nearest of the minima and the farthest of the maxima, so no frame leaves the scale; clamped as the
    photo preview is, to no nearer than 0.1 m and no farther than 250 m, so one 0 m pixel or the sky does
    not squash the rest. A NaN bound (a map with no valid depth) is skipped."""
    near, far = math.inf, -math.inf
    for low, high in per_frame_ranges:
        if not math.isnan(low):
            near = min(near, low)
        if not math.isnan(high):
            far = max(far, high)
    if near == math.inf or far == -math.inf:
        raise ValueError("no frame has a depth range: a clip's preview needs at least one frame's min and max")
    return max(near, NEAR_M), min(far, FAR_M)


def preview_size(width: int, height: int, model_side: int) -> tuple[int, int]:
    """(width, height) in pixels of the preview of `width` x `height` maps: the photo preview's size (long
    side at most `model_side`, never enlarged), less one pixel on a side that is odd, since 4:2:0 H.264
    needs even sides. `PreviewWriter` crops that last row or column rather than resampling the frame, so
    the preview keeps the photo preview's scale and an unshrunk map is never blurred."""
    width, height = fit_size(width, height, model_side)
    return width - width % 2, height - height % 2


def pick_codec() -> str:
    """libx264 where this PyAV build has it (PyAV's wheels do), else mpeg4, with a warning."""
    for codec in CODECS:
        if codec in av.codecs_available:
            if codec != CODECS[0]:
                log.warning(
                    "no %s encoder in this PyAV build: clip previews are %s, not played in browsers", CODECS[0], codec
                )
            return codec
    raise RuntimeError(f"this PyAV build has none of the encoders {', '.join(CODECS)} for clip previews")


class PreviewWriter:
    """Writes a clip's preview MP4 one depth map at a time; use it as a context manager, or call `close()`.

    `out` is a path (a temporary one: the caller renames it into place) or a seekable binary file object,
    since MP4 writes its index after the frames. `fps` is the clip's frame rate (frames/s, exact as
    `clip_probe` gives it); `width` x `height` the depth maps' size in pixels; `depth_range` the clip's
    (nearest, farthest) in meters from `clip_depth_range`; `model_side` the model's input side in pixels.

    `every_nth`: the maps added are every n-th frame of the clip. Each then stands for n frames of the
    clip, so the preview plays at fps/n and lasts as long as the clip: frame k's time stamp is k * n / fps.
    """

    def __init__(
        self,
        out: str | os.PathLike[str] | BinaryIO,
        fps: Fraction,
        width: int,
        height: int,
        depth_range: tuple[float, float],
        model_side: int,
        every_nth: int = 1,
        codec: str | None = None,
    ) -> None:
        if every_nth < 1:
            raise ValueError(f"every_nth is {every_nth}: it counts frames, from 1 (every frame)")
        self.width, self.height = preview_size(width, height, model_side)
        if self.width < 2 or self.height < 2:
            raise ValueError(f"a {width}x{height} map is too narrow for a preview at {model_side} px")
        # Public so a test can vary it per frame to show what flicker looks like; nothing else should.
        self.depth_range = depth_range
        self.codec = codec or pick_codec()
        self.frames = 0
        self._shape = (height, width)
        self._model_side = model_side
        self._closed = False
        # The stream's time base is one preview frame (n / fps seconds), so a frame's pts is its index
        # among the frames added.
        rate = Fraction(fps) / every_nth
        # MP4 whatever the staging name's suffix. Without +faststart: moving the index to the front
        # rereads the file, which FFmpeg cannot do through a file object; a browser fetches the index
        # from the end with a range request anyway.
        self._container = av.open(out, "w", format="mp4")
        try:
            self._stream = self._container.add_stream(self.codec, rate=rate, options=_OPTIONS.get(self.codec, {}))
            self._stream.width, self._stream.height, self._stream.pix_fmt = self.width, self.height, "yuv420p"
            # Said in the file, so a player converts back with the matrix the frames were converted with
            # (BT.601, limited range) instead of guessing one from the frame size.
            context = self._stream.codec_context
            context.colorspace, context.color_range = Colorspace.ITU601, ColorRange.MPEG
        except BaseException:
            with contextlib.suppress(av.FFmpegError):
                self._container.close()
            raise

    def add(self, depth_m: np.ndarray) -> None:
        """Colour one depth map (meters, `height` x `width`) with the clip's range and encode it."""
        if depth_m.shape != self._shape:
            raise ValueError(f"a {depth_m.shape[::-1]} map in a preview of {self._shape[::-1]} maps (width, height)")
        depth = shrink(depth_m, self._model_side)[: self.height, : self.width]
        frame = av.VideoFrame.from_ndarray(turbo_bgr(depth, self.depth_range), format="bgr24").reformat(
            format="yuv420p", dst_colorspace=Colorspace.ITU601
        )
        frame.pts = self.frames
        self._container.mux(self._stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder's delayed frames and write the MP4's index; the file is complete after this."""
        if self._closed:
            return
        self._closed = True
        try:
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()

    def __enter__(self) -> PreviewWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            # A failed preview is thrown away by the caller: release the file, flush nothing.
            self._closed = True
            with contextlib.suppress(av.FFmpegError):
                self._container.close()
