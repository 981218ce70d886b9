"""A study's images as the PACS path sees them: which ones are scored, and their breast and view.

Only for-presentation mammograms are scored (Modality MG, not a "For Processing" SOP class nor
Presentation Intent Type "FOR PROCESSING"). Laterality comes from Image Laterality, else the
series' Laterality; the view from View Position, else the View Code Sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset

from .vocabulary import FOR_PRESENTATION, FOR_PROCESSING_SOP_CLASSES, MG_MODALITY

#: View Code Sequence values (SNOMED CT and the older SNOMED-RT) -> View Position abbreviations.
_VIEW_CODES = {
    "399162004": "CC", "R-10242": "CC",
    "399368009": "MLO", "R-10226": "MLO",
    "399260004": "ML", "R-10224": "ML",
    "399352003": "LM", "R-10230": "LM",
    "399099002": "XCCL", "R-1024A": "XCCL",
}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class StudyImage:
    """One image of a study: its UIDs, breast and view, its header (no pixels) and its Part 10 bytes."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    laterality: str | None
    view: str | None
    header: Dataset = field(repr=False)
    data: bytes | None = field(default=None, repr=False)
    error: str | None = None  # why `data` could not be retrieved

    @property
    def label(self) -> str:
        """How messages and JSON name the image: breast-view and SOP Instance UID, never a patient identifier."""
        return f"{self.laterality or '?'}-{self.view or '?'} instance {self.sop_uid}"


def laterality_of(ds: Dataset) -> str | None:
    """'L', 'R' or None (unknown, or 'B' for both breasts on one image)."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return value
    return None


def view_of(ds: Dataset) -> str | None:
    """'CC', 'MLO', ... from View Position, else from the View Code Sequence; None when neither says."""
    value = str(ds.get("ViewPosition", "") or "").strip().upper()
    if value:
        return value
    seq = ds.get("ViewCodeSequence")
    if seq:
        return _VIEW_CODES.get(str(seq[0].get("CodeValue", "")).strip())
    return None


def skip_reason(ds: Dataset) -> str | None:
    """Why an instance is not scored (None when it is a for-presentation mammogram)."""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality != MG_MODALITY:
        return f"modality {modality or 'missing'}, not {MG_MODALITY}"
    if str(ds.get("SOPClassUID", "")) in FOR_PROCESSING_SOP_CLASSES:
        return "a For Processing image"
    intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
    if intent and intent != FOR_PRESENTATION:
        return f"presentation intent {intent}"
    return None


def header_only(ds: Dataset) -> Dataset:
    """A copy of `ds` without pixel data (for SR evidence and references)."""
    out = Dataset()
    out.update({elem.tag: elem for elem in ds if elem.keyword not in _PIXEL_KEYWORDS})
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    return out


def image_from_dataset(ds: Dataset, data: bytes | None = None) -> StudyImage:
    """A StudyImage from a dataset (a whole instance, or a header when `data` is given separately)."""
    if data is None and any(k in ds for k in _PIXEL_KEYWORDS):
        data = to_part10(ds)
    return StudyImage(
        study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID), sop_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.get("SOPClassUID", "")), laterality=laterality_of(ds), view=view_of(ds),
        header=header_only(ds), data=data,
    )


def image_from_bytes(data: bytes) -> StudyImage:
    """A StudyImage from DICOM Part 10 bytes (e.g. a file a listener received)."""
    from mammo_core.io.dicom import quiet_value_checks

    quiet_value_checks()  # no header bytes (a patient's name) in pydicom's warnings for a damaged file
    return image_from_dataset(dcmread(BytesIO(data), stop_before_pixels=True), data=data)


def to_part10(ds: Dataset) -> bytes:
    """Serialise a dataset as a DICOM Part 10 file (what `io.images.load_image` reads)."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def sort_study(received: Iterable[tuple[str, bytes]]) -> tuple[list[StudyImage], list[str]]:
    """The images of a study to score, in a stable order (laterality, view, SOP UID), and one line per
    instance left out: an unreadable header (`name` says which), or not an MG image for presentation."""
    images: list[StudyImage] = []
    skipped: list[str] = []
    for name, data in received:
        try:
            image = image_from_bytes(data)
        except Exception as exc:  # pydicom raises many types on a damaged header
            skipped.append(f"{name}: unreadable DICOM header ({type(exc).__name__}).")
            continue
        reason = skip_reason(image.header)
        if reason:
            skipped.append(f"instance {image.sop_uid}: not scored ({reason}).")
        else:
            images.append(image)
    images.sort(key=lambda im: (im.laterality or "~", im.view or "~", im.sop_uid))
    return images, skipped
