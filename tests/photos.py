"""Small test photos written on the spot, with the EXIF a camera would write."""

from __future__ import annotations

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
