"""Reading a model card for people: its protocol in words, the honest headline numbers (cross-validated
AUC with its interval, by source image and by patient), the single split beside them, the operating
points with both of their figures, and whether one model's honest numbers are worse than another's.

Pure functions of the card dictionaries (`mammo_core.store.card` is the schema); no Streamlit here, so the
pages and the tests share them. Both kinds of card are handled: a single split (`split.protocol` is
"paper" or "grouped", `metrics.test` on the test split) and a cross-validated ensemble
(`split.protocol` is "cross-validation", `metrics.test` holds out-of-fold metrics).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

#: The card keys of grouped cross-validation, and what each is grouped by (the honest numbers).
CV_KEYS = {"cross_validation": "source image", "cross_validation_patient": "patient"}
CROSS_VALIDATION = "cross-validation"
PAPER = "paper"
GROUPED = "grouped"

#: Readable names for the per-fold columns that `mammo_core.training.cv` writes.
FOLD_COLUMNS = {
    "fold": "fold", "auc": "AUC", "accuracy": "accuracy", "sensitivity": "sensitivity", "specificity": "specificity",
    "n_images": "test images", "n_groups": "test groups", "n_source_images": "test source images",
    "n_patients": "test patients", "val_auc": "validation AUC", "temperature": "temperature",
    "train_images": "training images", "val_images": "validation images", "minutes": "minutes to train",
    "l2": "L2 weight decay", "best_epoch": "best epoch",
    "inner_best_epochs": "inner models' best epochs",
    "members": "members", "temperatures": "temperatures",
}


def fold_table(folds: list[dict[str, Any]]) -> pd.DataFrame:
    """The per-fold rows of a card's cross-validation with readable column names. Under a nested refit the
    member's epoch count is the inner models' (their best epochs in a column of their own), and the validation
    AUC is that of the inner models on their pooled parts (the page's caption quotes the card's protocol). A fold
    of several members (`Recipe.members_per_fold`) lists each member's figure, in seed order, in one cell."""
    table = pd.DataFrame(folds)
    table = table[[c for c in table.columns if c in FOLD_COLUMNS]]
    refit = "inner_best_epochs" in table.columns
    for column in table.columns:
        if table[column].map(lambda v: isinstance(v, list)).any():
            table[column] = table[column].map(lambda v: " ".join(_cell(x) for x in v) if isinstance(v, list) else _cell(v))
    names = {**FOLD_COLUMNS, **({"best_epoch": "epochs (refit)"} if refit else {})}
    return table.rename(columns=names)


def _cell(value: Any) -> str:
    """One figure of a list cell: a list of inner best epochs nested in a bagged fold is shown as a/b."""
    if isinstance(value, list):
        return "/".join(_cell(x) for x in value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, ".2f") if isinstance(value, float) else str(value)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(float(value)) else float(value)


def fmt(value: Any, spec: str = ".3f") -> str:
    """A number formatted, or an em dash when it is missing or NaN."""
    v = _num(value)
    return "—" if v is None else format(v, spec)


def fmt_ci(value: Any, ci: Any) -> str:
    """'0.700 [0.606, 0.782]' (the interval left out when the card has none)."""
    text = fmt(value)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and _num(ci[0]) is not None and _num(ci[1]) is not None:
        text += f" [{fmt(ci[0])}, {fmt(ci[1])}]"
    return text


def protocol(card: dict[str, Any]) -> str | None:
    return (card.get("split") or {}).get("protocol") or (card.get("evaluation") or {}).get("protocol")


def is_leaky(card: dict[str, Any]) -> bool:
    """Evaluated on the paper's split, where every source image has copies in train and test."""
    return protocol(card) == PAPER


def is_cross_validated(card: dict[str, Any]) -> bool:
    """A model with no single split: its `metrics.test` are out-of-fold (cross-validation ensembles)."""
    return protocol(card) == CROSS_VALIDATION


def protocol_short(card: dict[str, Any]) -> str:
    split = card.get("split") or {}
    p = protocol(card)
    if p == PAPER:
        return "paper split (leaky)"
    if p == GROUPED:
        return f"grouped split by {split.get('group_by') or 'source'}"
    if p == CROSS_VALIDATION:
        by = CV_KEYS["cross_validation_patient" if split.get("group_by") == "patient" else "cross_validation"]
        return f"{split.get('k') or 5}-fold cross-validation by {by}"
    return "split unknown"


def test_label(card: dict[str, Any]) -> str:
    """What `metrics.test` is: 'out-of-fold' for a cross-validated card, else 'test'."""
    return "out-of-fold" if is_cross_validated(card) else "test"


def cross_validated(card: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{card key: {"by", "auc", "ci", "text", "k", "n_groups"}} for each grouped cross-validation the card
    carries (pooled out-of-fold AUC with its 95 % interval)."""
    out = {}
    for key, by in CV_KEYS.items():
        cv = card.get(key)
        pooled = (cv or {}).get("pooled") if isinstance(cv, dict) else None
        if not isinstance(pooled, dict) or _num(pooled.get("auc")) is None:
            continue
        out[key] = {"by": by, "auc": float(pooled["auc"]), "ci": pooled.get("auc_ci"),
                    "text": fmt_ci(pooled["auc"], pooled.get("auc_ci")), "k": cv.get("k"),
                    "n_groups": pooled.get("n_groups")}
    return out


def single_split(card: dict[str, Any]) -> dict[str, Any] | None:
    """The one-split test AUC ({"label", "auc", "text", "n"}), or None for a cross-validated card (its
    out-of-fold numbers are the cross-validation itself)."""
    if is_cross_validated(card):
        return None
    test = (card.get("metrics") or {}).get("test") or {}
    label = "paper split (leaky)" if is_leaky(card) else protocol_short(card)
    return {"label": label, "auc": _num(test.get("auc")), "text": fmt(test.get("auc")), "n": test.get("n")}


def views_text(card: dict[str, Any]) -> str | None:
    """What the 8-view test-time augmentation did for this model, from the card's out-of-fold measurement:
    "AUC 0.809 against 0.793 plain (+0.015, 95 % interval +0.009 to +0.022), out of fold"; None when the card
    has no such measurement."""
    tta = card.get("test_time_augmentation")
    if not isinstance(tta, dict) or _num(tta.get("auc_views")) is None or _num(tta.get("auc_plain")) is None:
        return None
    diff, ci = _num(tta.get("difference")), tta.get("difference_ci")
    text = f"AUC {fmt(tta['auc_views'])} against {fmt(tta['auc_plain'])} plain"
    if diff is not None:
        text += f" ({diff:+.3f}"
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_num(c) is not None for c in ci):
            text += f", 95 % interval {ci[0]:+.3f} to {ci[1]:+.3f}"
        text += ")"
    return text + ", out of fold"


def honest_auc(card: dict[str, Any]) -> dict[str, float]:
    """The numbers that estimate performance on unseen mammograms, by what they are grouped by:
    {"cv source image": auc, "cv patient": auc, "grouped split": auc} (only those the card has)."""
    out = {f"cross-validated AUC by {v['by']}": v["auc"] for v in cross_validated(card).values()}
    if protocol(card) == GROUPED:
        auc = _num(((card.get("metrics") or {}).get("test") or {}).get("auc"))
        if auc is not None:
            out["single grouped split AUC"] = auc
    return out


def activation_concerns(candidate: dict[str, Any], active: dict[str, Any] | None, active_name: str | None) -> list[str]:
    """Why making `candidate` the app's default needs a confirmation: evaluated on the leaky paper split,
    no honest numbers, or an honest number lower than the active model's. Empty: nothing to confirm."""
    reasons = []
    if is_leaky(candidate):
        reasons.append("it was evaluated on the paper split, where copies of every test mammogram are in its "
                       "training set: its numbers measure memorised copies, not new mammograms")
    mine = honest_auc(candidate)
    if not mine and not is_leaky(candidate):
        reasons.append("its card has no grouped (honest) metrics")
    if active and active_name:
        theirs = honest_auc(active)
        for what, value in mine.items():
            if what in theirs and value < theirs[what] - 1e-9:
                reasons.append(f"its {what} is {value:.3f}, lower than {theirs[what]:.3f} for the active model "
                               f"{active_name}")
        if theirs and not (set(mine) & set(theirs)) and mine:
            reasons.append("its honest numbers and the active model's were measured differently, so they "
                           "cannot be compared")
    return reasons


def operating_point_figures(op: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """[(where, sensitivity, specificity)] for an operating point: where it was chosen (validation, or
    out-of-fold for cross-validated cards) and, when recorded, on the test split."""
    chosen_on = str(op.get("computed_on") or "validation")
    where = "out-of-fold" if "fold" in chosen_on else "validation"
    rows = [(where, _num(op.get("sensitivity")), _num(op.get("specificity")))]
    if _num(op.get("test_sensitivity")) is not None or _num(op.get("test_specificity")) is not None:
        rows.append(("test", _num(op.get("test_sensitivity")), _num(op.get("test_specificity"))))
    return rows


def operating_point_text(op: dict[str, Any]) -> str:
    """'Youden's J (0.57): validation sens 0.70 / spec 0.67 · test sens 0.50 / spec 0.88'."""
    parts = [f"{where} sens {fmt(s, '.2f')} / spec {fmt(p, '.2f')}" for where, s, p in operating_point_figures(op)]
    return f"{op.get('name', '?')} ({float(op['threshold']):.2f}): " + " · ".join(parts)


def created_date(card: dict[str, Any]) -> str:
    return str(card.get("created", ""))[:10] or "unknown date"


def breast_level_rows(card: dict[str, Any]) -> list[dict[str, str]]:
    """One row per breast rule of the card's `breast_level` block (mammo_core.evaluation.breast_level): breast and exam
    AUC with their patient-bootstrap intervals; empty when the card has none."""
    block = card.get("breast_level")
    if not isinstance(block, dict):
        return []
    rows = []
    for rule, figures in (block.get("rules") or {}).items():
        breast, exam = figures.get("breast") or {}, figures.get("exam") or {}
        rows.append({"rule": f"{rule} of views" + (" (chosen)" if rule == block.get("chosen_rule") else ""),
                     f"breast AUC [95 % CI] ({breast.get('n', '?')} breasts)": fmt_ci(breast.get("auc"), breast.get("auc_ci")),
                     f"exam AUC [95 % CI] ({exam.get('n', '?')} patients)": fmt_ci(exam.get("auc"), exam.get("auc_ci"))})
    return rows
