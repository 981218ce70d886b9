"""The PACS round trip: pull a study over DICOMweb or DIMSE, score it by image, breast and exam, and push
back a DICOM Comprehensive SR (TID 1500) and Grad-CAM Secondary Captures into the same study.

Modules, one job each: `vocabulary` (codes and constants), `study` (which images are scored, their
breast and view), `dicomweb` and `dimse` (the two PACS clients), `scoring` (image, breast and exam
scores), `sr` and `sc` (the result objects), `roundtrip` (query, score, push), `listener` (a
storage SCP that scores studies routed to it) and `cli` (the `python -m mammo_core pacs` commands).
A research tool, not a diagnostic device: every result carries that disclaimer.
"""

from .errors import PacsError

__all__ = ["PacsError"]
