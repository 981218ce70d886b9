"""Tests for mammo_core.imaging: every accepted format and mode, every refused input, the 8-bit rule
and the resize convention. All files are built in tmp_path."""

from __future__ import annotations

import re
import struct
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from mammo_core.errors import ImageReadError
from mammo_core.io.images import load_image, resize_for_model
from mammo_core.io.pixels import MAX_PIXELS, MIN_SIDE, scale_to_uint8, to_uint8

H, W = 40, 56  # non-square, so a transposed result would fail the shape check


def _gray() -> np.ndarray:
    """Left half 20, right half 220, one bright pixel at (3, 5): pins orientation and values."""
    arr = np.full((H, W), 20, dtype=np.uint8)
    arr[:, W // 2 :] = 220
    arr[3, 5] = 255
    return arr


def _save(img: Image.Image, path: Path, fmt: str, **kwargs) -> Path:
    img.save(path, fmt, **kwargs)
    return path


def _assert_gray_image(pixels: np.ndarray, *, exact: np.ndarray | None = None, tol: float = 0.0) -> None:
    assert pixels.dtype == np.uint8
    assert pixels.ndim == 2 and pixels.shape == (H, W)
    if exact is not None:
        diff = np.abs(pixels.astype(int) - exact.astype(int))
        assert diff.mean() <= tol, f"mean abs difference {diff.mean():.2f} > {tol}"


# --- accepted formats and modes -----------------------------------------------------------------


def _png_l(tmp):
    return _save(Image.fromarray(_gray()), tmp / "l.png", "PNG"), _gray(), 0


def _png_la(tmp):
    gray = _gray()
    alpha = np.full((H, W), 255, dtype=np.uint8)
    alpha[:, :4] = 0  # transparent strip -> composited onto black
    img = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)])
    expected = gray.copy()
    expected[:, :4] = 0
    return _save(img, tmp / "la.png", "PNG"), expected, 0


def _png_rgb(tmp):
    return _save(Image.fromarray(_gray()).convert("RGB"), tmp / "rgb.png", "PNG"), _gray(), 0


def _png_rgba(tmp):
    gray = _gray()
    rgba = np.dstack([gray, gray, gray, np.full((H, W), 255, np.uint8)])
    rgba[:, :4, 3] = 0
    expected = gray.copy()
    expected[:, :4] = 0
    return _save(Image.fromarray(rgba, "RGBA"), tmp / "rgba.png", "PNG"), expected, 0


def _png_p(tmp):
    return _save(Image.fromarray(_gray()).convert("P"), tmp / "p.png", "PNG"), _gray(), 0


def _png_p_transparent(tmp):
    img = Image.fromarray(_gray()).convert("P")
    index_of_20 = img.getpixel((0, 0))
    img.info["transparency"] = index_of_20  # the dark half becomes transparent -> black
    expected = _gray()
    expected[expected == 20] = 0
    return _save(img, tmp / "pt.png", "PNG", transparency=index_of_20), expected, 0


def _png_1bit(tmp):
    bits = _gray() > 128
    return _save(Image.fromarray(bits), tmp / "bits.png", "PNG"), bits.astype(np.uint8) * 255, 0


def _jpeg_l(tmp):
    return _save(Image.fromarray(_gray()), tmp / "l.jpg", "JPEG", quality=95), _gray(), 4


def _jpeg_rgb(tmp):
    return _save(Image.fromarray(_gray()).convert("RGB"), tmp / "rgb.jpeg", "JPEG", quality=95), _gray(), 4


def _jpeg_cmyk(tmp):
    img = Image.fromarray(_gray()).convert("RGB").convert("CMYK")
    assert img.mode == "CMYK"
    return _save(img, tmp / "cmyk.jpg", "JPEG", quality=95), _gray(), 6


def _tiff_l(tmp):
    return _save(Image.fromarray(_gray()), tmp / "l.tif", "TIFF"), _gray(), 0


def _tiff_lzw_rgb(tmp):
    img = Image.fromarray(_gray()).convert("RGB")
    return _save(img, tmp / "rgb.tiff", "TIFF", compression="tiff_lzw"), _gray(), 0


def _bmp_l(tmp):
    return _save(Image.fromarray(_gray()), tmp / "l.bmp", "BMP"), _gray(), 0


def _bmp_rgb(tmp):
    return _save(Image.fromarray(_gray()).convert("RGB"), tmp / "rgb.bmp", "BMP"), _gray(), 0


@pytest.mark.parametrize(
    "build",
    [
        _png_l, _png_la, _png_rgb, _png_rgba, _png_p, _png_p_transparent, _png_1bit,
        _jpeg_l, _jpeg_rgb, _jpeg_cmyk, _tiff_l, _tiff_lzw_rgb, _bmp_l, _bmp_rgb,
    ],
    ids=lambda f: f.__name__.lstrip("_"),
)
def test_formats_and_modes_decode_to_gray_uint8(tmp_path, build):
    path, expected, tol = build(tmp_path)
    loaded = load_image(path)
    _assert_gray_image(loaded.pixels, exact=expected, tol=tol)
    assert loaded.metadata["width"] == W and loaded.metadata["height"] == H
    # Bytes (an upload) decode the same as the path.
    assert np.array_equal(load_image(path.read_bytes(), name=path.name).pixels, loaded.pixels)


def _ramp16() -> np.ndarray:
    """16-bit ramp from 1000 to 61000 along the columns."""
    return np.tile(np.linspace(1000, 61000, W).round().astype(np.uint16), (H, 1))


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("TIFF", "tif")])
def test_16bit_is_min_max_scaled_to_8bit(tmp_path, fmt, suffix):
    ramp = _ramp16()
    path = tmp_path / f"ramp16.{suffix}"
    Image.fromarray(ramp).save(path, fmt)
    assert Image.open(path).mode.startswith("I;16")  # really a 16-bit file
    loaded = load_image(path)
    _assert_gray_image(loaded.pixels)
    assert loaded.metadata["bit_depth"] == 16
    # min -> 0, max -> 255, linear in between.
    expected = np.rint((ramp.astype(float) - 1000) / 60000 * 255).astype(np.uint8)
    assert np.array_equal(loaded.pixels, expected)


def test_float_tiff_is_min_max_scaled(tmp_path):
    arr = np.tile(np.linspace(-1.0, 3.0, W, dtype=np.float32), (H, 1))
    path = tmp_path / "float.tif"
    Image.fromarray(arr, "F").save(path, "TIFF")
    pixels = load_image(path).pixels
    _assert_gray_image(pixels)
    assert pixels[0, 0] == 0 and pixels[0, -1] == 255
    assert np.all(np.diff(pixels[0].astype(int)) >= 0)


def test_multipage_tiff_uses_first_page(tmp_path):
    first, second = Image.fromarray(_gray()), Image.fromarray(255 - _gray())
    path = tmp_path / "pages.tif"
    first.save(path, "TIFF", save_all=True, append_images=[second])
    assert np.array_equal(load_image(path).pixels, _gray())


def test_minimum_side_is_accepted(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(np.zeros((MIN_SIDE, MIN_SIDE), np.uint8)).save(path)
    assert load_image(path).pixels.shape == (MIN_SIDE, MIN_SIDE)


# --- refused inputs -----------------------------------------------------------------------------


def _raises_naming(path_or_bytes, name_in_message: str, *, name: str | None = None, match: str = ""):
    with pytest.raises(ImageReadError) as info:
        load_image(path_or_bytes, name=name)
    message = str(info.value)
    assert name_in_message in message
    assert re.search(match, message, re.IGNORECASE), message
    return message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _raises_naming(path, "empty.png", match="empty")


def test_missing_file_and_folder(tmp_path):
    _raises_naming(tmp_path / "nope.png", "nope.png", match="not found")
    _raises_naming(tmp_path, str(tmp_path), match="folder")


def _png_bytes() -> bytes:
    rng = np.random.default_rng(1)
    buf = BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(progressive: bool = False) -> bytes:
    rng = np.random.default_rng(2)
    buf = BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 80), dtype=np.uint8)).save(
        buf, "JPEG", quality=90, progressive=progressive
    )
    return buf.getvalue()


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_truncated_png(tmp_path, fraction):
    data = _png_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: int(len(data) * fraction)])
    _raises_naming(path, "cut.png", match="truncated|damaged")


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9, 0.99])
def test_truncated_jpeg_raises_instead_of_grey_padding(tmp_path, fraction, progressive):
    data = _jpeg_bytes(progressive)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * fraction)])
    _raises_naming(path, "cut.jpg", match="truncated|damaged")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_jpeg_missing_only_final_marker_bytes_still_raises(tmp_path):
    data = _jpeg_bytes()
    path = tmp_path / "nearly.jpg"
    path.write_bytes(data[:-3])  # cut inside the last entropy-coded bytes
    _raises_naming(path, "nearly.jpg", match="truncated|damaged")


@pytest.mark.parametrize("suffix", ["png", "jpg", "tiff", "bmp"])
def test_not_an_image_under_image_extension(tmp_path, suffix):
    path = tmp_path / f"notes.{suffix}"
    path.write_text("patient notes, definitely not pixels\n" * 10)
    _raises_naming(path, f"notes.{suffix}", match="not a readable image")


def test_not_dicom_under_dicom_extension(tmp_path):
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"\x00" * 300)
    _raises_naming(path, "scan.dcm", match="DICOM")


def test_unsupported_format_is_refused(tmp_path):
    path = tmp_path / "anim.gif"
    Image.fromarray(_gray()).save(path, "GIF")
    _raises_naming(path, "anim.gif", match="not a readable image")


def test_upload_bytes_are_named_in_errors():
    _raises_naming(b"garbage" * 50, "upload-7.png", name="upload-7.png", match="not a readable image")
    _raises_naming(b"garbage" * 50, "<upload>", match="not a readable image")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of zeros: a few kilobytes that claim width x height pixels."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows_per_chunk = 512
    idat = bytearray()
    for start in range(0, height, rows_per_chunk):
        idat += compressor.compress(row * min(rows_per_chunk, height - start))
    idat += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", bytes(idat)) + _png_chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(20000, 20000), (9500, 9000)])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch, width, height):
    assert width * height > MAX_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(width, height))
    assert path.stat().st_size < 200_000

    def no_decoding(self):  # the refusal must come from the header, before any allocation
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    _raises_naming(path, "bomb.png", match="decompression bomb")


def test_tiny_image_is_refused(tmp_path):
    path = tmp_path / "dot.png"
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(path)
    _raises_naming(path, "dot.png", match=f"at least {MIN_SIDE} pixels")


# --- the 8-bit rule -----------------------------------------------------------------------------


def test_to_uint8_rules():
    eight = np.array([[3, 7], [9, 11]], dtype=np.uint8)
    assert to_uint8(eight) is eight  # 8-bit data is never stretched
    sixteen = np.array([[100, 200], [300, 1100]], dtype=np.uint16)
    assert to_uint8(sixteen).tolist() == [[0, 26], [51, 255]]
    assert to_uint8(np.full((3, 3), 500, np.uint16)).tolist() == [[0] * 3] * 3
    floats = np.array([[np.nan, 0.0], [0.5, 1.0]])
    assert to_uint8(floats).tolist() == [[0, 0], [128, 255]]
    assert to_uint8(np.array([[40, 75, 160]], np.int32), window=(100, 100)).tolist() == [[0, 64, 255]]
    big = (np.arange(300 * 250) % 65536).astype(np.uint16).reshape(300, 250)  # lookup-table path
    assert np.array_equal(to_uint8(big), scale_to_uint8(big.astype(np.float64), 0, 65535))


# --- resize convention --------------------------------------------------------------------------


def test_resize_stretches_to_square_without_padding():
    image = np.zeros((224, 448), dtype=np.uint8)  # 224 rows, 448 columns
    image[:, 224:] = 255
    out = resize_for_model(image)
    assert out.shape == (224, 224) and out.dtype == np.uint8
    assert np.all(out[:, :110] < 10)  # left half stays dark...
    assert np.all(out[:, 114:] > 245)  # ...right half bright: columns squeezed, not cropped
    assert np.all(out[0] == out[-1])  # no padding bands at the top or bottom

    tall = np.full((448, 100), 200, dtype=np.uint8)
    out = resize_for_model(tall)
    assert out.shape == (224, 224) and np.all(out == 200)  # a pad would show as 0 somewhere

