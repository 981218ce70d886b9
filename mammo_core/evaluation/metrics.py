"""Metrics from a predictions table: the paper's Table 1, ROC, AUC and the confusion matrix at any threshold.

Pure NumPy/scikit-learn: no TensorFlow, so the app's Metrics page can recompute at a new
threshold instantly from `test_predictions.csv`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn import metrics as skm

from mammo_core.config import CLASS_NAMES, DEFAULT_THRESHOLD


def validate_predictions(labels: Sequence[int], probabilities: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert labels (0/1) and probabilities ([0, 1]) to flat arrays; ValueError naming the problem."""
    y = np.asarray(labels, dtype=int).ravel()
    p = np.asarray(probabilities, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and probabilities differ in length: {y.size} vs {p.size}")
    if y.size == 0:
        raise ValueError("no predictions to evaluate")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(y.tolist()) - {0, 1})[:5]}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must be finite and within [0, 1]")
    return y, p


def log_loss(labels: Sequence[int], probabilities: Sequence[float]) -> float:
    """Mean binary cross-entropy, with Keras' clipping (1e-7) so it matches `model.evaluate`."""
    y, p = validate_predictions(labels, probabilities)
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def auc(labels: Sequence[int], probabilities: Sequence[float]) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    y, p = validate_predictions(labels, probabilities)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(skm.roc_auc_score(y, p))


def roc_points(labels: Sequence[int], probabilities: Sequence[float]) -> dict[str, list[float]]:
    """ROC curve as lists: false-positive rate, true-positive rate and the thresholds."""
    y, p = validate_predictions(labels, probabilities)
    fpr, tpr, thr = skm.roc_curve(y, p)
    thr = np.minimum(thr, 1.0)  # sklearn puts +inf first; 1.0 is as strict and serialisable
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()}


def sensitivity_specificity(labels: np.ndarray, probabilities: np.ndarray,
                            threshold: float = DEFAULT_THRESHOLD) -> tuple[float, float]:
    """(sensitivity, specificity) with "malignant" when probability >= threshold; NaN for an absent class.

    The one place these rates are computed (metrics tables, CV folds and their bootstrap, operating
    points). Inputs are trusted arrays (the bootstrap calls it thousands of times); validate first.
    """
    pred = np.asarray(probabilities) >= threshold
    y = np.asarray(labels)
    pos, neg = y == 1, y == 0
    sens = float(pred[pos].mean()) if pos.any() else float("nan")
    spec = float((~pred[neg]).mean()) if neg.any() else float("nan")
    return sens, spec


def confusion(labels: Sequence[int], probabilities: Sequence[float], *, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """2x2 confusion matrix [[TN, FP], [FN, TP]] with "malignant" when probability >= threshold."""
    y, p = validate_predictions(labels, probabilities)
    return skm.confusion_matrix(y, (p >= threshold).astype(int), labels=[0, 1])


def compute_metrics(
    labels: Sequence[int], probabilities: Sequence[float], *, threshold: float = DEFAULT_THRESHOLD
) -> dict[str, Any]:
    """Every Table 1 metric at `threshold`.

    Returns a JSON-serialisable dict: n, threshold, loss, accuracy, auc, sensitivity, specificity,
    per_class {benign, malignant: precision, recall, f1, support}, macro_avg, weighted_avg,
    confusion_matrix [[TN, FP], [FN, TP]] (rows true class, columns predicted).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within [0, 1], got {threshold}")
    y, p = validate_predictions(labels, probabilities)
    pred = (p >= threshold).astype(int)
    report = skm.classification_report(y, pred, labels=[0, 1], target_names=list(CLASS_NAMES), output_dict=True,
                                       zero_division=0)

    def row(entry: dict[str, float]) -> dict[str, Any]:
        return {"precision": float(entry["precision"]), "recall": float(entry["recall"]),
                "f1": float(entry["f1-score"]), "support": int(entry["support"])}

    cm = skm.confusion_matrix(y, pred, labels=[0, 1])
    return {
        "n": int(y.size),
        "threshold": float(threshold),
        "loss": log_loss(y, p),
        "accuracy": float((pred == y).mean()),
        "auc": auc(y, p),
        **dict(zip(("sensitivity", "specificity"), sensitivity_specificity(y, p, threshold))),
        "per_class": {name: row(report[name]) for name in CLASS_NAMES},
        "macro_avg": row(report["macro avg"]),
        "weighted_avg": row(report["weighted avg"]),
        "confusion_matrix": cm.tolist(),
    }
