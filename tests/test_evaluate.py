"""Table 1 metrics, ROC and confusion matrix against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mammo_core.evaluation.metrics import compute_metrics, confusion, log_loss, roc_points

LABELS = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
PROBS = [0.1, 0.2, 0.6, 0.4, 0.9, 0.8, 0.3, 0.7, 0.55, 0.95]


def test_metrics_by_hand():
    m = compute_metrics(LABELS, PROBS, threshold=0.5)
    # predictions: 0 0 1 0 | 1 1 0 1 1 1  -> TN=3 FP=1 FN=1 TP=5
    assert m["confusion_matrix"] == [[3, 1], [1, 5]]
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(5 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["per_class"]["benign"] == {"precision": pytest.approx(3 / 4), "recall": pytest.approx(3 / 4),
                                        "f1": pytest.approx(3 / 4), "support": 4}
    assert m["per_class"]["malignant"]["precision"] == pytest.approx(5 / 6)
    assert m["macro_avg"]["recall"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    assert m["weighted_avg"]["recall"] == pytest.approx(0.4 * 3 / 4 + 0.6 * 5 / 6)
    # AUC: pairs (benign, malignant) ranked correctly: 24 pairs, 21.0 correct
    assert m["auc"] == pytest.approx(21 / 24)
    expected_loss = -np.mean([math.log(1 - p) if y == 0 else math.log(p) for y, p in zip(LABELS, PROBS)])
    assert m["loss"] == pytest.approx(expected_loss)


def test_threshold_moves_counts():
    low = confusion(LABELS, PROBS, threshold=0.05)
    high = confusion(LABELS, PROBS, threshold=0.99)
    assert low.tolist() == [[0, 4], [0, 6]]
    assert high.tolist() == [[4, 0], [6, 0]]


def test_roc_points_cover_corners():
    roc = roc_points(LABELS, PROBS)
    assert roc["fpr"][0] == 0 and roc["tpr"][-1] == 1
    assert all(t <= 1.0 for t in roc["thresholds"])


@pytest.mark.parametrize(
    "labels, probs, match",
    [([0, 1], [0.5], "differ in length"), ([0, 2], [0.1, 0.2], "labels must be 0 or 1"),
     ([0, 1], [0.1, 1.2], "within"), ([], [], "no predictions")],
)
def test_bad_input_messages(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(labels, probs)


def test_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        compute_metrics(LABELS, PROBS, threshold=1.5)


def test_log_loss_clips_like_keras():
    assert log_loss([1], [0.0]) == pytest.approx(-math.log(1e-7))
