"""What a video clip is, read on the watcher host: size, rotation, frame rate, length, codec, focal length.

A clip in the hot folder becomes chunk jobs of frames (issue 25). The watcher needs the frame count to
cut the chunks, and needs to know the clip can be decoded at all, so a bad clip is refused once, here,
with a message naming the file and the fix, instead of failing in every chunk on a worker.

It runs where the watcher runs, so it loads nothing heavy: `import av` does not load numpy, and nothing
here turns a frame into an array (`VideoFrame.to_ndarray` is what would). It reads the container's header
and decodes the first frame, and no more of the clip: the first frame proves the codec decodes, and it
is where PyAV 18 shows the display matrix (`VideoFrame.rotation`; a stream can be given one, but has no
reader for it).

The 35 mm focal length is where QuickTime keeps it. FFmpeg reads Apple's metadata keys movie-wide, but
not from a track's own `meta` atom, where an iPhone writes them; so for a QuickTime file that track's
atoms are read here.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from av.container import InputContainer
from av.video.frame import VideoFrame
from av.video.stream import VideoStream

from depthq.clip_jobs import upright_size
from depthq.clips import ffmpeg_reason, rotation, video_stream

CLIP_EXTENSIONS = frozenset({"mp4", "mov", "m4v", "mkv", "webm", "avi"})
# Apple's QuickTime metadata key for the 35 mm equivalent focal length, in millimetres.
FOCAL_35MM_KEY = "com.apple.quicktime.camera.focal_length.35mm_equivalent"

# The most packets read for the first frame. A decoder holds a few back (B-frames, frame threads), and
# a clip cut mid-GOP shows nothing until the next keyframe, about a second away; more than this is a
# clip that will not decode, and reading on would read all of it.
_FIRST_FRAME_PACKETS = 300
# The largest movie index (moov atom) read for the track's focal length: an hour of 4K iPhone video
# indexes in a few MB, so a larger one is not a camera's, and is passed by rather than read.
_MAX_MOOV_BYTES = 64 << 20
# What FFmpeg raises about the file's place rather than its bytes. Its other OSErrors are the bytes':
# Matroska reports a file cut short as EIO.
_FOLDER_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
FIX_EXPORT = "export or copy it again"
_FIX_REMUX = "remux it (ffmpeg -i CLIP -c copy OUT.mp4) and drop that instead"


class ClipError(ValueError):
    """A clip the watcher will not make jobs of: the message names the file, what is wrong, and the fix."""


@dataclass(frozen=True)
class ClipInfo:
    """A clip as the watcher cuts it into chunk jobs and a worker lays its frames out.

    `width` x `height` is the size in pixels as stored, which is what a decoder returns. `rotation` is how
    far to turn a stored frame counter-clockwise, in degrees (0, 90, 180 or 270), for it to stand upright:
    FFmpeg's sense, so `numpy.rot90(frame, rotation // 90)` turns it, and an iPhone held upright records
    270 (ffprobe's "rotation of -90"). `fps` is the average frame rate, exact (30000/1001 for 29.97).
    `frame_count` is the container's own count when `frame_count_exact` (which a file cut short after its
    header overstates: the probe reads no further); otherwise (Matroska and WebM keep none) it is
    `duration_s` x `fps` rounded, which a variable-rate clip can miss by a few frames.
    `codec` is FFmpeg's decoder name ("h264", "hevc"). `focal_length_35mm` is the 35 mm equivalent focal
    length in millimetres from QuickTime metadata, or None."""

    width: int
    height: int
    rotation: int
    fps: Fraction
    frame_count: int
    frame_count_exact: bool
    duration_s: float
    codec: str
    focal_length_35mm: float | None

    @property
    def upright_width(self) -> int:
        """Width in pixels once turned by `rotation`: what the depth map and preview are."""
        return upright_size(self.width, self.height, self.rotation)[0]

    @property
    def upright_height(self) -> int:
        return upright_size(self.width, self.height, self.rotation)[1]


def is_clip(path: Path | str) -> bool:
    """Whether the name is a clip's (its extension in CLIP_EXTENSIONS, in any case)."""
    return Path(path).suffix.lower().lstrip(".") in CLIP_EXTENSIONS


def ffmpeg_refusal(path: Path, doing: str, why: str, exc: av.error.FFmpegError) -> ClipError:
    """The clip's refusal for an error FFmpeg raised while `doing` something with it, naming the file,
    FFmpeg's reason and the fix. An error about the file's place (gone, not readable by this user) is
    raised as it is instead: the folder's state, not the clip's fault."""
    if isinstance(exc, _FOLDER_ERRORS):
        raise exc
    return ClipError(f"{path}: FFmpeg cannot {doing} ({ffmpeg_reason(exc)}): it is {why}; {FIX_EXPORT}")


def probe(path: Path | str) -> ClipInfo:
    """Read `path`'s header and decode its first frame. Raises ClipError for a clip that will not make
    jobs: not a container FFmpeg reads (or cut short), no video stream, no frames, a codec it cannot
    decode. A file that is gone, or not readable by this user, raises its OSError: that is the folder's
    state, not the clip's fault, and the watcher already handles it for photos."""
    path = Path(path)
    try:
        # "replace": a camera's metadata in another encoding is no reason to refuse its clip.
        container = av.open(str(path), metadata_errors="replace")
    except av.error.FFmpegError as exc:
        raise ffmpeg_refusal(path, "read it as a video", "cut short, damaged, or not a video", exc) from None
    with container:
        stream = _video_stream(container, path)
        frame = _first_frame(container, stream, path)
        fps = _fps(stream, path)
        duration = _duration(container, stream)
        if stream.frames > 0:
            frame_count, exact = stream.frames, True
        elif duration is not None and duration > 0:
            frame_count, exact = max(1, round(duration * fps)), False
        else:
            raise ClipError(f"{path}: its length is unknown (no frame count or duration in the file); {_FIX_REMUX}")
        focal = _focal_35mm(container, stream, path)
        return ClipInfo(
            width=frame.width,
            height=frame.height,
            rotation=rotation(frame, stream),
            fps=fps,
            frame_count=frame_count,
            frame_count_exact=exact,
            duration_s=duration if duration is not None and duration > 0 else float(frame_count / fps),
            codec=stream.codec_context.name,
            focal_length_35mm=focal,
        )


def _video_stream(container: InputContainer, path: Path) -> VideoStream:
    """The clip's video (`depthq.clips.video_stream`), or why there is none."""
    stream = video_stream(container)
    if stream is not None:
        return stream
    kinds = sorted({s.type for s in container.streams})
    if not kinds:  # a QuickTime index cut off after its header, before its first track
        raise ClipError(f"{path}: has no streams FFmpeg can read: it is cut short or damaged; {FIX_EXPORT}")
    raise ClipError(
        f"{path}: has no video stream (only {' and '.join(kinds)}): if it is audio, give it an audio extension "
        f"(.m4a) or move it out of the watched folder; if it is a video, it is cut short or damaged, so "
        f"{FIX_EXPORT}"
    )


def _first_frame(container: InputContainer, stream: VideoStream, path: Path) -> VideoFrame:
    """Decode the first frame and stop: proof the clip decodes, without reading the rest of it."""
    if stream.codec_context is None:
        # PyAV names no codec it has no decoder for; a QuickTime index cut short before the track's
        # codec looks the same, hence the second fix.
        raise ClipError(
            f"{path}: its video codec has no decoder in this FFmpeg ({av.ffmpeg_version_info}, PyAV "
            f"{av.__version__}): re-encode it to H.264 or HEVC (ffmpeg -i CLIP -c:v libx264 OUT.mp4), or, "
            f"if it was cut short, {FIX_EXPORT}"
        )
    codec = stream.codec_context.name
    try:
        # demux() ends with an empty packet that flushes what the decoder held back.
        for count, packet in enumerate(container.demux(stream), 1):
            for frame in packet.decode():
                return frame
            if count >= _FIRST_FRAME_PACKETS:
                raise ClipError(
                    f"{path}: no {codec} frame decodes from its first {count} packets: it is damaged; {FIX_EXPORT}"
                )
    except av.error.FFmpegError as exc:
        raise ffmpeg_refusal(path, f"decode its first {codec} frame", "damaged or cut short", exc) from None
    raise ClipError(
        f"{path}: has no video frames (its video stream is empty): the recording stopped before its first "
        f"frame, or the file is cut short; {FIX_EXPORT}"
    )


def _fps(stream: VideoStream, path: Path) -> Fraction:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return Fraction(rate)
    raise ClipError(f"{path}: its frame rate is unknown; {_FIX_REMUX}")


def _duration(container: InputContainer, stream: VideoStream) -> float | None:
    """Seconds: the video stream's own duration, else the container's (Matroska keeps only that)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _focal_35mm(container: InputContainer, stream: VideoStream, path: Path) -> float | None:
    """The video track's own metadata first (an iPhone's), then the movie's or stream's, as FFmpeg reads
    them. Malformed metadata gives None, never an error: it is common, and never worth refusing a clip."""
    focal = None
    if "mov" in container.format.name.split(","):
        focal = _track_number(path, FOCAL_35MM_KEY)
    if focal is None:
        value = container.metadata.get(FOCAL_35MM_KEY, stream.metadata.get(FOCAL_35MM_KEY))
        try:
            focal = float(value) if value is not None else None
        except ValueError:
            focal = None
    return focal if focal is not None and math.isfinite(focal) and focal > 0 else None


# --- QuickTime track metadata ------------------------------------------------------------------------


def _atoms(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of each atom in data[start:end], stopping at a malformed one."""
    while start + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, start)
        header = 8
        if size == 1 and start + 16 <= end:
            size, header = struct.unpack_from(">Q", data, start + 8)[0], 16
        elif size == 0:
            size = end - start
        if size < header or size > end - start:
            return
        yield kind, start + header, start + size
        start += size


def _read_moov(path: Path) -> bytes | None:
    """The movie index (the moov atom's payload), found by walking the top-level atoms: it is read, the
    frames (mdat) are only stepped over, wherever the recorder put them."""
    with path.open("rb") as f:
        total = os.fstat(f.fileno()).st_size
        position = 0
        while position + 8 <= total:
            f.seek(position)
            head = f.read(16)
            if len(head) < 8:
                return None
            size, kind = struct.unpack_from(">I4s", head)
            header = 8
            if size == 1 and len(head) == 16:
                size, header = struct.unpack_from(">Q", head, 8)[0], 16
            elif size == 0:
                size = total - position
            if size < header:
                return None
            if kind == b"moov":
                if size > _MAX_MOOV_BYTES:
                    return None
                f.seek(position + header)
                data = f.read(size - header)
                return data if len(data) == size - header else None
            position += size
    return None


def _track_number(path: Path, key: str) -> float | None:
    """The value of `key` in the first video track's `meta` atom (keys + ilst), as a number, or None."""
    moov = _read_moov(path)
    if moov is None:
        return None
    for kind, start, end in _atoms(moov, 0, len(moov)):
        if kind != b"trak" or _handler(moov, start, end) != b"vide":
            continue
        for inner, meta_start, meta_end in _atoms(moov, start, end):
            if inner == b"meta":
                value = _meta_number(moov, meta_start, meta_end, key)
                if value is not None:
                    return value
    return None


def _handler(moov: bytes, trak_start: int, trak_end: int) -> bytes:
    """A track's handler type (b"vide", b"soun"), from trak/mdia/hdlr."""
    for kind, start, end in _atoms(moov, trak_start, trak_end):
        if kind == b"mdia":
            for inner, s, e in _atoms(moov, start, end):
                if inner == b"hdlr" and e - s >= 12:
                    return moov[s + 8 : s + 12]  # past version, flags and pre_defined
    return b""


def _meta_number(moov: bytes, start: int, end: int, key: str) -> float | None:
    """`key`'s value in a `meta` atom: Apple's `keys` name the items, each `ilst` entry points at one by
    its 1-based index and holds a `data` atom of (type, locale, value)."""
    if moov[start + 4 : start + 8] != b"hdlr":
        start += 4  # the ISO form is a full box (version and flags); Apple's QuickTime form is not
    names: list[bytes] = []
    entries: dict[int, tuple[int, int]] = {}
    for kind, s, e in _atoms(moov, start, end):
        if kind == b"keys" and e - s >= 8:
            names = [moov[ks:ke] for _, ks, ke in _atoms(moov, s + 8, e)]  # atoms typed by namespace (mdta)
        elif kind == b"ilst":
            entries = {int.from_bytes(k, "big"): (es, ee) for k, es, ee in _atoms(moov, s, e)}
    try:
        index = names.index(key.encode()) + 1
    except ValueError:
        return None
    if index not in entries:
        return None
    for kind, s, e in _atoms(moov, *entries[index]):
        if kind == b"data" and e - s >= 8:
            return _number(int.from_bytes(moov[s + 1 : s + 4], "big"), moov[s + 8 : e])
    return None


def _number(value_type: int, value: bytes) -> float | None:
    """A QuickTime metadata value as a number: Apple's well-known types for text, integers and floats."""
    try:
        if value_type == 1:
            return float(value.decode("utf-8"))
        if value_type in (21, 22) and 1 <= len(value) <= 8:
            return float(int.from_bytes(value, "big", signed=value_type == 21))
        if value_type == 23 and len(value) == 4:
            return struct.unpack(">f", value)[0]
        if value_type == 24 and len(value) == 8:
            return struct.unpack(">d", value)[0]
    except (UnicodeDecodeError, ValueError):
        return None
    return None
