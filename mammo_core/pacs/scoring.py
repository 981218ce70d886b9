"""Score a study's mammograms, then each breast from its views and the exam from its breasts.

A radiologist reads a breast and an exam, not one view. The breast score combines the
probabilities of that breast's images by a rule (`max`, the default, or `mean`); the exam score
is the higher breast score. Images whose laterality is unknown are scored and reported but
belong to no breast. The default rule was not chosen on breast-level cross-validation (see
docs/PACS.md): `max` is the conservative choice, flagging a breast when any view looks malignant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from mammo_core.inference.predict import Prediction
from .study import StudyImage
from .vocabulary import BREAST_RULES, DEFAULT_BREAST_RULE


@dataclass
class ImageScore:
    """One image and its prediction (`prediction.error` set when it could not be scored)."""

    image: StudyImage
    prediction: Prediction

    @property
    def ok(self) -> bool:
        return self.prediction.error is None


@dataclass
class BreastScore:
    """One breast's score from the probabilities of its scored images."""

    laterality: str
    probability: float
    label: str
    images: list[ImageScore]

    @property
    def views(self) -> list[str]:
        return sorted({s.image.view or "?" for s in self.images})


@dataclass
class StudyScore:
    """Every image of one study, its breasts and the exam (None when nothing could be scored)."""

    study_uid: str
    model: str
    model_sha256: str
    threshold: float
    rule: str
    images: list[ImageScore] = field(default_factory=list)
    breasts: list[BreastScore] = field(default_factory=list)
    exam_probability: float | None = None
    exam_label: str | None = None

    @property
    def scored(self) -> list[ImageScore]:
        return [s for s in self.images if s.ok]

    @property
    def errors(self) -> list[ImageScore]:
        return [s for s in self.images if not s.ok]


def combine(probabilities: Sequence[float], rule: str) -> float:
    """Combine view probabilities into a breast probability by `rule` ('max' or 'mean')."""
    if rule not in BREAST_RULES:
        raise ValueError(f"breast rule must be one of {BREAST_RULES}, got {rule!r}")
    if not probabilities:
        raise ValueError("no probabilities to combine")
    values = np.asarray(probabilities, dtype=np.float64)
    return float(values.max() if rule == "max" else values.mean())


def score_study(predictor: Any, study_uid: str, images: Iterable[StudyImage], *,
                rule: str = DEFAULT_BREAST_RULE, with_cam: bool = True) -> StudyScore:
    """Score every image (one bad image never stops the rest), then each breast and the exam.

    Args:
        predictor: a loaded `mammo_core.inference.predict.Predictor`.
        study_uid: the study's Study Instance UID.
        images: the study's for-presentation mammograms, with their Part 10 bytes.
        rule: how a breast's views are combined ('max' or 'mean').
        with_cam: compute Grad-CAM heatmaps (needed for the Secondary Captures and the SR regions).
    """
    combine([0.0], rule)  # validate the rule before any work
    images = list(images)
    result = StudyScore(study_uid=study_uid, model=predictor.name, model_sha256=predictor.model_sha256,
                        threshold=predictor.threshold, rule=rule)
    missing = [im for im in images if im.data is None]
    present = [im for im in images if im.data is not None]
    preds = predictor.score_many([(im.data, im.label) for im in present], with_cam=with_cam, keep_images=True)
    result.images = [ImageScore(im, pred) for im, pred in zip(present, preds, strict=True)]
    for im in missing:
        result.images.append(ImageScore(im, Prediction(name=im.label, error=im.error or f"{im.label}: could not be retrieved.")))
    for side in ("R", "L"):
        mine = [s for s in result.scored if s.image.laterality == side]
        if mine:
            p = combine([s.prediction.probability for s in mine], rule)
            result.breasts.append(BreastScore(side, p, predictor.decision(p), mine))
    if result.breasts:
        result.exam_probability = max(b.probability for b in result.breasts)
    elif result.scored:  # no laterality anywhere: the exam is the rule over every scored image
        result.exam_probability = combine([s.prediction.probability for s in result.scored], rule)
    if result.exam_probability is not None:
        result.exam_label = predictor.decision(result.exam_probability)
    return result


def heatmap_on_frame(prediction: Any, shape: tuple[int, int]) -> np.ndarray:
    """The Grad-CAM heatmap over the decoded original frame, at `shape` (rows, columns).

    Uses `Prediction.heatmap_on_original` (which undoes the breast crop and flip) when the
    Prediction has it; otherwise the model saw the whole frame stretched, so the map is stretched back.
    """
    mapper = getattr(prediction, "heatmap_on_original", None)
    if mapper is not None:
        return np.asarray(mapper(tuple(shape)), dtype=np.float32)
    from PIL import Image

    rows, cols = shape
    return np.asarray(Image.fromarray(prediction.heatmap.astype(np.float32), mode="F").resize((cols, rows), Image.BILINEAR))


def json_records(score: StudyScore) -> list[dict[str, Any]]:
    """One record per image (as `predict --json`, plus study, laterality, view and SOP Instance UID),
    one per breast and one for the exam. No patient identifiers."""
    records: list[dict[str, Any]] = []
    for s in score.images:
        im, pred = s.image, s.prediction
        # `Prediction.to_json` is what `predict --json` prints; the PACS path adds where the image sits.
        records.append({**pred.to_json(score.model), "level": "image", "study": score.study_uid,
                        "sop_instance_uid": im.sop_uid, "laterality": im.laterality, "view": im.view})
    for b in score.breasts:
        records.append({"level": "breast", "study": score.study_uid, "laterality": b.laterality,
                        "probability": round(b.probability, 6), "label": b.label, "threshold": score.threshold,
                        "model": score.model, "rule": score.rule, "views": b.views, "n_images": len(b.images)})
    if score.exam_probability is not None:
        records.append({"level": "exam", "study": score.study_uid, "probability": round(score.exam_probability, 6),
                        "label": score.exam_label, "threshold": score.threshold, "model": score.model,
                        "rule": f"highest breast ({score.rule} of views)" if score.breasts else f"{score.rule} of images",
                        "breasts": {b.laterality: round(b.probability, 6) for b in score.breasts},
                        "n_images": len(score.scored)})
    return records
