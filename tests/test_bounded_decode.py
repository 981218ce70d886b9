"""Bounded memory and honest truncation checks in mammo_core.imaging / mammo_core.io.dicom: large
images are reduced during or straight after decoding to at most MAX_DECODE_SIDE, and PNG/TIFF files
whose data does not cover the rows of their header are refused, whatever the zlib stream says."""

from __future__ import annotations

import struct
import zlib
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from mammo_core.errors import ImageReadError
from mammo_core.io.dicom import downsample
from mammo_core.io.images import load_image
from mammo_core.io.pixels import MAX_DECODE_SIDE, reduction_factor

from .test_dicom import make_dataset, write


def _gradient(h: int, w: int) -> np.ndarray:
    return (np.add.outer(np.arange(h) * 255 // h, np.arange(w) * 0)).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str, mode: str | None = None, **kwargs) -> bytes:
    buffer = BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _patch_png_height(data: bytes, height: int) -> bytes:
    """The same PNG, its IHDR claiming `height` rows (with a valid CRC): the zlib stream ends cleanly, early."""
    d = bytearray(data)
    assert d[12:16] == b"IHDR"
    d[20:24] = struct.pack(">I", height)
    d[29:33] = struct.pack(">I", zlib.crc32(bytes(d[12:29])))
    return bytes(d)


def _patch_tiff_height(data: bytes, height: int) -> bytes:
    d = bytearray(data)
    offset = struct.unpack("<I", d[4:8])[0]
    for i in range(struct.unpack("<H", d[offset:offset + 2])[0]):
        entry = offset + 2 + 12 * i
        tag, kind = struct.unpack("<HH", d[entry:entry + 4])
        if tag == 257:
            d[entry + 8:entry + 12] = struct.pack("<H", height) + b"\0\0" if kind == 3 else struct.pack("<I", height)
    return bytes(d)


def test_reduction_factor():
    assert reduction_factor(4096, 3000) == 1
    assert reduction_factor(4097, 100) == 2
    assert reduction_factor(10000, 8000) == 3  # 80 MP -> 3334 x 2667


@pytest.mark.parametrize("fmt,mode,kwargs", [("PNG", "L", {}), ("PNG", "RGBA", {}), ("PNG", "I;16", {}),
                                             ("TIFF", "L", {"compression": "tiff_deflate"}), ("TIFF", "F", {}),
                                             ("BMP", "L", {})])
def test_large_images_are_reduced_right_after_decoding(fmt, mode, kwargs):
    h, w = 3000, 9000  # 27 MP, long side 9000 -> factor 3
    base = _gradient(h, w)
    if mode == "RGBA":
        pixels = np.dstack([base, base, base, np.full_like(base, 255)])
    elif mode == "I;16":
        pixels = base.astype(np.uint16) * 257
    elif mode == "F":
        pixels = base.astype(np.float32)
    else:
        pixels = base
    loaded = load_image(_encode(pixels, fmt, **kwargs), name=f"big.{fmt.lower()}")
    assert loaded.pixels.shape == (1000, 3000) and max(loaded.pixels.shape) <= MAX_DECODE_SIDE
    assert loaded.metadata["width"] == w and loaded.metadata["height"] == h  # the original size is kept
    assert loaded.metadata["reduced_by"] == 3
    column = loaded.pixels[:, 1500].astype(int)
    assert column[0] < 5 and column[-1] > 245 and np.all(np.diff(column) >= 0)  # still the same picture


def test_large_jpeg_is_decoded_at_reduced_scale():
    data = _encode(_gradient(2400, 9600), "JPEG", quality=90)
    loaded = load_image(data, name="big.jpg")
    assert max(loaded.pixels.shape) <= MAX_DECODE_SIDE
    assert loaded.metadata["reduced_how"] == "JPEG scaled decode" and loaded.metadata["width"] == 9600


def test_large_dicom_is_downsampled_straight_after_decode(tmp_path):
    stored = (np.add.outer(np.arange(1000), np.arange(8000)) % 4000).astype(np.uint16)
    path = write(make_dataset(stored), tmp_path / "big.dcm")
    loaded = load_image(path)
    assert loaded.pixels.shape == (500, 4000)
    assert loaded.metadata["width"] == 8000 and loaded.metadata["reduced_by"] == 2


def test_downsample_averages_blocks_and_keeps_the_dtype():
    a = np.arange(30, dtype=np.uint16).reshape(5, 6)
    out = downsample(a, 2, block_rows=1)
    assert out.dtype == np.uint16 and out.shape == (3, 3)
    assert out[0].tolist() == [4, 6, 8]  # mean of [[0,1],[6,7]] = 3.5 -> 4 (half to even)
    assert out[2].tolist() == [24, 26, 28]  # the last, half block averages the one row it has (24.5 -> 24)
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    assert downsample(rgb, 2).shape == (2, 2, 3)


@pytest.mark.parametrize("interlace", [False, True])
def test_png_missing_rows_is_refused_even_with_a_clean_zlib_stream(interlace):
    rng = np.random.default_rng(0)
    complete = _encode((rng.random((960, 2000)) * 255).astype(np.uint8), "PNG")
    if interlace:  # PIL cannot write Adam7: build one by hand from a real image
        complete = _adam7_png((rng.random((300, 200)) * 255).astype(np.uint8))
        assert load_image(complete, name="ok.png").pixels.shape == (300, 200)  # a whole interlaced file is fine
        cut = _patch_png_height(complete, 700)
    else:
        assert load_image(complete, name="ok.png").pixels.shape == (960, 2000)
        cut = _patch_png_height(complete, 2400)  # 60 % of the rows missing
    with pytest.raises(ImageReadError, match=r"^cut\.png: image data is damaged or truncated") as info:
        load_image(cut, name="cut.png")
    assert "rows are missing" in str(info.value)


def _adam7_png(pixels: np.ndarray) -> bytes:
    h, w = pixels.shape
    raw = b""
    for x0, y0, dx, dy in [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]:
        sub = pixels[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.tobytes() for row in sub)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("compression", ["raw", "tiff_deflate", "packbits"])
def test_tiff_missing_rows_is_refused(compression):
    rng = np.random.default_rng(1)
    complete = _encode((rng.random((960, 2000)) * 255).astype(np.uint8), "TIFF", compression=compression)
    assert load_image(complete, name="ok.tif").pixels.shape == (960, 2000)
    with pytest.raises(ImageReadError, match=r"^cut\.tif: image data is damaged or truncated"):
        load_image(_patch_tiff_height(complete, 2400), name="cut.tif")


def test_uncompressed_tiff_with_short_strip_is_refused():
    data = bytearray(_encode(np.full((100, 300), 7, dtype=np.uint8), "TIFF"))
    with pytest.raises(ImageReadError, match="truncated"):
        load_image(bytes(data[:-5000]), name="short.tif")
