"""Breast- and exam-level AUC from the out-of-fold predictions of patient-grouped cross-validation.

A radiologist reads a breast and an exam, not one view. This module rebuilds both from an out-of-fold
table (`python -m mammo_core cv --group-by patient`): a source image's probability is the mean over its
augmented copies; a breast is (patient, laterality), scored from its views by the PACS path's rule
(`mammo_core.pacs.scoring.combine`: `max` or `mean`) and malignant when any of its images is; the exam
(the patient) is the higher breast score. AUC comes with a 95 % cluster bootstrap that resamples patients
(`mammo_core.evaluation.bootstrap.cluster_bootstrap`). The rule is chosen by breast-level AUC, on few breasts.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from mammo_core.config import DEFAULT_SEED, DEFAULT_THRESHOLD
from mammo_core.errors import DatasetError
from mammo_core.evaluation.bootstrap import cluster_bootstrap, point_metrics
from mammo_core.pacs.scoring import combine
from mammo_core.pacs.vocabulary import BREAST_RULES, DEFAULT_BREAST_RULE

#: Where the block lives in a model card.
CARD_KEY = "breast_level"
OOF_COLUMNS = ("group", "label", "probability")
PATIENT_COLUMNS = ("image_id", "patient_id", "laterality", "view")


def read_oof(path: str | Path) -> pd.DataFrame:
    """An out-of-fold table written by `training.cv.write_results` (path, group, patient, label, fold, probability, ...)."""
    try:
        table = pd.read_csv(path, dtype={"group": str, "patient": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DatasetError(f"{path}: cannot read the out-of-fold table ({exc}).") from None
    missing = [c for c in OOF_COLUMNS if c not in table]
    if missing:
        raise DatasetError(f"{path}: not an out-of-fold table (no column {', '.join(missing)}); "
                           "pass the oof_predictions.csv that `python -m mammo_core cv` wrote.")
    return table


def read_patients(path: str | Path) -> pd.DataFrame:
    """The dataset's patients.csv (image_id, patient_id, laterality L/R, view CC/ML, ...)."""
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DatasetError(f"{path}: cannot read the patient map ({exc}).") from None
    missing = [c for c in PATIENT_COLUMNS if c not in table]
    if missing:
        raise DatasetError(f"{path}: patient map lacks column {', '.join(missing)} (needs {', '.join(PATIENT_COLUMNS)}).")
    return table


def image_table(oof: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    """One row per source image: patient, laterality, view, label and the mean probability of its copies.

    Raises DatasetError when a source image has copies with different labels or is missing from the map.
    """
    oof = oof.assign(group=oof["group"].astype(str))
    per_image = oof.groupby("group", sort=True).agg(label=("label", "max"), label_min=("label", "min"),
                                                     probability=("probability", "mean"), copies=("label", "size"))
    mixed = per_image.index[per_image["label"] != per_image["label_min"]]
    if len(mixed):
        raise DatasetError(f"{len(mixed)} source image(s) have copies with different labels; the out-of-fold table is inconsistent.")
    mapping = patients.assign(image_id=patients["image_id"].astype(str)).drop_duplicates("image_id").set_index("image_id")
    unknown = per_image.index.difference(mapping.index)
    if len(unknown):
        raise DatasetError(f"{len(unknown)} source image(s) of the out-of-fold table are not in the patient map; "
                           "use the dataset's own patients.csv.")
    images = per_image.drop(columns="label_min").join(mapping[["patient_id", "laterality", "view"]])
    images["laterality"] = images["laterality"].str.strip().str.upper()
    images["view"] = images["view"].str.strip().str.upper()
    return images.rename(columns={"patient_id": "patient"}).rename_axis("image").reset_index()


def breast_table(images: pd.DataFrame, rule: str) -> pd.DataFrame:
    """One row per breast (patient, laterality): label = max of its images' labels, probability by `rule`.

    Images without a known laterality (not L or R) belong to no breast and are left out.
    """
    known = images[images["laterality"].isin(["L", "R"])]
    rows = [{"patient": patient, "laterality": side, "label": int(part["label"].max()),
             "probability": combine(part["probability"].tolist(), rule), "n_images": len(part),
             "views": "+".join(sorted(part["view"].astype(str).unique()))}
            for (patient, side), part in known.groupby(["patient", "laterality"], sort=True)]
    return pd.DataFrame(rows, columns=["patient", "laterality", "label", "probability", "n_images", "views"])


def exam_table(breasts: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: the higher breast score (as `score_study`), malignant when any breast is."""
    return (breasts.groupby("patient", sort=True).agg(label=("label", "max"), probability=("probability", "max"))
            .reset_index())


def _figures(labels: Sequence[int], probabilities: Sequence[float], patients: Sequence[Any], *,
             n_boot: int, seed: int, threshold: float) -> dict[str, Any]:
    point = point_metrics(np.asarray(labels), np.asarray(probabilities), threshold)
    ci = cluster_bootstrap(labels, probabilities, patients, n_boot=n_boot, seed=seed, threshold=threshold)
    out: dict[str, Any] = {}
    for metric, value in point.items():
        out[metric] = value
        out[f"{metric}_ci"] = ci[metric]
    out["n"] = int(len(labels))
    out["n_malignant"] = int(np.sum(np.asarray(labels) == 1))
    return out


def measure(oof: pd.DataFrame, patients: pd.DataFrame, *, rules: Sequence[str] = BREAST_RULES,
            n_boot: int = 2000, seed: int = DEFAULT_SEED, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Image-, breast- and exam-level figures of an out-of-fold table for each breast rule, and the rule chosen.

    Returns the card block: counts, per rule the breast and exam metrics with 95 % patient-bootstrap CIs,
    `chosen_rule` (highest breast AUC; the PACS default on a tie) and a note on how little it rests on.
    """
    images = image_table(oof, patients)
    img = _figures(images["label"], images["probability"], images["patient"], n_boot=n_boot, seed=seed, threshold=threshold)
    per_rule: dict[str, Any] = {}
    breasts = None
    for rule in rules:
        breasts = breast_table(images, rule)
        exams = exam_table(breasts)
        per_rule[rule] = {
            "breast": _figures(breasts["label"], breasts["probability"], breasts["patient"],
                               n_boot=n_boot, seed=seed, threshold=threshold),
            "exam": _figures(exams["label"], exams["probability"], exams["patient"],
                             n_boot=n_boot, seed=seed, threshold=threshold),
        }
    if breasts is None:
        raise ValueError(f"no breast rule given; choose from {BREAST_RULES}")
    aucs = {r: per_rule[r]["breast"]["auc"] for r in rules}
    best = max(aucs.values())
    tied = [r for r in rules if np.isclose(aucs[r], best, atol=1e-12)]
    chosen = DEFAULT_BREAST_RULE if DEFAULT_BREAST_RULE in tied else tied[0]
    others = ", ".join(f"{r} {aucs[r]:.3f}" for r in rules if r != chosen)
    n_breasts = len(breasts)
    n_malignant = int(breasts["label"].sum())
    cis = [per_rule[r]["breast"]["auc_ci"] for r in rules]
    overlap = max(lo for lo, _ in cis) <= min(hi for _, hi in cis)
    note = (f"`{chosen}` has the higher breast-level AUC ({aucs[chosen]:.3f}; {others or 'no other rule'}), but this "
            f"rests on {n_breasts} breasts ({n_malignant} malignant) of {breasts['patient'].nunique()} patients"
            + (" and the intervals overlap: the choice is weak evidence." if overlap else ": the choice is weak evidence."))
    return {
        "protocol": "out-of-fold predictions of patient-grouped cross-validation, rebuilt per source image, breast and exam",
        "image_probability": "mean of the calibrated out-of-fold probabilities of the source image's augmented copies",
        "breast": "(patient, laterality) from patients.csv; malignant when any of its images is; score = rule over its views",
        "exam": "the patient; malignant when any breast is; score = the higher breast score",
        "threshold": threshold,
        "confidence_intervals": f"95 % percentile cluster bootstrap, {n_boot} resamples of patients",
        "n_boot": n_boot, "seed": seed,
        "n_images": int(len(images)), "n_patients": int(images["patient"].nunique()),
        "n_breasts": n_breasts, "n_breasts_malignant": n_malignant,
        "n_breasts_both_views": int((breasts["n_images"] >= 2).sum()),
        "n_images_without_laterality": int((~images["laterality"].isin(["L", "R"])).sum()),
        "image_level": img,
        "rules": per_rule,
        "chosen_rule": chosen,
        "choice_note": note,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def copy_auc_matches(oof: pd.DataFrame, cv_block: dict[str, Any] | None, *, atol: float = 1e-6) -> bool | None:
    """Whether the table's pooled per-copy AUC equals the card's cross-validation block (None: nothing to compare).
    Guards against storing one model's breast-level figures in another model's card."""
    pooled = (cv_block or {}).get("pooled") or {}
    if not isinstance(pooled.get("auc"), (int, float)):
        return None
    auc = point_metrics(oof["label"].to_numpy(), oof["probability"].to_numpy())["auc"]
    return bool(abs(auc - float(pooled["auc"])) <= atol)


def store_in_card(model_dir: str | Path, block: dict[str, Any]) -> dict[str, Any]:
    """Write `block` as the card's `breast_level` (through `card.edit_card`); returns the card."""
    from mammo_core.store.card import edit_card

    def change(card: dict[str, Any]) -> None:
        card[CARD_KEY] = block

    return edit_card(model_dir, change)


def summary_lines(block: dict[str, Any]) -> list[str]:
    """Plain-text lines for the CLI."""
    lines = [f"{block['n_images']} source images, {block['n_breasts']} breasts "
             f"({block['n_breasts_malignant']} malignant, {block['n_breasts_both_views']} with two views), "
             f"{block['n_patients']} patients",
             f"image level: AUC {_ci(block['image_level'])}"]
    for rule, figures in block["rules"].items():
        mark = " (chosen)" if rule == block["chosen_rule"] else ""
        lines.append(f"rule {rule}{mark}: breast AUC {_ci(figures['breast'])}; exam AUC {_ci(figures['exam'])}")
    lines.append(block["choice_note"])
    return lines


def _ci(figures: dict[str, Any]) -> str:
    lo, hi = figures["auc_ci"]
    return f"{figures['auc']:.3f} [{lo:.3f}, {hi:.3f}] (n = {figures['n']})"
