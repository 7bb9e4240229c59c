"""Decode a photo the way a person sees it: upright RGB, plus the EXIF focal length if the camera wrote one."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import pillow_heif
import simplejpeg
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from worker.errors import BadInputError

pillow_heif.register_heif_opener()

_SIXTEEN_BIT_GREY = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class LoadedImage:
    """`rgb` is uint8, upright. `width` x `height` is the photo's upright size, which `rgb` has too
    unless it was decoded reduced (`load_image`'s `min_side`). `focal_length_35mm` is 35 mm equivalent."""

    rgb: np.ndarray
    focal_length_35mm: float | None
    width: int
    height: int


def _focal_35mm(img: Image.Image) -> float | None:
    try:
        exif_ifd = img.getexif().get_ifd(ExifTags.IFD.Exif)
        value = exif_ifd.get(ExifTags.Base.FocalLengthIn35mmFilm)
    except Exception:  # malformed EXIF is common and never worth failing a photo over
        return None
    try:
        focal = float(value)
    except (TypeError, ValueError):
        return None
    return focal if focal > 0 else None


def _orientation(img: Image.Image) -> int:
    """EXIF orientation 1 to 8; 1 (as stored) when absent or malformed, as exif_transpose treats it."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # malformed EXIF is common and never worth failing a photo over
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT_GREY:
        grey = np.asarray(img, dtype=np.uint32)
        grey8 = (np.clip(grey, 0, 65535) // 257).astype(np.uint8)
        return np.repeat(grey8[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


# EXIF orientation -> the numpy view that shows the stored pixels upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def _fast_jpeg(data: bytes, orientation: int, min_side: int | None) -> np.ndarray | None:
    """libjpeg-turbo straight into numpy, upright; None leaves the photo to Pillow.

    Pillow's decode is the same libjpeg-turbo, but it then packs its 4-byte pixels into a second
    copy for numpy: 113 ms against 29 ms for a 12 MP photo, with identical pixels. Anything this
    path cannot take as it is, Pillow decides: a file libjpeg warns about (truncated, or stray bytes
    that most viewers ignore) is refused by Pillow or decoded by it, as before.
    """
    side = min_side or 0
    try:
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=side, min_width=side, min_factor=2)
    except ValueError:
        return None
    turn = _UPRIGHT.get(orientation)
    return np.ascontiguousarray(turn(rgb)) if turn else rgb


def load_image(data: bytes, name: str, max_pixels: int, min_side: int | None = None) -> LoadedImage:
    """Decode `data` (the bytes of the file called `name`). Raises BadInputError naming the file.

    With `min_side` (the model's input side), a JPEG at least twice that size on both sides is
    decoded reduced in libjpeg's DCT (3/8, 1/4, 1/8 ...), never below `min_side`. The model's resize
    then still only shrinks, from a properly filtered image instead of one 3 to 8 times larger; the
    photo's size, the focal length and the depth map's resolution stay those of the full photo.
    bench/overhead.py measures what this costs in the model's input and what it saves.
    """
    if not data:
        raise BadInputError(f"{name}: the file is empty (0 bytes); copy the photo again")
    # Pillow refuses at 2 x MAX_IMAGE_PIXELS inside open(); tie that to our limit so the setting is the
    # one ceiling (the check below covers 1x to 2x). The value is per process and never changes in one.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadInputError(
            f"{name}: not an image Pillow can read (JPEG, PNG, HEIC, TIFF, WebP); "
            "check that the file is a photo and not renamed from something else"
        ) from None
    except Image.DecompressionBombError as exc:
        raise BadInputError(
            f"{name}: refused before decoding ({exc}); worker.max_image_pixels is {max_pixels}: "
            "downscale the photo or raise the limit"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadInputError(
            f"{name}: the image header is damaged or incomplete ({exc}); copy the photo again"
        ) from None
    with img:
        pixels = img.width * img.height
        # Checked on the header, before decoding, so a tiny file claiming 50k x 50k costs nothing.
        if pixels > max_pixels:
            raise BadInputError(
                f"{name}: {img.width}x{img.height} = {pixels} pixels exceeds worker.max_image_pixels "
                f"({max_pixels}); downscale the photo or raise the limit"
            )
        focal = _focal_35mm(img)
        orientation = _orientation(img)
        # Orientations 5 to 8 turn the photo a quarter: its upright size is the stored one swapped.
        width, height = (img.height, img.width) if orientation in (5, 6, 7, 8) else (img.width, img.height)
        # Colour and grey JPEGs (CMYK ones convert as Pillow alone knows how).
        rgb = _fast_jpeg(data, orientation, min_side) if img.format == "JPEG" and img.mode in ("RGB", "L") else None
        try:
            img.seek(0)  # animated GIF/WebP: the first frame
            if rgb is None:
                # exif_transpose copies even an upright photo (36 MB for 12 MP); only turn what needs it.
                rgb = _to_rgb(ImageOps.exif_transpose(img) if orientation != 1 else img)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise BadInputError(
                f"{name}: the image data is damaged or incomplete ({exc}); copy the photo again"
            ) from None
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise BadInputError(f"{name}: the image has no pixels")
    return LoadedImage(rgb=np.ascontiguousarray(rgb), focal_length_35mm=focal, width=width, height=height)
