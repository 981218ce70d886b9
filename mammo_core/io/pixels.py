"""Pixel helpers shared by the raster reader (`imaging`) and the DICOM reader (`dicom`): size limits, the
decoded-image type, and the one mapping of any bit depth to 8 bits. Neither reader imports the other at
module level; both import this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mammo_core.errors import ImageReadError

#: Largest image accepted, in pixels. Full-field digital mammograms are 3000x4000 to 4600x2800
#: (about 13 MP); 80 MP admits them with room while refusing decompression bombs. It is below
#: PIL's own bomb limit (Image.MAX_IMAGE_PIXELS, ~89 MP), so the check below is the one that bites.
MAX_PIXELS: int = 80_000_000


#: Largest file read, in bytes, checked before reading. The largest image accepted (MAX_PIXELS) stored
#: uncompressed as 32-bit RGBA or float, or as 16-bit RGB DICOM, is 320-480 MB; anything bigger is not one image.
MAX_FILE_BYTES: int = 1 << 30


#: Smallest side accepted, in pixels: below this there is nothing to classify.
MIN_SIDE: int = 32


#: Longest side kept after decoding (see "Bounded memory" above). 4096 keeps a full-field
#: mammogram (about 4000 x 3300) whole, and makes an 80-megapixel image at most 16.8 MP.
MAX_DECODE_SIDE: int = 4096


#: Rows are scaled in blocks of about this many pixels, so converting a large float or 32-bit
#: image never holds more than a few megabytes of float64 temporaries.
_BLOCK_PIXELS = 1 << 20


@dataclass
class LoadedImage:
    """A decoded image: `pixels` is a 2-D uint8 array (rows, columns); `metadata` describes the source.

    `metadata` never holds patient identifiers: only format, size, mode and bit depth (and, for
    DICOM, technical attributes such as photometric interpretation and the window applied).
    """

    pixels: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)


def scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map `values` linearly so that `low` -> 0 and `high` -> 255, clipping outside, rounding.

    `high < low` gives the reversed mapping; `high == low` gives zeros. NaN maps to 0. Used by
    `to_uint8` and by the DICOM pipeline, so every format shares one rounding rule.
    """
    values = np.asarray(values)
    if values.ndim == 0 or values.size == 0:
        return _scale_block(values.astype(np.float64), low, high)
    if values.dtype.kind in "ui" and values.dtype.itemsize <= 2 and values.size > 65536:
        # Cheaper as one lookup over every representable value than as float arithmetic.
        unsigned = np.dtype(f"u{values.dtype.itemsize}")
        domain = np.arange(2 ** (8 * values.dtype.itemsize), dtype=unsigned).view(values.dtype)
        return _scale_block(domain.astype(np.float64), low, high)[values.view(unsigned)]
    out = np.empty(values.shape, dtype=np.uint8)
    flat_in, flat_out = values.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, _BLOCK_PIXELS):
        block = flat_in[start : start + _BLOCK_PIXELS].astype(np.float64)
        flat_out[start : start + _BLOCK_PIXELS] = _scale_block(block, low, high)
    return out


def _scale_block(block: np.ndarray, low: float, high: float) -> np.ndarray:
    if high == low or not (np.isfinite(low) and np.isfinite(high)):
        return np.zeros(block.shape, dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        block = (block - low) * (255.0 / (high - low))
        np.clip(block, 0.0, 255.0, out=block)
        np.nan_to_num(block, copy=False, nan=0.0)
        np.rint(block, out=block)
    return block.astype(np.uint8)


def to_uint8(array: np.ndarray, *, window: tuple[float, float] | None = None) -> np.ndarray:
    """Bring a 2-D array of any numeric type to uint8, the same way for every format.

    uint8 input without a window is returned unchanged (the training images are 8-bit and must
    not be stretched). With `window=(center, width)` the range center +- width/2 maps to 0..255;
    without it the image's own finite minimum and maximum do. A constant image maps to zeros.
    """
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint8 and window is None:
        return array
    if window is not None:
        center, width = float(window[0]), max(float(window[1]), 1.0)
        return scale_to_uint8(array, center - width / 2.0, center + width / 2.0)
    if array.size == 0:
        return np.zeros(array.shape, dtype=np.uint8)
    if array.dtype.kind == "f":
        finite = array[np.isfinite(array)] if not np.isfinite(array).all() else array
        if finite.size == 0:
            return np.zeros(array.shape, dtype=np.uint8)
        low, high = float(finite.min()), float(finite.max())
    else:
        low, high = float(array.min()), float(array.max())
    return scale_to_uint8(array, low, high)


def reduction_factor(width: int, height: int, max_side: int = MAX_DECODE_SIDE) -> int:
    """Smallest integer factor that brings the longer side to at most `max_side` (1: no reduction)."""
    return max(1, math.ceil(max(width, height) / max_side))


def check_size(width: int, height: int, label: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageReadError(
            f"{label}: image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{MAX_PIXELS:,}; refusing it as a possible decompression bomb."
        )
    if min(width, height) < MIN_SIDE:
        raise ImageReadError(
            f"{label}: image is only {width}x{height} pixels; at least {MIN_SIDE} pixels per side "
            "are needed."
        )
