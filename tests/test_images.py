"""worker.images.load_image: upright uint8 RGB from every kind of photo, EXIF focal length, clear refusals."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pillow_heif
import pytest
from PIL import ExifTags, Image, ImageOps

from testkit.photos import png_with_size
from worker.errors import BadInputError
from worker.images import LoadedImage, load_image

MAX_PIXELS = 100_000_000
RED = (255, 0, 0)
GREY = 128


def _encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _load(data: bytes, name: str = "photo.jpg") -> LoadedImage:
    return load_image(data, name, MAX_PIXELS)


def _assert_rgb8(loaded: LoadedImage, height: int, width: int) -> None:
    assert loaded.rgb.dtype == np.uint8
    assert loaded.rgb.shape == (height, width, 3)
    assert (loaded.height, loaded.width) == (height, width)


def _marked(width: int = 40, height: int = 20) -> np.ndarray:
    """Grey landscape image with a red 6x6 block in its top-left corner: every orientation looks different."""
    arr = np.full((height, width, 3), GREY, np.uint8)
    arr[:6, :6] = RED
    return arr


def _exif(orientation: int | None = None, focal_35mm: int | None = None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    if focal_35mm is not None:
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.FocalLengthIn35mmFilm] = focal_35mm
    return exif.tobytes()


# Orientation -> (transposed?, corner the top-left marker lands in), per the EXIF spec.
_MARKER_CORNER = {
    1: (False, "top-left"),
    2: (False, "top-right"),
    3: (False, "bottom-right"),
    4: (False, "bottom-left"),
    5: (True, "top-left"),
    6: (True, "top-right"),
    7: (True, "bottom-right"),
    8: (True, "bottom-left"),
}


def _corner(rgb: np.ndarray, which: str) -> np.ndarray:
    rows = slice(0, 6) if which.startswith("top") else slice(-6, None)
    cols = slice(0, 6) if which.endswith("left") else slice(-6, None)
    return rgb[rows, cols]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_makes_the_image_upright(orientation: int) -> None:
    original = Image.fromarray(_marked())
    data = _encode(original, "PNG", exif=_exif(orientation=orientation))

    loaded = _load(data, "oriented.png")

    transposed, corner = _MARKER_CORNER[orientation]
    _assert_rgb8(loaded, *((40, 20) if transposed else (20, 40)))
    assert (_corner(loaded.rgb, corner) == RED).all()
    others = {"top-left", "top-right", "bottom-left", "bottom-right"} - {corner}
    for other in others:
        assert (_corner(loaded.rgb, other) == GREY).all(), other
    with Image.open(io.BytesIO(data)) as reference:
        expected = np.asarray(ImageOps.exif_transpose(reference).convert("RGB"))
    np.testing.assert_array_equal(loaded.rgb, expected)


def test_jpeg_with_orientation_6_is_rotated_clockwise() -> None:
    data = _encode(Image.fromarray(_marked()), "JPEG", quality=95, exif=_exif(orientation=6))

    loaded = _load(data, "IMG_0001.JPG")

    _assert_rgb8(loaded, 40, 20)
    # Lossy: compare block means. The marker was top-left; a 90 degree clockwise turn puts it top-right.
    assert np.abs(_corner(loaded.rgb, "top-right")[1:5, 1:5].mean(axis=(0, 1)) - RED).max() < 12
    assert np.abs(_corner(loaded.rgb, "top-left")[1:5, 1:5].astype(int) - GREY).max() < 12


def test_heic_orientation_6_is_rotated_once() -> None:
    data = _encode(Image.fromarray(_marked()), "HEIF", quality=95, exif=_exif(orientation=6))

    loaded = _load(data, "IMG_0002.HEIC")

    _assert_rgb8(loaded, 40, 20)
    assert np.abs(_corner(loaded.rgb, "top-right")[1:5, 1:5].mean(axis=(0, 1)) - RED).max() < 20
    assert np.abs(_corner(loaded.rgb, "bottom-left")[1:5, 1:5].astype(int) - GREY).max() < 20


def test_focal_length_in_35mm_film_is_read_from_the_exif_ifd() -> None:
    data = _encode(Image.fromarray(_marked()), "JPEG", exif=_exif(focal_35mm=26))

    loaded = _load(data)

    assert loaded.focal_length_35mm == 26.0
    assert isinstance(loaded.focal_length_35mm, float)


def test_focal_length_is_read_alongside_orientation() -> None:
    data = _encode(Image.fromarray(_marked()), "JPEG", exif=_exif(orientation=8, focal_35mm=77))

    loaded = _load(data)

    assert loaded.focal_length_35mm == 77.0
    assert loaded.rgb.shape == (40, 20, 3)


def test_focal_length_absent_is_none() -> None:
    without_exif = _encode(Image.fromarray(_marked()), "JPEG")
    exif_without_focal = _encode(Image.fromarray(_marked()), "JPEG", exif=_exif(orientation=1))

    assert _load(without_exif).focal_length_35mm is None
    assert _load(exif_without_focal).focal_length_35mm is None


def test_focal_length_zero_means_unknown() -> None:
    data = _encode(Image.fromarray(_marked()), "JPEG", exif=_exif(focal_35mm=0))

    assert _load(data).focal_length_35mm is None


def test_heic_decodes_to_rgb() -> None:
    assert pillow_heif.is_supported(_encode(Image.new("RGB", (8, 8)), "HEIF"))
    colour = (200, 60, 30)
    data = _encode(Image.new("RGB", (56, 40), colour), "HEIF", quality=95)

    loaded = _load(data, "IMG_1.HEIC")

    _assert_rgb8(loaded, 40, 56)
    assert np.abs(loaded.rgb.reshape(-1, 3).mean(axis=0) - colour).max() < 10


def test_png_with_alpha_drops_the_alpha_channel() -> None:
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0
    rgba[0, 0] = (250, 240, 230, 255)

    loaded = _load(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), "alpha.png")

    _assert_rgb8(loaded, 10, 12)
    assert tuple(loaded.rgb[0, 0]) == (250, 240, 230)
    assert tuple(loaded.rgb[5, 5]) == (10, 20, 30)


def test_grey_png_is_repeated_into_three_channels() -> None:
    grey = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8

    loaded = _load(_encode(Image.fromarray(grey, "L"), "PNG"), "grey.png")

    _assert_rgb8(loaded, 5, 6)
    for channel in range(3):
        np.testing.assert_array_equal(loaded.rgb[..., channel], grey)


def test_sixteen_bit_grey_png_is_scaled_to_eight_bits() -> None:
    values = np.array([[0, 257, 32896, 65280, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    data = _encode(img, "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode.startswith("I;16")  # the case under test, not a silent 8-bit PNG

    loaded = _load(data, "depth16.png")

    # Proportional: v * 255 / 65535, so 65280 -> 254 (a plain >> 8 would give 255).
    _assert_rgb8(loaded, 1, 5)
    np.testing.assert_array_equal(loaded.rgb[0, :, 0], [0, 1, 128, 254, 255])
    np.testing.assert_array_equal(loaded.rgb[..., 0], loaded.rgb[..., 1])
    np.testing.assert_array_equal(loaded.rgb[..., 0], loaded.rgb[..., 2])


def test_palette_png_with_transparency_uses_the_palette_colours() -> None:
    img = Image.new("P", (4, 3), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 1)
    data = _encode(img, "PNG", transparency=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "P" and check.info.get("transparency") == 0

    loaded = _load(data, "palette.png")

    _assert_rgb8(loaded, 3, 4)
    assert tuple(loaded.rgb[0, 0]) == (0, 0, 255)
    assert (loaded.rgb.reshape(-1, 3)[1:] == RED).all()


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    data = _encode(Image.new("CMYK", (16, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "CMYK"

    loaded = _load(data, "print.jpg")

    _assert_rgb8(loaded, 8, 16)
    assert np.abs(loaded.rgb.reshape(-1, 3).mean(axis=0) - RED).max() < 10


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (10, 6), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 3

    loaded = _load(data, "anim.gif")

    _assert_rgb8(loaded, 6, 10)
    assert (loaded.rgb.reshape(-1, 3) == RED).all()


def test_one_by_one_pixel_image() -> None:
    loaded = _load(_encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), "dot.png")

    _assert_rgb8(loaded, 1, 1)
    assert tuple(loaded.rgb[0, 0]) == (1, 2, 3)


def test_extreme_aspect_ratio() -> None:
    arr = np.zeros((3, 4000, 3), np.uint8)
    arr[:, -1] = (9, 8, 7)

    loaded = _load(_encode(Image.fromarray(arr), "PNG"), "strip.png")

    _assert_rgb8(loaded, 3, 4000)
    assert loaded.rgb.flags.c_contiguous
    assert tuple(loaded.rgb[2, 3999]) == (9, 8, 7)
    assert tuple(loaded.rgb[2, 3998]) == (0, 0, 0)


def _refusal(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> str:
    with pytest.raises(BadInputError) as info:
        load_image(data, name, max_pixels)
    message = str(info.value)
    assert message.startswith(name), message
    return message


def test_empty_file_is_refused() -> None:
    message = _refusal(b"", "empty.jpg")
    assert "empty" in message


def test_truncated_jpeg_is_refused() -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    whole = _encode(Image.fromarray(noise), "JPEG")
    assert _load(whole).rgb.shape == (64, 64, 3)

    message = _refusal(whole[: len(whole) // 2], "half.jpg")
    assert "damaged or incomplete" in message


def test_text_file_named_jpg_is_refused() -> None:
    message = _refusal(b"hello, this is not a photo\n" * 4, "x.jpg")
    assert "not an image" in message


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = png_with_size(50_000, 50_000)
    assert len(bomb) < 100

    message = _refusal(bomb, "bomb.png", max_pixels=100_000_000)

    assert "worker.max_image_pixels" in message


def test_image_over_max_pixels_is_refused_from_the_header() -> None:
    # 12000 x 12000 = 144 M pixels: under Pillow's own ceiling, over the configured limit.
    message = _refusal(png_with_size(12_000, 12_000), "big.png", max_pixels=100_000_000)

    assert "worker.max_image_pixels" in message
    assert "12000x12000" in message


def test_max_pixels_is_inclusive() -> None:
    data = _encode(Image.new("RGB", (10, 10)), "PNG")

    assert load_image(data, "ok.png", 100).rgb.shape == (10, 10, 3)
    assert "worker.max_image_pixels" in _refusal(data, "over.png", max_pixels=99)


def test_raising_the_limit_above_pillows_default_ceiling_takes_effect() -> None:
    # 15000 x 15000 = 225 M pixels: over Pillow's default 2 x 89.5 M, under a configured 300 M. The
    # header passes; the (empty) pixel data then fails as damaged, not as too big.
    message = _refusal(png_with_size(15_000, 15_000), "huge.png", max_pixels=300_000_000)

    assert "worker.max_image_pixels" not in message
    assert "damaged or incomplete" in message


# --- reduced decoding for the model ------------------------------------------------------------------------------


def _big_marked(width: int, height: int) -> np.ndarray:
    """A smooth gradient with a red block in the top-left eighth, so a reduced decode is recognisable."""
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    arr = np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8).copy()
    arr[: height // 8, : width // 8] = RED
    return arr


def test_a_large_jpeg_is_decoded_reduced_but_never_below_the_models_side() -> None:
    data = _encode(Image.fromarray(_big_marked(1000, 800)), "JPEG", quality=95)
    loaded = load_image(data, "big.jpg", MAX_PIXELS, min_side=128)
    # 1/4 gives 250 x 200; 1/8 would give 125 x 100, under the model's 128.
    assert loaded.rgb.shape == (200, 250, 3)
    assert (loaded.width, loaded.height) == (1000, 800)
    full = load_image(data, "big.jpg", MAX_PIXELS)
    assert full.rgb.shape == (800, 1000, 3) and (full.width, full.height) == (1000, 800)
    # The same picture, only smaller: compare with the full decode shrunk by area averaging.
    shrunk = np.asarray(Image.fromarray(full.rgb).resize((250, 200), Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(loaded.rgb.astype(np.float32) - shrunk).mean() < 2.0


def test_a_reduced_decode_keeps_the_orientation_and_the_upright_size() -> None:
    stored = Image.fromarray(_big_marked(1000, 800))  # orientation 6: seen upright as 800 x 1000
    data = _encode(stored, "JPEG", quality=95, exif=_exif(orientation=6, focal_35mm=26))
    loaded = load_image(data, "turned.jpg", MAX_PIXELS, min_side=128)
    assert loaded.rgb.shape == (250, 200, 3)
    assert (loaded.width, loaded.height) == (800, 1000)
    assert loaded.focal_length_35mm == 26
    assert tuple(loaded.rgb[2, -3]) == pytest.approx(RED, abs=12)  # the red corner turned to the top right


@pytest.mark.parametrize(("fmt", "size"), [("JPEG", (250, 200)), ("PNG", (1000, 800))])
def test_only_jpegs_at_least_twice_the_models_side_are_reduced(fmt: str, size: tuple[int, int]) -> None:
    data = _encode(Image.fromarray(_big_marked(*size)), fmt)
    loaded = load_image(data, "photo", MAX_PIXELS, min_side=128)
    assert loaded.rgb.shape == (size[1], size[0], 3)


def test_a_jpeg_libjpeg_warns_about_is_left_to_pillow() -> None:
    """Stray bytes before a marker: most viewers show the photo, so it must not fail here either."""
    clean = _encode(Image.fromarray(_big_marked(80, 60)), "JPEG", quality=95)
    at = clean.index(b"\xff\xda")  # start of scan
    stray = clean[:at] + b"\x00\x00\x00" + clean[at:]
    loaded = _load(stray)
    np.testing.assert_array_equal(loaded.rgb, _load(clean).rgb)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpegs_are_turned_upright_exactly_as_pillow_turns_them(orientation: int) -> None:
    """JPEGs take the fast decoder and a numpy turn; every orientation must match Pillow's own."""
    data = _encode(Image.fromarray(_big_marked(64, 40)), "JPEG", quality=95, exif=_exif(orientation=orientation))
    with Image.open(io.BytesIO(data)) as reference:
        expected = np.asarray(ImageOps.exif_transpose(reference).convert("RGB"))
    loaded = _load(data)
    np.testing.assert_array_equal(loaded.rgb, expected)
    assert (loaded.width, loaded.height) == (expected.shape[1], expected.shape[0])
