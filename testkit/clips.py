"""Video clips made on the spot with PyAV, for the tests and the benchmarks (issue 25).

`write_clip` encodes a moving gradient: every frame differs from the others, and the same arguments give
the same pixels, so a test can tell frames apart and find each one again. It marks a clip portrait the
way a phone does, with a display matrix rather than turned pixels, and can carry the 35 mm equivalent
focal length in QuickTime metadata in either of the places it is found: in the video track's own `meta`
atom, where an iPhone writes it (PyAV cannot write that, so it is spliced in here), or movie-wide, where
`ffmpeg -movflags use_metadata_tags` writes it.

The bad clips are each one way a clip is refused: cut short, audio only, no frames, and a codec FFmpeg
has no decoder for. All are made here rather than committed, so none is a stand-in for a real camera's
file: the iPhone layout is built from Apple's QuickTime metadata format, not copied from a phone.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np

# Apple's key, spelled here independently of producer/clip_probe.py so that a test reads back what a
# phone writes, not what the probe expects.
APPLE_FOCAL_35MM_KEY = "com.apple.quicktime.camera.focal_length.35mm_equivalent"
# Apple's QuickTime metadata value type (a "well-known type") for a big-endian float32, as a phone writes it.
_FLOAT32 = 23
# MPEG-5 EVC's sample entry: FFmpeg decodes EVC only through libxevd, which PyAV's wheels do not include.
# tests/test_clip_probe.py checks that this build has no decoder for it.
UNDECODABLE_FOURCC = b"evc1"

Pattern = Literal["gradient", "noise"]


def frame_pixels(width: int, height: int, index: int, pattern: Pattern = "gradient") -> np.ndarray:
    """Frame `index` of a clip (RGB, uint8): what `write_clip` encodes, before the codec's loss.

    The gradient moves on every frame and is distinct for the first 65,536 frames (red comes round again
    every 256 frames, and blue is then 29 further on); noise is seeded by the index and does not compress,
    for timing a decoder at a camera's bitrate."""
    if pattern == "noise":
        return np.random.default_rng(index).integers(0, 256, (height, width, 3), dtype=np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    red = 2 * x + 5 * index
    green = 3 * y + 3 * index
    blue = (x + y) // 2 + 7 * index + 29 * (index // 256)
    return (np.stack([red, green, blue], axis=-1) % 256).astype(np.uint8)


def write_clip(
    path: Path,
    width: int = 64,
    height: int = 48,
    frames: int = 10,
    fps: int | Fraction = 30,
    codec: str = "libx264",
    rotation: int = 0,
    focal_35mm: float | None = None,
    focal_in: Literal["track", "movie"] = "track",
    pattern: Pattern = "gradient",
    gop: int | None = None,
    movflags: str | None = None,
) -> Path:
    """A clip of `frames` frames at `path` (folders made), its container chosen by the extension.

    `rotation` is counter-clockwise degrees, as `ClipInfo.rotation` reads it back: an iPhone held upright
    records landscape pixels with 270 (ffprobe's "rotation of -90"). AVI has nowhere to keep it.
    `focal_35mm` needs a QuickTime file (.mov, .mp4, .m4v): `focal_in="track"` writes it as an iPhone
    does, a float in the video track's metadata; `"movie"` as ffmpeg does, text in the movie's.
    `gop` puts a keyframe every `gop` frames and nowhere else (x264 adds none at a scene cut), so a test
    knows where a seek lands. `movflags` are the MP4/MOV muxer's: "faststart" puts the index first, so a
    copy cut short still opens, and claims frames it no longer has."""
    if focal_35mm is not None and path.suffix.lower() not in (".mov", ".mp4", ".m4v"):
        raise ValueError(f"{path}: only a QuickTime file (.mov, .mp4, .m4v) carries a focal length")
    path.parent.mkdir(parents=True, exist_ok=True)
    movie_focal = focal_35mm is not None and focal_in == "movie"
    flags = [*(["use_metadata_tags"] if movie_focal else []), *([movflags] if movflags else [])]
    options = {"movflags": "+".join(flags)} if flags else {}
    with av.open(str(path), "w", format=_format_for(path), options=options) as container:
        if movie_focal:
            container.metadata[APPLE_FOCAL_35MM_KEY] = f"{focal_35mm:g}"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = _pixel_format(codec)
        if rotation:
            stream.set_display_rotation(rotation)
        if gop is not None:
            stream.codec_context.gop_size = gop
            if codec == "libx264":
                stream.options = {"sc_threshold": "0"}
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_pixels(width, height, index, pattern), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    if focal_35mm is not None and not movie_focal:
        _splice_track_metadata(path, [(APPLE_FOCAL_35MM_KEY, _FLOAT32, struct.pack(">f", focal_35mm))])
    return path


def write_truncated_clip(path: Path, keep: float = 0.5) -> Path:
    """A valid MP4 cut to `keep` of its bytes, as a copy that stopped part way leaves it: FFmpeg writes
    the index (the moov atom) last, so the cut takes all of it, or its end."""
    write_clip(path, codec="mpeg4")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_audio_only_clip(path: Path, seconds: float = 0.5) -> Path:
    """An AAC track of silence and nothing else, under a video extension (a voice memo named .mp4)."""
    rate, samples = 8000, 1024
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=_format_for(path)) as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        for index in range(int(seconds * rate) // samples + 1):
            frame = av.AudioFrame(format="fltp", layout="mono", samples=samples)
            frame.sample_rate, frame.pts = rate, index * samples
            frame.planes[0].update(bytes(4 * samples))
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_zero_frame_clip(path: Path) -> Path:
    """A fragmented MP4 with a video track and no samples, as a recording stopped before its first frame
    leaves it. Fragmented, because a plain MP4 without samples is written with no track at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4", options={"movflags": "frag_keyframe+empty_moov"}) as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    return path


def write_undecodable_clip(path: Path) -> Path:
    """A well-formed QuickTime file whose video track claims MPEG-5 EVC, which FFmpeg reads but cannot
    decode here: a PNG clip with its sample entry's codec renamed, so everything but the codec is valid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mov") as container:
        stream = container.add_stream("png", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb24"
        for index in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame_pixels(64, 48, index), format="rgb24")))
        container.mux(stream.encode(None))
    data = bytearray(path.read_bytes())
    start, _ = _child(data, b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd")
    entry = start + 8  # past the version, flags and entry count: the first sample entry's size, then codec
    assert data[entry + 4 : entry + 8] == b"png ", data[entry : entry + 8]
    data[entry + 4 : entry + 8] = UNDECODABLE_FOURCC
    path.write_bytes(bytes(data))
    return path


def _format_for(path: Path) -> str | None:
    """FFmpeg's muxer for the extension; .m4v as plain MP4 (FFmpeg's own pick for it, "ipod", takes only
    H.264 and AAC)."""
    return "mp4" if path.suffix.lower() == ".m4v" else None


def _pixel_format(codec: str) -> str:
    formats = [f.name for f in av.Codec(codec, "w").video_formats or ()]
    return "yuv420p" if not formats or "yuv420p" in formats else formats[0]


# --- QuickTime atoms ---------------------------------------------------------------------------------


def _atoms(data: bytes | bytearray, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, start, end) of each atom in data[start:end], header included: only 32-bit sizes, which is
    all that FFmpeg writes for a clip this small."""
    while start + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, start)
        assert 8 <= size <= end - start, f"atom {kind!r} at {start} has size {size}"
        yield kind, start, start + size
        start += size


def _child(data: bytes | bytearray, *kinds: bytes) -> tuple[int, int]:
    """The payload (start, end) of the first atom down the path `kinds`, from the top of the file."""
    start, end = 0, len(data)
    for kind in kinds:
        start, end = next((s + 8, e) for k, s, e in _atoms(data, start, end) if k == kind)
    return start, end


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _mdta_meta(items: list[tuple[str, int, bytes]]) -> bytes:
    """A QuickTime `meta` atom of (key, value type, value bytes): an `mdta` handler, the `keys` that name
    the items, and the `ilst` whose entries point at a key by its 1-based index."""
    handler = _box(b"hdlr", bytes(8) + b"mdta" + bytes(12) + b"\0")
    keys = _box(
        b"keys", bytes(4) + struct.pack(">I", len(items)) + b"".join(_box(b"mdta", k.encode()) for k, _, _ in items)
    )
    entries = b"".join(
        _box(struct.pack(">I", index), _box(b"data", struct.pack(">II", kind, 0) + value))
        for index, (_, kind, value) in enumerate(items, 1)
    )
    return _box(b"meta", handler + keys + _box(b"ilst", entries))


def _splice_track_metadata(path: Path, items: list[tuple[str, int, bytes]]) -> None:
    """Append a `meta` atom to the video track, as an iPhone has it. FFmpeg writes the movie's index
    (moov) after the frames (mdat), so growing it moves no frame and no chunk offset needs fixing."""
    data = bytearray(path.read_bytes())
    top = {kind: (start, end) for kind, start, end in _atoms(data, 0, len(data))}
    moov_start, moov_end = top[b"moov"]
    assert top[b"mdat"][0] < moov_start, "the moov atom comes first: splicing into it would move the frames"
    trak_start, trak_end = next(
        (s, e) for k, s, e in _atoms(data, moov_start + 8, moov_end) if k == b"trak" and _handler(data, s, e) == b"vide"
    )
    meta = _mdta_meta(items)
    for start in (moov_start, trak_start):
        struct.pack_into(">I", data, start, struct.unpack_from(">I", data, start)[0] + len(meta))
    path.write_bytes(bytes(data[:trak_end] + meta + data[trak_end:]))


def _handler(data: bytes | bytearray, trak_start: int, trak_end: int) -> bytes:
    """A track's handler type (b"vide", b"soun"), from trak/mdia/hdlr."""
    for kind, start, end in _atoms(data, trak_start + 8, trak_end):
        if kind == b"mdia":
            for inner, s, _ in _atoms(data, start + 8, end):
                if inner == b"hdlr":
                    return bytes(data[s + 16 : s + 20])  # past the header, version, flags, pre_defined
    return b""
