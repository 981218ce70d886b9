"""Turn any decoded mammogram into the model's input: find the breast, crop, orient, normalise, resize.

`prepare` is the one preprocessing that training, cross-validation, the CLI, the PACS path and the
app all call (through `prepare_for_model`), so a full-field DICOM, a scanned film, a JPEG export and
a dataset cut-out reach the network looking alike:

1. **Breast mask.** On a copy reduced to at most `WORK_SIDE` pixels and smoothed (Gaussian), Otsu's
   threshold picks bright tissue; hysteresis grows it down to the midpoint between the background
   level and Otsu's threshold, so the dimmer skin line and fatty tissue join it; the largest connected
   region, holes filled, is the breast. Burned-in letters, markers, scanner labels and rotation
   frames are separate regions and are dropped. Our own output (zero background, breast percentiles at
   `FLOOR` and `CEILING`) is returned unchanged, which makes `prepare` idempotent.
2. **Crop** to the mask's bounding box with a margin of `MARGIN` of its longer side.
3. **Orientation**: flipped left-right so the chest wall (the side holding more of the tissue) is on
   the left. Only a left-right flip is made; rotated inputs stay rotated, as the dataset's own copies are.
4. **Intensity**: inside the mask, the 1st and 99th percentiles are mapped linearly to `FLOOR` and
   `CEILING`, clipped; outside the mask is 0. A 12-bit DICOM (already windowed to 8 bits by
   `mammo_core.imaging`), a film scan and a dataset PNG land in the same range. No CLAHE: the dataset's
   images already had it (Huang & Lin), and applying it again would change them.
5. **Square**: the crop is padded to a square with background (`aspect="pad"`, the default, so the
   breast keeps its shape) or stretched (`aspect="stretch"`), then resized to `IMAGE_SIZE`.

Pure NumPy / SciPy / scikit-image; no TensorFlow. `Geometry` records crop, flip and padding so a map
over the model input (Grad-CAM) can be drawn back onto the original (`to_original`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from mammo_core.config import IMAGE_SIZE

__all__ = ["ASPECTS", "Geometry", "LEGACY", "PREPROCESSINGS", "PREPROCESSING_ID", "Prepared", "card_preprocessing",
           "model_input", "prepare", "prepare_for_model", "to_original"]

#: Longest side of the working copy on which the mask is found (speed; the crop uses full resolution).
WORK_SIDE: int = 512
#: Margin around the breast's bounding box, as a fraction of its longer side.
MARGIN: float = 0.02
#: Grey levels that the breast's 1st and 99th intensity percentiles are mapped to; background is 0.
FLOOR: int = 24
CEILING: int = 232
#: Below this fraction of the frame, no breast was found (the whole frame is used, with a warning).
MIN_BREAST_FRACTION: float = 0.03
#: Flip only when the right half holds this much more tissue than the left (see `prepare`).
FLIP_TOLERANCE: float = 1.05
ASPECTS: tuple[str, ...] = ("pad", "stretch")
DEFAULT_ASPECT = "pad"
#: Names this preprocessing in model cards and cache keys; change it whenever the output changes.
PREPROCESSING_ID = "breast-crop-v1"
#: The paper's pipeline: the whole frame stretched to 224x224 (`io.images.resize_for_model`). The paper-split
#: reproduction keeps it, and cards written before `PREPROCESSING_ID` existed used it.
LEGACY = "resize"
#: The breast crop stretched to square instead of padded (`aspect="stretch"`), kept to compare the two.
STRETCHED = "breast-crop-stretch-v1"
PREPROCESSINGS: tuple[str, ...] = (PREPROCESSING_ID, STRETCHED, LEGACY)
DESCRIPTIONS: dict[str, str] = {
    PREPROCESSING_ID: "breast found (Otsu + hysteresis, largest region), background and labels removed, cropped, "
                      "chest wall to the left, padded to square, resized to 224x224, breast intensities "
                      "1st/99th percentile -> 24/232 (mammo_core.preprocessing), scaled to [0, 1]",
    STRETCHED: "as breast-crop-v1, but the crop is stretched to square instead of padded",
    LEGACY: "grayscale, 8-bit, resized to 224x224 without keeping aspect (mammo_core.imaging), scaled to [0, 1]",
}
#: Card key naming the model's preprocessing.
CARD_KEY = "input_pipeline"


@dataclass(frozen=True)
class Geometry:
    """Where the model input came from in the original image.

    `crop` is (top, left, bottom, right) in original pixels (bottom/right exclusive); `flipped` says the
    crop was mirrored left-right; the (possibly flipped) crop was placed at (`pad_top`, `pad_left`) on a
    background canvas of `canvas` (rows, cols) pixels, which was resized to `size` x `size`.
    """

    original_shape: tuple[int, int]
    crop: tuple[int, int, int, int]
    flipped: bool
    canvas: tuple[int, int]
    pad_top: int
    pad_left: int
    size: int


@dataclass
class Prepared:
    """The model input (`pixels`, (size, size) uint8) with what was found on the way."""

    pixels: np.ndarray
    geometry: Geometry
    breast_found: bool
    breast_fraction: float  # of the original frame
    outline: np.ndarray = field(repr=False)  # (K, 2) row, col points of the mask outline, original coordinates
    warnings: list[str] = field(default_factory=list)


def _work_copy(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    h, w = pixels.shape
    scale = min(1.0, WORK_SIDE / max(h, w))
    if scale >= 1.0:
        return pixels.astype(np.float32), 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.BOX), dtype=np.float32), scale


def _largest_region(binary: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(binary)
    if n == 0:
        return binary
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))


def breast_mask(work: np.ndarray) -> np.ndarray:
    """Boolean breast mask of a (small) float grey image; see the module docstring, step 1."""
    from skimage.filters import apply_hysteresis_threshold, gaussian, threshold_otsu

    smooth = gaussian(work, sigma=max(1.0, max(work.shape) / 256), preserve_range=True)
    if float(smooth.max() - smooth.min()) < 1.0:
        return np.zeros(work.shape, dtype=bool)  # a flat frame holds no breast
    # exact zeros are padding (DICOM borders, rotation corners): they would pull Otsu's threshold down
    valid = smooth[work > 0] if (work > 0).mean() > 0.05 else smooth.ravel()
    high = threshold_otsu(valid)
    background = float(np.median(smooth[smooth <= high])) if (smooth <= high).any() else float(smooth.min())
    low = background + 0.5 * (high - background)
    return _largest_region(apply_hysteresis_threshold(smooth, low, high))


def _is_prepared(pixels: np.ndarray) -> bool:
    """True for an image that is already a model input of ours: zero background, breast in [FLOOR, 255]
    with its 1st and 99th percentiles at FLOOR and CEILING. `prepare` returns such an image unchanged."""
    inside = pixels[pixels > 0]
    if inside.size < MIN_BREAST_FRACTION * pixels.size or inside.min() < FLOOR:
        return False
    lo, hi = np.percentile(inside, (1, 99))
    return abs(lo - FLOOR) <= 1 and abs(hi - CEILING) <= 2


def _outline(mask: np.ndarray, scale: float) -> np.ndarray:
    from skimage.measure import find_contours

    if not mask.any():
        return np.zeros((0, 2), dtype=np.float32)
    contours = find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
    longest = max(contours, key=len) - 1.0
    return (longest / scale).astype(np.float32)


def prepare(pixels: np.ndarray, *, size: int = IMAGE_SIZE, aspect: str = DEFAULT_ASPECT) -> Prepared:
    """Model input for a 2-D uint8 grey mammogram of any size (see the module docstring).

    Never raises for image content: a frame where no breast is found is used whole (intensity still
    normalised) and `Prepared.warnings` says so.
    """
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got shape {pixels.shape} dtype {pixels.dtype}")
    h, w = pixels.shape
    if (h, w) == (size, size) and _is_prepared(pixels):
        return Prepared(pixels.copy(), Geometry((h, w), (0, 0, h, w), False, (h, w), 0, 0, size), True,
                        float((pixels > 0).mean()), _outline(_largest_region(pixels > 0), 1.0), [])
    work, scale = _work_copy(pixels)
    mask = breast_mask(work)
    fraction = float(mask.mean())
    warnings: list[str] = []
    found = fraction >= MIN_BREAST_FRACTION
    if not found:
        warnings.append("No breast tissue was found in this image; it was scored whole and the score means little.")
        mask = np.ones_like(mask)
    crop = _crop_box(mask, scale, (h, w))
    values, mask_crop, flipped = _cropped_and_oriented(pixels, mask, crop, found)
    canvas, canvas_mask, pad_top, pad_left = _padded(values, mask_crop, aspect)
    out = _resized_and_stretched(canvas, canvas_mask, size)
    geometry = Geometry((h, w), crop, flipped, canvas.shape, pad_top, pad_left, size)
    return Prepared(out, geometry, found, fraction if found else 0.0, _outline(mask if found else np.zeros_like(mask), scale),
                    warnings)


def _crop_box(mask: np.ndarray, scale: float, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) in the original frame of `shape` of the bounding box of `mask`, which
    is on the working copy `scale` times the original's size."""
    h, w = shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (int(rows[0] / scale), int(cols[0] / scale),
            min(h, int(np.ceil((rows[-1] + 1) / scale))), min(w, int(np.ceil((cols[-1] + 1) / scale))))


def _cropped_and_oriented(pixels: np.ndarray, mask: np.ndarray, crop: tuple[int, int, int, int],
                          found: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """The crop of `pixels` (float32) and of the mask at full resolution, flipped so that the chest wall
    is on the left; and whether it was flipped."""
    h, w = pixels.shape
    t, l, b, r = crop
    region = pixels[t:b, l:r]
    # the mask at full resolution (nearest), so that background is exactly zero in the output
    mask_crop = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST))[t:b, l:r] > 127
    values = region.astype(np.float32)
    # chest wall = the side with more tissue; a small tolerance keeps near-symmetric images as they are,
    # so that preparing our own output never flips it back
    col_mass = (mask_crop * values).sum(axis=0)
    half = col_mass.shape[0] // 2
    flipped = bool(found and col_mass[half + col_mass.shape[0] % 2:].sum() > FLIP_TOLERANCE * col_mass[:half].sum())
    if flipped:
        values, mask_crop = values[:, ::-1], mask_crop[:, ::-1]
    return values, mask_crop, flipped


def _padded(values: np.ndarray, mask_crop: np.ndarray, aspect: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The crop and its mask on a background canvas with the margin (square for "pad"); and the top and
    left padding."""
    ch, cw = values.shape
    # The margin is background added around the crop (not pixels taken from beyond it), so the output's
    # own bounding box plus margin is the whole output again: `prepare` is idempotent.
    if aspect == "pad":
        square = int(round(max(ch, cw) * (1 + 2 * MARGIN)))
        pad_top, pad_left = (square - ch) // 2, int(round(max(ch, cw) * MARGIN))  # chest wall to the left
        shape = (square, square)
    else:
        pad_top, pad_left = int(round(ch * MARGIN)), int(round(cw * MARGIN))
        shape = (ch + 2 * pad_top, cw + 2 * pad_left)
    canvas = np.zeros(shape, dtype=np.float32)
    canvas_mask = np.zeros(shape, dtype=bool)
    canvas[pad_top:pad_top + ch, pad_left:pad_left + cw] = values
    canvas_mask[pad_top:pad_top + ch, pad_left:pad_left + cw] = mask_crop
    return canvas, canvas_mask, pad_top, pad_left


def _resized_and_stretched(canvas: np.ndarray, canvas_mask: np.ndarray, size: int) -> np.ndarray:
    """The canvas resized to (size, size) uint8, breast stretched to [FLOOR, CEILING] at its 1st/99th
    percentiles, background exactly zero."""
    resized = np.asarray(Image.fromarray(canvas, mode="F").resize((size, size), Image.BILINEAR))
    resized_mask = np.asarray(Image.fromarray(canvas_mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)) >= 128
    # intensity last, on the output grid itself, so that our own output maps onto itself
    inside = resized[resized_mask]
    lo, hi = (np.percentile(inside, (1, 99)) if inside.size else (0.0, 255.0))
    stretch = (CEILING - FLOOR) / max(float(hi - lo), 1.0)
    return np.where(resized_mask, np.clip(np.rint(FLOOR + (resized - lo) * stretch), FLOOR, 255), 0).astype(np.uint8)


def prepare_for_model(pixels: np.ndarray, *, size: int = IMAGE_SIZE, aspect: str = DEFAULT_ASPECT) -> np.ndarray:
    """Just the (size, size) uint8 model input of `prepare`."""
    return prepare(pixels, size=size, aspect=aspect).pixels


def to_original(heatmap: np.ndarray, geometry: Geometry, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Draw a map over the model input back onto the original frame (undo resize, padding, flip and crop).

    `shape` (rows, cols) gives the output size (default: the original's); a display-sized shape keeps
    memory small for a 4000x3000 original. Outside the crop the map is 0.
    """
    oh, ow = geometry.original_shape
    rows, cols = shape or (oh, ow)
    t, l, b, r = geometry.crop
    # the canvas at original resolution, cut to the crop (float coordinates, then one resize)
    heat = np.asarray(heatmap, dtype=np.float32)
    n = heat.shape[0]
    ky, kx = n / geometry.canvas[0], n / geometry.canvas[1]
    box = (geometry.pad_left * kx, geometry.pad_top * ky, (geometry.pad_left + r - l) * kx, (geometry.pad_top + b - t) * ky)
    sy, sx = rows / oh, cols / ow
    th, tw = max(1, round((b - t) * sy)), max(1, round((r - l) * sx))
    part = np.asarray(Image.fromarray(heat, mode="F").resize((tw, th), Image.BILINEAR, box=box))
    if geometry.flipped:
        part = part[:, ::-1]
    out = np.zeros((rows, cols), dtype=np.float32)
    top, left = min(rows - 1, round(t * sy)), min(cols - 1, round(l * sx))
    out[top:top + th, left:left + tw] = part[: rows - top, : cols - left]
    return out


def model_input(pixels: np.ndarray, preprocessing: str = PREPROCESSING_ID) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE) uint8 model input of a decoded 2-D uint8 image, by preprocessing name."""
    if preprocessing in (PREPROCESSING_ID, STRETCHED):
        return prepare(pixels, aspect="pad" if preprocessing == PREPROCESSING_ID else "stretch").pixels
    if preprocessing == LEGACY:
        from mammo_core.io.images import resize_for_model

        return resize_for_model(pixels)
    raise ValueError(f"unknown preprocessing {preprocessing!r}; choose one of {', '.join(PREPROCESSINGS)}")


def card_preprocessing(card: dict) -> str:
    """The preprocessing a model was trained with: its card's `CARD_KEY`, else `LEGACY` (older cards)."""
    return str(card.get(CARD_KEY) or LEGACY)
