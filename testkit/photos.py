"""Photos made on the spot, for the tests and the benchmarks.

Two kinds, for two needs, so both are kept: `write_jpeg` writes a small JPEG file of noise with the EXIF
a camera would write (orientation, 35 mm focal length), which is all the pipeline's logic looks at;
`synthetic_photo` makes the pixels of a full-size photo, smooth shapes with a little noise, which
compress and resize like a real one, for what is timed or compared at a camera's resolution.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import ExifTags, Image


def write_jpeg(
    path: Path,
    width: int = 64,
    height: int = 48,
    seed: int = 0,
    orientation: int | None = None,
    focal_35mm: int | None = None,
) -> Path:
    """A JPEG of `seed`'s noise at `path` (folders made), with the EXIF given: distinct bytes per seed."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    exif = Image.Exif()
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    if focal_35mm is not None:
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.FocalLengthIn35mmFilm] = focal_35mm
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=90, exif=exif.tobytes())
    return path


def synthetic_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth shapes plus a little sensor noise (RGB, uint8): compresses like a photo, unlike pure noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    noise = rng.integers(-3, 4, smooth.shape, dtype=np.int16)
    return np.clip(smooth.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched (CRC included) to claim width x height: a decompression bomb."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)
