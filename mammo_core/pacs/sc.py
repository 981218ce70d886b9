"""Write a Grad-CAM Secondary Capture for one scored image: the overlay at a reduced size, with the
research-use disclaimer and the score burned into the pixels, referencing the source image.

highdicom builds the SC (patient and study modules copied from the source, as DICOM requires);
the pixels come from `explain.overlay`, the same overlay the app and `predict --gradcam` draw.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from mammo_core.inference.explain import overlay
from .scoring import ImageScore, heatmap_on_frame
from .vocabulary import DISCLAIMER, MANUFACTURER, SC_MAX_SIDE, SC_SERIES_NUMBER


def reduced(pixels: np.ndarray, max_side: int = SC_MAX_SIDE) -> np.ndarray:
    """`pixels` shrunk (aspect kept) so the longest side is at most `max_side`."""
    rows, cols = pixels.shape[:2]
    scale = min(1.0, max_side / max(rows, cols))
    if scale == 1.0:
        return pixels
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.BILINEAR))


def _banner(width: int, lines: list[str]) -> np.ndarray:
    """A black band with white text lines, as wide as the image, sized to fit the first line."""
    size = max(10, width // 28)
    font = ImageFont.load_default(size=size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while size > 8 and probe.textlength(lines[0], font=font) > width - 8:
        size -= 1
        font = ImageFont.load_default(size=size)
    band = Image.new("RGB", (width, (size + 6) * len(lines) + 6), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for i, text in enumerate(lines):
        draw.text((4, 4 + i * (size + 6)), text, fill=(255, 255, 255) if i else (255, 220, 0), font=font)
    return np.asarray(band)


def capture_pixels(score: ImageScore, model_name: str) -> np.ndarray:
    """The SC's RGB pixels: the disclaimer and the score above the Grad-CAM overlay of the reduced image."""
    pred = score.prediction
    base = reduced(pred.image.pixels)
    picture = overlay(base, heatmap_on_frame(pred, base.shape))
    lines = [DISCLAIMER, f"Grad-CAM  P(malignant) {pred.probability:.3f}  {pred.label} at {pred.threshold:.3f}",
             f"model {model_name}"]
    return np.ascontiguousarray(np.concatenate([_banner(picture.shape[1], lines), picture], axis=0))


def build_capture(score: ImageScore, *, model_name: str, series_uid: str, instance_number: int) -> hd.sc.SCImage:
    """A Secondary Capture of one scored image's Grad-CAM overlay, in the source image's study.

    Args:
        score: a scored image (its prediction holds the decoded pixels and the heatmap).
        model_name: shown in the burned-in text and the series description.
        series_uid: the result series the SC belongs to (one per study).
        instance_number: its Instance Number in that series.
    """
    if not score.ok or score.prediction.heatmap is None or score.prediction.image is None:
        raise ValueError(f"{score.image.label}: no Grad-CAM to capture (not scored with_cam and keep_images).")
    source: Dataset = score.image.header
    orientation = source.get("PatientOrientation")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=capture_pixels(score, model_name),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        laterality=score.image.laterality,
        # highdicom accepts single-letter directions only; the source's own value is copied just below.
        patient_orientation=("A", "R"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"Grad-CAM {model_name}: {DISCLAIMER}"[:64],
    )
    # Resizing keeps the source's directions, so its Patient Orientation still holds (empty when unknown).
    sc.PatientOrientation = list(orientation) if orientation else None
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{DISCLAIMER}. Grad-CAM overlay of the source image at reduced size."
    sc.DerivationDescription = "Grad-CAM heatmap blended over the source image, reduced in size; text burned in"
    ref = Dataset()
    ref.ReferencedSOPClassUID = score.image.sop_class_uid
    ref.ReferencedSOPInstanceUID = score.image.sop_uid
    sc.SourceImageSequence = [ref]
    return sc
