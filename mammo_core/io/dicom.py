"""Decode a DICOM Part 10 file into a 2-D 8-bit grayscale image with technical metadata only.

The display pipeline follows the DICOM standard (PS3.3 C.11 and C.7.6.3.1.2):

    stored values -> Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence)
                  -> VOI (VOI LUT Sequence, else Window Center/Width, else min-max)
                  -> 0..255, inverted when Photometric Interpretation is MONOCHROME1.

8-bit rule (shared with `io.pixels.to_uint8`): the VOI output range (the window's output range, or
the VOI LUT's own data range) maps linearly to 0..255; with no VOI in the file the image's own
minimum and maximum map to 0 and 255, except that 8-bit data without a rescale is left unchanged.
The first window / VOI LUT is used when the file offers several; a VOI LUT wins over a window.

For 8- and 16-bit data the pipeline is computed once per possible stored value (at most 65,536
values) and then applied to the image as one lookup, so a 4000x3000 16-bit mammogram costs one
array index after decompression.

Bounded memory: an image whose longer side exceeds `io.pixels.MAX_DECODE_SIDE` is block-averaged by
an integer factor straight after decompression (`downsample`), before the LUTs and everything
else, so later steps never hold more than 4096 x 4096 values.

Compressed transfer syntaxes are decoded by pydicom's plugins (RLE natively; JPEG baseline,
JPEG lossless, JPEG-LS and JPEG 2000 through pylibjpeg). pydicom is imported only when a DICOM
file arrives. The returned metadata never holds patient, study or institution identifiers:
only the fields listed in `_metadata`.
"""

from __future__ import annotations

import re
from io import BytesIO
from typing import TYPE_CHECKING, Any

import numpy as np

from mammo_core.errors import ImageReadError
from mammo_core.io.pixels import LoadedImage, check_size, reduction_factor, scale_to_uint8, to_uint8

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_PARTIAL_422", "YBR_ICT", "YBR_RCT")
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")
#: ITU-R 601-2 luma, the weights PIL's convert("L") uses, so colour DICOM matches colour PNG.
_LUMA = np.array([0.299, 0.587, 0.114])


def quiet_value_checks() -> None:
    """Turn pydicom's read-time value checks off (process-wide). They warn and log with the offending value,
    and in a damaged file a bad length makes that value the next few hundred bytes of the header: the
    patient's name and ID included. Every reader of untrusted DICOM bytes calls this first."""
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def decode_dicom(data: bytes, label: str) -> LoadedImage:
    """Decode DICOM Part 10 bytes into a 2-D uint8 image (see the module docstring for the rules).

    Args:
        data: the whole file, starting with the 128-byte preamble and 'DICM'.
        label: how to name the file in error messages.

    Returns:
        LoadedImage: `pixels` (Rows, Columns) uint8; `metadata` with technical fields only.

    Raises:
        ImageReadError: not DICOM, damaged, no pixel data, multi-frame, too large or too small,
            or a transfer syntax no installed decoder handles.
    """
    try:
        import pydicom
    except ImportError:  # pragma: no cover - pydicom is a requirement
        raise ImageReadError(
            f"{label}: reading DICOM needs the 'pydicom' package; install the requirements."
        ) from None

    from pydicom.errors import InvalidDicomError

    quiet_value_checks()
    try:
        ds = pydicom.dcmread(BytesIO(data), force=False)
    except InvalidDicomError:
        raise ImageReadError(f"{label}: not a DICOM Part 10 file (no valid file meta header).") from None
    except Exception as exc:  # pydicom raises many types on damaged headers
        raise ImageReadError(f"{label}: DICOM header is damaged or truncated ({_short(exc)}).") from None

    try:
        syntax = _check_header(ds, label)
        stored = _decode_pixels(ds, syntax, label)
        factor = reduction_factor(stored.shape[1], stored.shape[0])
        if factor > 1:
            stored = downsample(stored, factor)
        pixels, voi = _display(stored, ds, label)
        metadata = _metadata(ds, syntax, voi)
    except (ImageReadError, MemoryError):
        raise
    except Exception as exc:
        # pydicom reads elements when first used; a damaged one fails there. Its tag and the error's type
        # only: the error's text may quote the bytes read, which can be another element's (a patient's name).
        raise ImageReadError(f"{label}: DICOM header is damaged: {_where(exc)} could not be read "
                             f"({type(exc).__name__}).") from None
    if factor > 1:
        metadata.update(reduced_width=int(pixels.shape[1]), reduced_height=int(pixels.shape[0]), reduced_by=factor,
                        reduced_how="block mean after decode")
    return LoadedImage(pixels=np.ascontiguousarray(pixels), metadata=metadata)


def downsample(stored: np.ndarray, factor: int, block_rows: int = 64) -> np.ndarray:
    """Average `factor` x `factor` blocks of stored values, keeping the dtype (rounded), a few
    rows at a time so the float temporaries stay small. Edge rows/columns that do not fill a
    block are averaged over what there is. Works for (H, W) and (H, W, samples) arrays.

    Why by hand: skimage's `downscale_local_mean` would make a float64 copy of the whole image.
    """
    h, w = stored.shape[:2]
    oh, ow = -(-h // factor), -(-w // factor)
    out = np.empty((oh, ow, *stored.shape[2:]), dtype=stored.dtype)
    pad_w = ow * factor - w
    for top in range(0, oh, block_rows):
        rows = stored[top * factor:min(h, (top + block_rows) * factor)].astype(np.float32)
        n_out = -(-rows.shape[0] // factor)
        pad_h = n_out * factor - rows.shape[0]
        if pad_h or pad_w:  # edge blocks: repeat the last row/column so they average what is there
            rows = np.pad(rows, ((0, pad_h), (0, pad_w)) + ((0, 0),) * (rows.ndim - 2), mode="edge")
        blocks = rows.reshape(n_out, factor, ow, factor, *rows.shape[2:]).mean(axis=(1, 3))
        if np.issubdtype(stored.dtype, np.integer):
            info = np.iinfo(stored.dtype)
            blocks = np.clip(np.rint(blocks), info.min, info.max)
        out[top:top + n_out] = blocks.astype(stored.dtype)
    return out


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())  # plugin errors span several lines
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(exc: BaseException) -> str:
    """'element (gggg,eeee)' when pydicom's error names the element it was reading, else 'an element'."""
    found = re.search(r"\(([0-9A-Fa-f]{4}),\s*([0-9A-Fa-f]{4})\)", str(exc))
    return f"element ({found[1].upper()},{found[2].upper()})" if found else "an element"


def _cs_text(value: str) -> str:
    """A code string as messages quote it, or 'an invalid value' (in a damaged file it may run on into the
    elements after it, a patient's name among them)."""
    return f"'{value}'" if _CODE_STRING.fullmatch(value) else "an invalid value"


def _syntax_text(syntax: Any) -> str:
    if not getattr(syntax, "is_valid", False):  # a damaged length makes the UID swallow the header after it
        return "(an invalid Transfer Syntax UID)"
    name = getattr(syntax, "name", str(syntax))
    return f"'{name}'" if name == str(syntax) else f"'{name}' ({syntax})"


def _check_header(ds: "Dataset", label: str) -> Any:
    """Validate everything knowable before the pixels are decoded; return the transfer syntax UID."""
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if syntax is None:
        raise ImageReadError(
            f"{label}: DICOM header is damaged or incomplete (no Transfer Syntax UID in the file meta "
            "information)."
        )
    _check_holds_image(ds, label)
    _check_geometry(ds, label)
    _check_photometric(ds, label)
    if "PixelData" in ds:  # float pixel data is always native
        _check_decoder(syntax, label)
    return syntax


def _check_holds_image(ds: "Dataset", label: str) -> None:
    """Refuse a file whose elements could not be read, or that holds no pixel data (a report, a state)."""
    if len(ds) == 0:  # pydicom gives up silently on, e.g., a file cut inside compressed pixel data
        raise ImageReadError(f"{label}: DICOM file is damaged or truncated: no data elements could be read.")
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        if "SOPClassUID" not in ds or not any(k in ds for k in ("Rows", "Columns", "Modality")):
            raise ImageReadError(f"{label}: DICOM file is damaged or truncated: no image data could be read.")
        raise ImageReadError(
            f"{label}: DICOM file holds no image (no Pixel Data element); it may be a report, "
            "a presentation state or another non-image object. Export the mammogram image itself."
        )


def _check_geometry(ds: "Dataset", label: str) -> None:
    """One frame, valid Rows/Columns, and a size within the limits (before any pixel is decoded)."""
    frames = _int(ds.get("NumberOfFrames"), 1)
    if frames > 1:
        raise ImageReadError(
            f"{label}: DICOM file is multi-frame ({frames} frames, e.g. tomosynthesis or a cine); "
            "only single-frame 2-D mammograms are supported. Export one 2-D view (for tomosynthesis, "
            "the synthesized 2-D image)."
        )
    rows, columns = _int(ds.get("Rows"), 0), _int(ds.get("Columns"), 0)
    if rows <= 0 or columns <= 0:
        raise ImageReadError(f"{label}: DICOM header has no valid Rows/Columns, cannot read the image.")
    check_size(columns, rows, label)  # before any pixel is decoded: refuses bombs cheaply


def _check_photometric(ds: "Dataset", label: str) -> None:
    """Samples per pixel and photometric interpretation that agree; a grey image without the tag is read
    as MONOCHROME2 (and marked so)."""
    samples = _int(ds.get("SamplesPerPixel"), 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if samples not in (1, 3):
        raise ImageReadError(f"{label}: DICOM has {samples} samples per pixel; only 1 or 3 are supported.")
    if samples == 1 and not photometric:
        # A grey image without the tag: read it as MONOCHROME2 (the usual one) and say so in the metadata.
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.private_assumed_photometric = True  # a Python attribute, not a DICOM element: never written out
        photometric = "MONOCHROME2"
    if samples == 1 and photometric not in (*_MONOCHROME, "PALETTE COLOR"):
        raise ImageReadError(
            f"{label}: DICOM photometric interpretation {_cs_text(photometric) if photometric else 'missing'} is "
            "not supported for a single-sample image (expected MONOCHROME1 or MONOCHROME2)."
        )
    if samples == 3 and photometric not in _COLOUR:
        raise ImageReadError(
            f"{label}: DICOM header is inconsistent: 3 samples per pixel with photometric "
            f"interpretation {_cs_text(photometric)}."
        )


def _check_decoder(syntax: Any, label: str) -> None:
    """A pydicom decoder for the transfer syntax, with its plugin installed."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageReadError(
            f"{label}: DICOM transfer syntax {_syntax_text(syntax)} is not supported; re-export the "
            "file uncompressed or as JPEG, JPEG lossless, JPEG 2000 or RLE."
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        raise ImageReadError(
            f"{label}: DICOM transfer syntax {_syntax_text(syntax)} needs a decoder that is not "
            f"installed ({missing}); re-export the file uncompressed."
        )


def _uid_name(value: Any) -> str:
    from pydicom.uid import UID

    return UID(str(value)).name if value else ""


def _int(value: Any, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _decode_pixels(ds: "Dataset", syntax: Any, label: str) -> np.ndarray:
    from pydicom.uid import RLELossless

    if syntax == RLELossless:
        # pydicom's own RLE decoder rather than pylibjpeg-rle, which panics (in Rust, printing a backtrace on
        # stderr) on some damaged segments; a 12-megapixel mammogram costs about 0.4 s more.
        ds.pixel_array_options(decoding_plugin="pydicom")
    try:
        arr = ds.pixel_array
    except MemoryError:
        raise ImageReadError(f"{label}: DICOM image is too large to decode in the available memory.") from None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # decoders raise ValueError, RuntimeError, KeyError... on damaged data, and
        # Rust ones (pylibjpeg-rle) a PanicException, which is a BaseException
        raise ImageReadError(
            f"{label}: DICOM pixel data ({_syntax_text(syntax)}) is damaged or truncated and could not "
            f"be decoded ({_short(exc)})."
        ) from None
    expected = (ds.Rows, ds.Columns) if ds.get("SamplesPerPixel", 1) == 1 else (ds.Rows, ds.Columns, 3)
    if arr.shape != tuple(expected):
        raise ImageReadError(
            f"{label}: decoded DICOM pixels have shape {arr.shape}, expected {tuple(expected)}; the file "
            "is inconsistent."
        )
    return arr


# --- display pipeline ---------------------------------------------------------------------------


def _display(stored: np.ndarray, ds: "Dataset", label: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Stored values -> uint8 display values, and a description of the VOI step that was applied."""
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric not in _MONOCHROME:
        try:
            return _colour_to_gray(stored, ds), {"voi": "none (colour converted to luma)"}
        except Exception as exc:  # e.g. a damaged palette
            raise ImageReadError(f"{label}: DICOM colour data could not be converted ({_short(exc)}).") from None

    voi = _choose_voi(ds)
    if stored.dtype.kind in "ui" and stored.dtype.itemsize <= 2:
        # One lookup table over every representable stored value (<= 65,536 entries).
        unsigned = np.dtype(f"u{stored.dtype.itemsize}")
        domain = np.arange(2 ** (8 * stored.dtype.itemsize), dtype=unsigned).view(stored.dtype)
        present = (stored.min(), stored.max())
        lut, voi = _pipeline(domain, ds, voi, present, label)
        return lut[stored.view(unsigned)], voi
    pixels, voi = _pipeline(stored, ds, voi, None, label)
    return pixels, voi


def _choose_voi(ds: "Dataset") -> dict[str, Any]:
    sequence = ds.get("VOILUTSequence")
    if sequence and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]:
        return {"voi": "voi_lut"}
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        return {"voi": "window", "window_center": center, "window_width": width, "voi_function": function}
    return {"voi": "min-max"}


def _first(value: Any) -> float | None:
    """First value of a possibly multi-valued DS element (Window Center/Width), or None."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    if hasattr(value, "__len__"):  # MultiValue: several windows offered, use the first
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _pipeline(
    values: np.ndarray,
    ds: "Dataset",
    voi: dict[str, Any],
    present: tuple[Any, Any] | None,
    label: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply modality LUT, VOI and MONOCHROME1 inversion to `values`; return uint8 and the VOI used.

    `present` is the (min, max) stored value of the image when `values` is the lookup domain
    rather than the image itself; the min-max fallback then stretches over that range only.
    """
    from pydicom.pixels import apply_modality_lut, apply_windowing

    try:
        modality = _modality(values, ds, apply_modality_lut)
    except Exception as exc:  # the error's text would quote the value read
        raise ImageReadError(f"{label}: DICOM modality LUT / rescale is invalid (Rescale Slope/Intercept or the "
                             f"Modality LUT could not be read: {type(exc).__name__}).") from None

    out: np.ndarray | None = None
    if voi["voi"] == "voi_lut":
        try:
            out, low, high = _apply_voi_lut_sequence(modality, ds)
        except Exception:
            voi = {"voi": "min-max", "note": "invalid VOI LUT ignored"}
    elif voi["voi"] == "window":
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                out = apply_windowing(modality, ds)
                # The window's output range, found by probing far below and far above it.
                low, high = (float(v) for v in apply_windowing(np.array([-np.inf, np.inf]), ds))
        except Exception:  # e.g. width < 1 for LINEAR: the file's window is unusable
            out = None
            voi = {"voi": "min-max", "note": "invalid window ignored"}

    if out is None:  # min-max fallback, the same rule as imaging.to_uint8
        if modality.dtype == np.uint8 and _int(ds.get("BitsStored"), 8) >= 8:
            pixels = modality  # 8-bit data without rescale is used as stored, like an 8-bit PNG
            voi = {**voi, "voi": "none"}
        else:
            source = modality
            if present is not None:
                lo, hi = present
                in_image = (values >= lo) & (values <= hi)
                source = modality[in_image]
            low, high = (float(source.min()), float(source.max())) if source.size else (0.0, 0.0)
            pixels = scale_to_uint8(modality, low, high)
    else:
        pixels = scale_to_uint8(out, low, high)

    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        pixels = 255 - pixels  # MONOCHROME1: the minimum value is displayed white
    return pixels, voi


def _modality(values: np.ndarray, ds: "Dataset", apply_modality_lut: Any) -> np.ndarray:
    if not ds.get("ModalityLUTSequence"):
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope == 1.0 and intercept == 0.0:
            return values  # identity rescale: keep the dtype (8-bit data stays unstretched)
    return apply_modality_lut(values, ds)


def _apply_voi_lut_sequence(values: np.ndarray, ds: "Dataset") -> tuple[np.ndarray, float, float]:
    """Apply the first VOI LUT; return the output and the LUT's own data range.

    Done here rather than with pydicom's `apply_voi`: pydicom 3.0 indexes the LUT through an array
    of the LUT's *output* dtype, so an 8-bit LUT with more than 256 entries wraps around.
    """
    item = ds.VOILUTSequence[0]
    entries, first_map, depth = (int(v) for v in item.LUTDescriptor)
    entries = entries or 2**16
    element = item["LUTData"]
    if element.VR == "OW" or isinstance(element.value, (bytes, bytearray)):
        little = getattr(ds, "is_little_endian", True) is not False
        raw = bytes(element.value)
        lut = np.frombuffer(raw, dtype="<u2" if little else ">u2")[:entries].astype(np.float64)
    else:
        lut = np.asarray(element.value, dtype=np.float64).ravel()[:entries]
    if lut.size == 0:
        raise ValueError("empty VOI LUT")
    if depth < 16:
        lut = np.minimum(lut, 2**depth - 1)
    index = np.clip(np.rint(values.astype(np.float64)) - first_map, 0, lut.size - 1).astype(np.intp)
    return lut[index], float(lut.min()), float(lut.max())


def _colour_to_gray(stored: np.ndarray, ds: "Dataset") -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    rgb = apply_color_lut(stored, ds) if stored.ndim == 2 else stored
    gray = rgb.astype(np.float64) @ _LUMA
    if rgb.dtype == np.uint8:
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return to_uint8(gray)


def _metadata(ds: "Dataset", syntax: Any, voi: dict[str, Any]) -> dict[str, Any]:
    """Technical fields only. Nothing that identifies a patient, study, device or institution."""

    def code(keyword: str) -> str | None:
        # A code string (CS: capitals, digits, space, underscore, at most 16), else None: in a damaged file
        # the value may run on into the elements after it.
        value = str(ds.get(keyword) or "").strip()
        return value if _CODE_STRING.fullmatch(value) else None

    metadata: dict[str, Any] = {
        "format": "DICOM",
        "width": int(ds.Columns),
        "height": int(ds.Rows),
        "bit_depth": _int(ds.get("BitsStored"), _int(ds.get("BitsAllocated"), 0)),
        "photometric": str(ds.get("PhotometricInterpretation", "")).strip(),
        "transfer_syntax": str(getattr(syntax, "name", syntax)),
        "modality": code("Modality"),
        "view_position": code("ViewPosition"),
        "laterality": code("ImageLaterality") or code("Laterality"),
    }
    if getattr(ds, "private_assumed_photometric", False):
        metadata["photometric_assumed"] = True
    if code("PresentationIntentType") == "FOR PROCESSING" or "For Processing" in _uid_name(ds.get("SOPClassUID")):
        metadata["for_processing"] = True  # raw detector data, not the image a reader sees
    metadata.update(voi)
    return metadata
