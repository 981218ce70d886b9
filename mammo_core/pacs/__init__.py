"""The PACS round trip: pull a study over DICOMweb or DIMSE, score it by image, breast and exam, and push
back a DICOM Comprehensive SR (TID 1500) and Grad-CAM Secondary Captures into the same study.

Modules, one job each: `vocabulary` (codes and constants), `study` (which images are scored, their
breast and view), `dicomweb` and `dimse` (the two PACS clients), `scoring` (image, breast and exam
scores), `sr` and `sc` (the result objects), `roundtrip` (query, score, push), `listener` (a
storage SCP that scores studies routed to it) and `cli` (the `python -m mammo_core pacs` commands).
A research tool, not a diagnostic device: every result carries that disclaimer.
"""

from mammo_core.io.dicom import quiet_value_checks

from .errors import PacsError

# Datasets arrive from servers and peers (DICOMweb, C-GET, C-STORE) and are decoded by pydicom as they are
# read: its value checks would quote a damaged header, a patient's name among it, in warnings and logs.
quiet_value_checks()

__all__ = ["PacsError"]
