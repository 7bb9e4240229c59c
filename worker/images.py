"""Decode a photo the way a person sees it: upright RGB, plus the EXIF focal length if the camera wrote one."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import pillow_heif
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from worker.errors import BadInputError

pillow_heif.register_heif_opener()

_SIXTEEN_BIT_GREY = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class LoadedImage:
    """`rgb` is uint8 (H, W, 3), upright. `focal_length_35mm` is in millimetres (35 mm equivalent)."""

    rgb: np.ndarray
    focal_length_35mm: float | None

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


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


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT_GREY:
        grey = np.asarray(img, dtype=np.uint32)
        grey8 = (np.clip(grey, 0, 65535) // 257).astype(np.uint8)
        return np.repeat(grey8[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def load_image(data: bytes, name: str, max_pixels: int) -> LoadedImage:
    """Decode `data` (the bytes of the file called `name`). Raises BadInputError naming the file."""
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
        try:
            img.seek(0)  # animated GIF/WebP: the first frame
            upright = ImageOps.exif_transpose(img)
            rgb = _to_rgb(upright)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise BadInputError(
                f"{name}: the image data is damaged or incomplete ({exc}); copy the photo again"
            ) from None
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise BadInputError(f"{name}: the image has no pixels")
    return LoadedImage(rgb=np.ascontiguousarray(rgb), focal_length_35mm=focal)
