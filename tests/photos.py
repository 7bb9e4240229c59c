"""Small test photos written on the spot, with the EXIF a camera would write."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

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


def jpeg_bytes(tmp: Path, **kwargs: int) -> bytes:
    return write_jpeg(tmp, **kwargs).read_bytes()


def png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched (CRC included) to claim width x height: a decompression bomb."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)
