"""Read an image file or upload into a 2-D 8-bit grayscale array, and turn it into model input.

One entry point, `load_image`, serves the CLI, the app and training, so every path into the
model decodes, converts to grayscale, brings high bit depths to 8 bits and resizes the same way.

Accepted: PNG, JPEG, TIFF (first page), BMP and DICOM (see `mammo_core.io.dicom`). Anything else,
and empty, truncated, damaged, too large (decompression bombs) or too small input, raises
`ImageReadError` naming the file.

Orientation: an EXIF Orientation tag (JPEG, PNG) is applied, so the image is the one viewers show
(Pillow applies a TIFF's own Orientation tag itself).

Grayscale: colour is converted with ITU-R 601-2 luma; transparency is composited onto black
(a mammogram's background); palette images are expanded first.

8-bit rule, the same for every format: 8-bit data is used as stored (the training images are
8-bit and must not be stretched). Higher bit depths (16-bit PNG/TIFF, 32-bit integer or float
TIFF, DICOM) are mapped linearly to 0..255: with a window, the window's range; without one, the
image's own minimum and maximum. Only DICOM carries a window (or VOI LUT); see `mammo_core.io.dicom`.

Bounded memory: an image whose longer side exceeds MAX_DECODE_SIDE (4096 px) is reduced by an
integer factor as early as its format allows, before anything else touches it: JPEG is decoded
at 1/2, 1/4 or 1/8 scale by libjpeg itself (PIL `draft`); PNG, TIFF and BMP are box-reduced
(PIL `reduce`) straight after decoding; DICOM is block-averaged straight after decompression (see
`mammo_core.io.dicom`). So no later step holds more than 4096 x 4096 pixels (the model sees 224 x 224,
the display 1280), and `predict --gradcam` on an 80-megapixel image stays near 1 GB (docs/BENCHMARKS.md).
`metadata` keeps the original width and height and says by how much the image was reduced.

Truncation: PIL pads a PNG whose zlib stream ends cleanly but early, or a TIFF whose strips do not
cover the image, with black. Both are checked against the header (the PNG's inflated byte count;
the TIFF's strip or tile table) and refused like any truncated file.

Resizing convention: the whole image is resized to IMAGE_SIZE x IMAGE_SIZE *without* keeping the
aspect ratio (no padding), with PIL's antialiased bilinear filter. The training images are already
224x224 whole-breast cut-outs, made that way upstream, so a stretched resize is what the model saw.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Union

import math
import zlib

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from mammo_core.config import IMAGE_SIZE
from mammo_core.errors import ImageReadError
from mammo_core.io.pixels import MAX_FILE_BYTES, MAX_PIXELS, LoadedImage, check_size, reduction_factor, to_uint8


#: PIL modes that `Image.reduce` handles; others are converted to grayscale first.
_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "I", "F", "CMYK")

#: PIL formats tried. Restricting them keeps PIL from handing odd inputs to risky or irrelevant
#: decoders (EPS through Ghostscript, PSD, ICO...). Camera MPO files open through "JPEG".
PIL_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "TIFF", "BMP")

#: Extensions whose content must be DICOM; used only to word the error for a non-DICOM file.
_DICOM_SUFFIXES = (".dcm", ".dicom")


Source = Union[str, Path, bytes, bytearray, memoryview]


def read_file(path: str | Path, label: str | None = None) -> bytes:
    """The bytes of an image file, refusing before reading what cannot be one: a folder, a device or pipe
    (`/dev/zero` would never end), a file over MAX_FILE_BYTES. Raises ImageReadError naming `label`."""
    path = Path(path)
    label = label or str(path)
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise ImageReadError(f"{label}: is a folder, not an image file.")
        if not path.is_file():
            raise ImageReadError(f"{label}: is not a regular file (a device, pipe or socket); give an image file.")
        if size > MAX_FILE_BYTES:
            raise ImageReadError(f"{label}: file is {size:,} bytes, over the limit of {MAX_FILE_BYTES:,} for one image.")
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(f"{label}: file not found.") from None
    except IsADirectoryError:
        raise ImageReadError(f"{label}: is a folder, not an image file.") from None
    except OSError as exc:
        raise ImageReadError(f"{label}: cannot be read ({exc.strerror or exc}).") from None


def _read_source(source: Source, name: str | None) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), name or "<upload>"
    label = name or str(source)
    return read_file(source, label), label


def is_dicom_bytes(data: bytes) -> bool:
    """True when the bytes carry the DICOM Part 10 preamble marker ('DICM' at offset 128)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _truncated(label: str, detail: str) -> ImageReadError:
    return ImageReadError(f"{label}: image data is damaged or truncated ({detail}).")


def _check_png_rows(data: bytes, label: str) -> None:
    """Refuse a PNG whose image data inflates to fewer bytes than its header's rows need.

    Why by hand: PIL pads a zlib stream that ends cleanly but early with black, and exposes no
    decoded-row count. Inflation runs in 1 MB steps, so it never holds the image.
    """
    pos, inflater, total, expected = 8, zlib.decompressobj(), 0, None
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR" and len(body) >= 13:
            width, height = int.from_bytes(body[0:4], "big"), int.from_bytes(body[4:8], "big")
            depth, colour, interlace = body[8], body[9], body[12]
            bits = depth * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 1)
            passes = [(0, 0, 1, 1)] if not interlace else [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
                                                           (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
            expected = 0
            for x0, y0, dx, dy in passes:
                pw, ph = max(0, math.ceil((width - x0) / dx)), max(0, math.ceil((height - y0) / dy))
                if pw and ph:
                    expected += ph * (1 + math.ceil(pw * bits / 8))
        elif kind == b"IDAT" and expected is not None and total < expected:
            try:
                chunk = inflater.decompress(body, 1 << 20)
                total += len(chunk)
                while inflater.unconsumed_tail and total < expected:
                    total += len(inflater.decompress(inflater.unconsumed_tail, 1 << 20))
            except zlib.error as exc:
                raise _truncated(label, f"PNG image data: {exc}") from None
        elif kind == b"IEND":
            break
        pos += 12 + length
    if expected is not None and total < expected:
        raise _truncated(label, f"PNG image data holds {total:,} of the {expected:,} bytes its "
                                f"header declares; rows are missing")


def _check_tiff_rows(img: Image.Image, data: bytes, label: str) -> None:
    """Refuse a TIFF whose strip (or tile) table does not cover every row of its header, or points
    past the end of the file; PIL pads the missing rows with black."""
    tags = img.tag_v2
    # the header's own size: Pillow reports the size after the Orientation tag (5-8 swap the sides)
    width, height = int(tags.get(256, img.size[0])), int(tags.get(257, img.size[1]))
    tiled = 322 in tags and 323 in tags
    if tiled:
        tw, th = int(tags[322]), int(tags[323])
        need, offsets, counts = math.ceil(width / tw) * math.ceil(height / th), tags.get(324), tags.get(325)
    else:
        rows = min(int(tags.get(278, height) or height), height)
        need, offsets, counts = math.ceil(height / max(rows, 1)), tags.get(273), tags.get(279)
    if int(tags.get(284, 1) or 1) == 2:  # planar: one set of strips per sample
        need *= int(tags.get(277, 1) or 1)
    offsets = list(offsets or []) if not isinstance(offsets, int) else [offsets]
    counts = list(counts or []) if not isinstance(counts, int) else [counts]
    if len(offsets) < need or (counts and len(counts) < need):
        raise _truncated(label, f"TIFF has {len(offsets)} of the {need} strips its {width}x{height} header needs; "
                                "rows are missing")
    if counts and any(c <= 0 or o + c > len(data) for o, c in zip(offsets, counts)):
        raise _truncated(label, "TIFF strips point past the end of the file")
    if counts and int(tags.get(259, 1) or 1) == 1 and not tiled:  # uncompressed: every row's bytes are there
        bits = sum(tags.get(258, (1,))) if isinstance(tags.get(258), tuple) else int(tags.get(258, 1))  # TIFF default: 1
        row_bytes = math.ceil(width * bits / 8)
        for i, count in enumerate(counts[:need]):
            rows_here = min(rows, height - i * rows)
            if count < rows_here * row_bytes:
                raise _truncated(label, f"TIFF strip {i} holds {count:,} of {rows_here * row_bytes:,} bytes")


def _reduce(img: Image.Image, factor: int) -> Image.Image:
    """Box-reduce a decoded PIL image by an integer factor (gray first for modes `reduce` lacks)."""
    if img.mode not in _REDUCIBLE_MODES:
        gray = _pil_to_gray(img)
        img = Image.fromarray(gray if gray.dtype != np.uint16 else gray.astype(np.int32),
                              mode=None)
    return img.reduce(factor)


#: PIL mode -> bit depth reported in metadata.
_MODE_DEPTH = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}


def _pil_to_gray(img: Image.Image) -> np.ndarray:
    """Convert any PIL image to a 2-D array, keeping 16/32-bit depth where the file has it."""
    mode = img.mode
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16, copy=False)  # I;16B is big-endian: make it native
    if mode == "I":
        return np.asarray(img, dtype=np.int32)
    if mode == "F":
        return np.asarray(img, dtype=np.float32)
    if mode == "1":
        img = img.convert("L")
    elif mode in ("P", "PA"):
        img = img.convert("RGBA" if ("transparency" in img.info or mode == "PA") else "RGB")
    if img.mode in ("LA", "La", "RGBA", "RGBa"):
        # Composite transparency onto black: a mammogram's background is black.
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    if img.mode not in ("L", "RGB", "RGBA"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB...: through RGB, as PIL displays them
    if img.mode != "L":
        img = img.convert("L")  # ITU-R 601-2 luma
    return np.asarray(img, dtype=np.uint8)


#: File signatures of the formats read through PIL: a file that starts with one but that PIL cannot open
#: is a damaged or unsupported file of that format, not "not an image".
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
               (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"), (b"BM", "BMP"))


def _sniff_format(data: bytes) -> str | None:
    return next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)


def _exif_orientation(img: Image.Image) -> int:
    """The EXIF Orientation of a loaded image (1 when absent or unreadable); Pillow has already applied and
    removed a TIFF's own Orientation tag at load."""
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1) or 1)
    except Exception:  # a damaged EXIF block: shown as stored, as viewers do
        return 1


def _decode_pil(data: bytes, label: str) -> LoadedImage:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Truncated files must fail, never be padded with grey; this switch is process-wide.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True; it must stay False.")
    try:
        with Image.open(BytesIO(data), formats=PIL_FORMATS) as img:
            width, height = img.size
            check_size(width, height, label)  # from the header, before any pixel is decoded
            fmt, mode = img.format, img.mode
            if fmt == "PNG":
                _check_png_rows(data, label)
            elif fmt == "TIFF":
                _check_tiff_rows(img, data, label)
            factor = reduction_factor(width, height)
            if factor > 1 and fmt == "JPEG":
                # libjpeg decodes at 1/2, 1/4 or 1/8 scale directly: the full image never exists.
                img.draft(img.mode if img.mode in ("L", "RGB") else None,
                          (math.ceil(width / factor), math.ceil(height / factor)))
            img.load()  # decode now, so a truncated file fails here (LOAD_TRUNCATED_IMAGES is off)
            orientation = _exif_orientation(img)
            if orientation != 1:  # turn it as viewers show it (Pillow already did it for TIFF)
                ImageOps.exif_transpose(img, in_place=True)
                if orientation in (5, 6, 7, 8):  # a quarter turn: report the size as shown
                    width, height = height, width
            decoded = img.size
            factor = reduction_factor(*img.size)
            reduced = _reduce(img, factor) if factor > 1 else img
            array = _pil_to_gray(reduced)
            out_w, out_h = reduced.size
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        known = _sniff_format(data)
        if known is not None:
            variant = (" or it is a TIFF variant this tool does not read (e.g. 64-bit or 16-bit float, planar colour)"
                       if known == "TIFF" else "")
            raise ImageReadError(
                f"{label}: a {known} file that cannot be read: its header is damaged or truncated{variant}; "
                "export it again, e.g. as an 8- or 16-bit grayscale PNG."
            ) from None
        if label.lower().endswith(_DICOM_SUFFIXES):
            raise ImageReadError(
                f"{label}: named as DICOM but has no DICOM Part 10 header ('DICM' at byte 128); "
                "re-export it as a standard DICOM file."
            ) from None
        raise ImageReadError(
            f"{label}: not a readable image (the content is not PNG, JPEG, TIFF, BMP or DICOM)."
        ) from None
    except Image.DecompressionBombError:
        raise ImageReadError(
            f"{label}: image dimensions are over the limit of {MAX_PIXELS:,} pixels; refusing it as a "
            "possible decompression bomb."
        ) from None
    except MemoryError:
        raise ImageReadError(f"{label}: image is too large to decode in the available memory.") from None
    except Exception as exc:  # PIL plugins raise OSError, SyntaxError, ValueError, struct.error...
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__  # one line, whatever the plugin said
        raise ImageReadError(f"{label}: image data is damaged or truncated ({detail}).") from None
    if array.shape != (out_h, out_w):
        raise ImageReadError(f"{label}: decoded to shape {array.shape}, expected ({out_h}, {out_w}).")
    metadata = {"format": fmt, "mode": mode, "width": width, "height": height, "bit_depth": _MODE_DEPTH.get(mode, 8)}
    if (out_w, out_h) != (width, height):
        metadata.update(reduced_width=out_w, reduced_height=out_h,
                        reduced_by=round(max(width / out_w, height / out_h), 3),
                        reduced_how="JPEG scaled decode" if decoded != (width, height) else "box reduce")
    return LoadedImage(pixels=to_uint8(array), metadata=metadata)


def load_image(source: Source, *, name: str | None = None) -> LoadedImage:
    """Decode a path or bytes into a 2-D uint8 grayscale image.

    Args:
        source: a file path, or the file's bytes (an upload).
        name: how to name the source in error messages (defaults to the path, or "<upload>").

    Returns:
        LoadedImage with `pixels` (H, W) uint8 and technical `metadata`.

    Raises:
        ImageReadError: empty, truncated, unreadable, too large or too small input.

    Example:
        >>> loaded = load_image("scan.dcm")          # doctest: +SKIP
        >>> loaded.pixels.shape, loaded.metadata["format"]  # doctest: +SKIP
        ((4084, 3328), 'DICOM')
    """
    data, label = _read_source(source, name)
    if not data:
        raise ImageReadError(f"{label}: file is empty (0 bytes).")
    if is_dicom_bytes(data):
        from mammo_core.io.dicom import decode_dicom  # pydicom is imported only when a DICOM arrives

        return decode_dicom(data, label)
    return _decode_pil(data, label)


def resize_for_model(pixels: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Resize a 2-D uint8 image to size x size (aspect not kept, see module docstring)."""
    if pixels.shape == (size, size):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR), dtype=np.uint8)

