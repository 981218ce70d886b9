"""Write (and read back) the study's Comprehensive SR: a TID 1500 measurement report of the scores.

One report per study holds a measurement group per image (with the Grad-CAM peak as a region on
the source image where the geometry allows), one per breast and one for the exam. Each group
gives the probability of malignancy as a numeric item (111047, DCM, "Probability of cancer") in
unit 1, the decision at the model card's threshold, the threshold, the algorithm (model name, and
its sha256 as the version), and when the prediction has them the uncertainty interval, the
out-of-distribution flag and the warnings. highdicom builds the document; patient and study
modules are copied from the source images because DICOM requires them.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from .scoring import ImageScore, StudyScore, heatmap_on_frame
from .vocabulary import (BREAST, COMMENT, DECISION, DECISION_VALUES, DERIVATION, DISCLAIMER, IN_DISTRIBUTION,
                         INTERVAL_HIGH, INTERVAL_LOW, MAMMOGRAPHY, MANUFACTURER, NO, NO_UNITS, PRIVATE_SCHEME,
                         PROBABILITY_OF_CANCER, SR_SERIES_NUMBER, THRESHOLD, YES)

_SIDE = {"L": Code("7771000", "SCT", "Left"), "R": Code("24028007", "SCT", "Right")}
#: Grad-CAM values at or above this fraction of the peak form the region reported around the peak.
CAM_REGION_LEVEL = 0.5
#: Longest side of the grid on which the region is located (finer than the 224x224 map is useless).
REGION_GRID = 512


def cam_region_box(heatmap: np.ndarray, rows: int, columns: int,
                   level: float = CAM_REGION_LEVEL) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1), in source-image pixel coordinates, of the Grad-CAM blob around its peak.

    `heatmap` covers the whole source frame at any size (each axis is scaled to rows x columns).
    The blob is the connected part of `heatmap >= level * peak` that holds the peak.
    """
    from scipy import ndimage

    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    labels, _ = ndimage.label(heatmap >= level * float(heatmap[peak]))
    ys, xs = np.nonzero(labels == labels[peak])
    sy, sx = rows / heatmap.shape[0], columns / heatmap.shape[1]
    return (float(xs.min() * sx), float(ys.min() * sy), float(min(columns, (xs.max() + 1) * sx)),
            float(min(rows, (ys.max() + 1) * sy)))


def _region(score: ImageScore) -> hd.sr.ImageRegion | None:
    """The Grad-CAM peak as a closed polyline on the source image, or None when the geometry does not allow it
    (no heatmap, a flat map, or decoded pixels that are not the source's full frame)."""
    pred, header = score.prediction, score.image.header
    if pred.heatmap is None or pred.image is None or "Rows" not in header or "Columns" not in header:
        return None
    rows, columns = int(header.Rows), int(header.Columns)
    if pred.image.pixels.shape != (rows, columns) or float(np.max(pred.heatmap)) <= 0.0:
        return None
    scale = min(1.0, REGION_GRID / max(rows, columns))  # locate the blob on a reduced grid, then scale up
    heatmap = heatmap_on_frame(pred, (max(1, round(rows * scale)), max(1, round(columns * scale))))
    if float(np.max(heatmap)) <= 0.0:
        return None
    x0, y0, x1, y1 = cam_region_box(heatmap, rows, columns)
    data = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)
    return hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=data,
                             source_image=hd.sr.SourceImageForRegion(score.image.sop_class_uid, score.image.sop_uid))


def _probability(value: float, **kwargs: Any) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=PROBABILITY_OF_CANCER, value=round(float(value), 6), unit=NO_UNITS, **kwargs)


def _comment(text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=COMMENT, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _image_group(score: ImageScore, algorithm: hd.sr.AlgorithmIdentification, threshold: float):
    pred, image = score.prediction, score.image
    measurements = [_probability(pred.probability), hd.sr.Measurement(name=THRESHOLD, value=threshold, unit=NO_UNITS)]
    interval = getattr(pred, "probability_interval", None)
    if interval is not None:
        measurements += [hd.sr.Measurement(name=INTERVAL_LOW, value=round(float(interval[0]), 6), unit=NO_UNITS),
                         hd.sr.Measurement(name=INTERVAL_HIGH, value=round(float(interval[1]), 6), unit=NO_UNITS)]
    evaluations = [hd.sr.QualitativeEvaluation(DECISION, DECISION_VALUES[pred.label])]
    flag = getattr(pred, "in_distribution", None)
    if flag is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(IN_DISTRIBUTION, YES if flag else NO))
    common = dict(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"image {image.laterality or '?'}-"
                                                     f"{image.view or '?'}"),
        algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=evaluations,
        finding_sites=[_site(image.laterality)],
    )
    region = _region(score)
    if region is not None:
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)
    else:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            source_images=[hd.sr.SourceImageForMeasurementGroup(image.sop_class_uid, image.sop_uid)], **common)
    for warning in getattr(pred, "warnings", None) or []:
        group[0].ContentSequence.append(_comment(f"warning: {warning}"))
    return group


def _site(laterality: str | None) -> hd.sr.FindingSite:
    return hd.sr.FindingSite(BREAST, laterality=_SIDE[laterality]) if laterality in _SIDE else hd.sr.FindingSite(BREAST)


def _summary_group(identifier: str, probability: float, label: str, images: list[ImageScore], rule: str,
                   algorithm: hd.sr.AlgorithmIdentification, threshold: float, laterality: str | None):
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=identifier),
        algorithm_id=algorithm, finding_sites=[_site(laterality)],
        measurements=[_probability(probability, derivation=DERIVATION[rule]),
                      hd.sr.Measurement(name=THRESHOLD, value=threshold, unit=NO_UNITS)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(DECISION, DECISION_VALUES[label])],
        source_images=[hd.sr.SourceImageForMeasurementGroup(s.image.sop_class_uid, s.image.sop_uid) for s in images],
    )


def build_report(score: StudyScore, *, series_uid: str, instance_number: int = 1) -> hd.sr.ComprehensiveSR:
    """The study's Comprehensive SR (TID 1500). Raises ValueError when no image of the study was scored."""
    scored = score.scored
    if not scored or score.exam_probability is None:
        raise ValueError(f"study {score.study_uid}: no image was scored; there is nothing to report.")
    algorithm = hd.sr.AlgorithmIdentification(name=score.model[:64], version=score.model_sha256[:64] or "unknown",
                                              parameters=[f"threshold {score.threshold:g}", f"breast rule {score.rule}"])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=score.model[:64], manufacturer_name=MANUFACTURER, model_name=score.model[:64]))
    groups: list[Any] = [_image_group(s, algorithm, score.threshold) for s in scored]
    for b in score.breasts:
        groups.append(_summary_group(f"breast {b.laterality}", b.probability, b.label, b.images, score.rule,
                                     algorithm, score.threshold, b.laterality))
    exam_rule = "max" if score.breasts else score.rule
    exam = _summary_group("exam", score.exam_probability, score.exam_label, scored, exam_rule, algorithm,
                          score.threshold, None)
    exam[0].ContentSequence.append(_comment(DISCLAIMER))
    groups.append(exam)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=None, observer_device_context=observer),
        procedure_reported=MAMMOGRAPHY, imaging_measurements=groups)
    sr = hd.sr.ComprehensiveSR(
        evidence=[s.image.header for s in scored], content=report[0], series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=instance_number,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description=f"AI scores: {DISCLAIMER}"[:64],
    )
    scheme = Dataset()  # declares the local coding scheme (PS3.3 C.12.1.1.4)
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "mammo-assist local concepts"
    scheme.CodingSchemeResponsibleOrganization = "mammo-assist project"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _walk(items) -> Any:
    for item in items or []:
        yield item
        yield from _walk(item.get("ContentSequence"))


def _text(group, code_value: str) -> list[str]:
    return [str(i.TextValue) for i in _walk(group[0].get("ContentSequence"))
            if i.get("ValueType") == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == code_value]


def read_report(dataset: Dataset) -> dict[str, Any]:
    """Parse one of our SRs with highdicom into plain values (for tests, audits and viewers' checks).

    Returns a dict with "images" (by SOP Instance UID: probability, label, threshold, region,
    interval, in_distribution, warnings), "breasts" (by laterality), "exam", "algorithm" (name,
    version) and "comments".
    """
    sr = hd.sr.ComprehensiveSR.from_dataset(dataset)
    report = sr.content
    out: dict[str, Any] = {"images": {}, "breasts": {}, "exam": None, "algorithm": None, "comments": []}
    groups = (list(report.get_planar_roi_measurement_groups()) + list(report.get_image_measurement_groups()))
    for group in groups:
        names = {code: _text(group, code) for code in ("111001", "111003")}
        out["algorithm"] = out["algorithm"] or {"name": names["111001"][0], "version": names["111003"][0]}
        values = {}
        for m in group.get_measurements():
            values[(m.name.value, m.name.scheme_designator)] = float(m.value)
        decision = group.get_qualitative_evaluations(name=DECISION)
        flag = group.get_qualitative_evaluations(name=IN_DISTRIBUTION)
        entry: dict[str, Any] = {
            "probability": values[(PROBABILITY_OF_CANCER.value, PROBABILITY_OF_CANCER.scheme_designator)],
            "threshold": values.get((THRESHOLD.value, THRESHOLD.scheme_designator)),
            "label": decision[0].value.meaning.lower() if decision else None,
        }
        low = values.get((INTERVAL_LOW.value, INTERVAL_LOW.scheme_designator))
        if low is not None:
            entry["interval"] = (low, values[(INTERVAL_HIGH.value, INTERVAL_HIGH.scheme_designator)])
        if flag:
            entry["in_distribution"] = flag[0].value.value == YES.value
        comments = _text(group, COMMENT.value)
        entry["warnings"] = [c[len("warning: "):] for c in comments if c.startswith("warning: ")]
        out["comments"] += comments
        ident = group.tracking_identifier or ""
        if ident.startswith("image"):
            if isinstance(group, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations):
                roi = group.roi
                uid = roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                entry["region"] = np.asarray(roi.value).tolist()
            else:
                uid = group.source_images[0].referenced_sop_instance_uid
                entry["region"] = None
            out["images"][uid] = entry
        elif ident.startswith("breast"):
            out["breasts"][ident.split()[-1]] = entry
        elif ident == "exam":
            out["exam"] = entry
    return out
