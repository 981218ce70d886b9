"""The PACS path's constants in one place: DICOM codes, SOP classes, disclaimer text, result series.

Standard codes come from pydicom's code dictionary (DCM, SCT, UCUM). Concepts that no standard
code names (the decision at the model's threshold, the threshold itself, the bounds of the
uncertainty interval, the out-of-distribution flag) use the private coding scheme `99MAMMO`
(PS3.16 allows local schemes whose designator starts with "99").
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

#: Burned into every Secondary Capture and written into every SR. ASCII: DICOM's default character
#: set and Pillow's bundled font have no em dash.
DISCLAIMER = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
MANUFACTURER = "mammo-assist (research software)"
DEFAULT_AET = "MAMMO_ASSIST"

#: Environment variables for PACS credentials, so passwords stay off command lines and out of logs.
ENV_URL = "MAMMO_PACS_URL"
ENV_USERNAME = "MAMMO_PACS_USERNAME"
ENV_PASSWORD = "MAMMO_PACS_PASSWORD"

#: How a breast's views combine into the breast score (see `scoring`).
BREAST_RULES = ("max", "mean")
DEFAULT_BREAST_RULE = "max"

#: Series numbers of the result series added to a study (one for the SCs, one for the SR).
SC_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
#: Longest side of the Grad-CAM Secondary Capture, in pixels (a reduced copy, not a full-size image).
SC_MAX_SIDE = 768

#: Images the tool scores: mammography, for presentation.
MG_MODALITY = "MG"
FOR_PRESENTATION = "FOR PRESENTATION"
#: "For Processing" SOP classes (raw detector data, never displayed or scored).
FOR_PROCESSING_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray Image Storage - For Processing
})

# --- SR concepts -------------------------------------------------------------------------------
PROBABILITY_OF_CANCER: Code = codes.DCM.ProbabilityOfCancer  # (111047, DCM, "Probability of cancer")
NO_UNITS: Code = codes.UCUM.NoUnits  # (1, UCUM, "no units")
COMMENT: Code = codes.DCM.Comment
MAMMOGRAPHY: Code = codes.SCT.Mammography
BREAST: Code = codes.SCT.Breast
BREAST_SITE: dict[str, Code] = {"L": codes.SCT.LeftBreast, "R": codes.SCT.RightBreast}
DECISION_VALUES: dict[str, Code] = {"benign": codes.SCT.Benign, "malignant": codes.SCT.Malignant}
YES, NO = codes.SCT.Yes, codes.SCT.No
DERIVATION: dict[str, Code] = {"max": codes.SCT.Maximum, "mean": codes.SCT.Mean}

PRIVATE_SCHEME = "99MAMMO"
DECISION = Code("DECISION", PRIVATE_SCHEME, "Decision at the model's threshold")
THRESHOLD = Code("THRESHOLD", PRIVATE_SCHEME, "Decision threshold")
INTERVAL_LOW = Code("PROB-LOW", PRIVATE_SCHEME, "Probability of cancer, lower bound of uncertainty interval")
INTERVAL_HIGH = Code("PROB-HIGH", PRIVATE_SCHEME, "Probability of cancer, upper bound of uncertainty interval")
IN_DISTRIBUTION = Code("IN-DISTRIBUTION", PRIVATE_SCHEME, "Image within the model's training distribution")
