"""Probability calibration (temperature scaling) and operating points, fitted on validation predictions only.

Temperature scaling divides the model's logit by one number T fitted by maximum likelihood on the
validation split: p = sigmoid(logit / T). It changes how confident the probabilities are, never their
order, so AUC is unchanged. Operating points are thresholds on the calibrated probability chosen on the
validation split (Youden's J, sensitivity >= 0.95, specificity >= 0.90) and then reported on the test
split as they are. `training.calibrate.calibrate_model_dir` does both for a trained model directory and
records them in its card. Pure NumPy/SciPy/scikit-learn: no TensorFlow.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mammo_core.evaluation.metrics import sensitivity_specificity, validate_predictions

_EPS = 1e-7  # Keras' clipping, so logits of saturated float32 probabilities stay finite
COMPUTED_ON = "validation split"
UNCALIBRATED_COLUMN = "probability_uncalibrated"


def logit(probabilities: Sequence[float] | np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) with p clipped to [1e-7, 1 - 1e-7]."""
    p = np.clip(np.asarray(probabilities, dtype=float), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(probabilities: Sequence[float] | np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities sigmoid(logit(p) / T) for uncalibrated probabilities p."""
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    p = np.asarray(probabilities, dtype=float)
    if temperature == 1.0:
        return p.copy()
    return 1.0 / (1.0 + np.exp(-logit(p) / temperature))


def brier(labels: Sequence[int], probabilities: Sequence[float]) -> float:
    """Brier score: mean squared difference between probability and outcome (0 best, 0.25 = always 0.5)."""
    from sklearn.metrics import brier_score_loss

    y, p = validate_predictions(labels, probabilities)
    return float(brier_score_loss(y, p))


def fit_temperature(labels: Sequence[int], probabilities: Sequence[float]) -> float:
    """Temperature T > 0 minimising the log loss of sigmoid(logit(p) / T) on (labels, p).

    T > 1 softens over-confident probabilities, T < 1 sharpens under-confident ones. Searched over
    log T in [-5, 5] (T from 0.007 to 148), which covers any sensible model.
    """
    from scipy.optimize import minimize_scalar

    y, p = validate_predictions(labels, probabilities)
    z = logit(p)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        # log(1 + exp(-s)) for y=1 and log(1 + exp(s)) for y=0, computed stably
        return float(np.mean(np.logaddexp(0.0, np.where(y == 1, -s, s))))

    result = minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def choose_thresholds(labels: Sequence[int], probabilities: Sequence[float], *,
                      min_sensitivity: float = 0.95, min_specificity: float = 0.90) -> dict[str, float]:
    """Thresholds ("malignant when p >= t") chosen on these predictions.

    - "Youden's J": maximises sensitivity + specificity - 1 (the highest such threshold on ties).
    - "Sensitivity ≥ 0.95": the highest threshold whose sensitivity is at least `min_sensitivity`
      (so the best specificity under that constraint).
    - "Specificity ≥ 0.90": the lowest threshold whose specificity is at least `min_specificity`
      (so the best sensitivity under that constraint).
    Candidates are the distinct predicted probabilities (plus 1.0), so every constraint is met exactly
    on these predictions.
    """
    y, p = validate_predictions(labels, probabilities)
    if len(np.unique(y)) < 2:
        raise ValueError("operating points need both classes among the predictions")
    from sklearn.metrics import roc_curve

    # every distinct probability is a threshold ("malignant when p >= t"), plus one above them all
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    order = np.argsort(thr)  # ascending thresholds, as the selection below expects
    candidates, sens, spec = np.minimum(thr[order], 1.0), tpr[order], 1.0 - fpr[order]
    j = sens + spec - 1
    youden = candidates[np.flatnonzero(j == j.max())[-1]]
    ok_sens = np.flatnonzero(sens >= min_sensitivity)  # sensitivity falls as t rises, so take the last
    ok_spec = np.flatnonzero(spec >= min_specificity)  # specificity rises with t, so take the first
    return {
        "Youden's J": float(youden),
        f"Sensitivity ≥ {min_sensitivity:.2f}": float(candidates[ok_sens[-1]]),
        f"Specificity ≥ {min_specificity:.2f}": float(candidates[ok_spec[0]]),
    }


def operating_points(val_labels: Sequence[int], val_probabilities: Sequence[float],
                     test_labels: Sequence[int] | None = None, test_probabilities: Sequence[float] | None = None,
                     ) -> list[dict[str, Any]]:
    """Operating points chosen on validation predictions, with their validation and test sensitivity/specificity.

    Returns a list of {"name", "threshold", "sensitivity", "specificity", "test_sensitivity",
    "test_specificity", "computed_on"} (test values are None when no test predictions are given).
    """
    yv, pv = validate_predictions(val_labels, val_probabilities)
    test = validate_predictions(test_labels, test_probabilities) if test_labels is not None else None
    points = []
    for name, t in choose_thresholds(yv, pv).items():
        sens, spec = sensitivity_specificity(yv, pv, t)
        tsens, tspec = sensitivity_specificity(*test, t) if test is not None else (None, None)
        points.append({"name": name, "threshold": t, "sensitivity": sens, "specificity": spec,
                       "test_sensitivity": tsens, "test_specificity": tspec, "computed_on": COMPUTED_ON})
    return points


def card_temperature(card: dict[str, Any]) -> float:
    """The temperature a model card asks predictions to be divided by (1.0 when it has none)."""
    cal = card.get("calibration")
    if isinstance(cal, dict) and cal.get("method") == "temperature":
        try:
            t = float(cal["temperature"])
        except (KeyError, TypeError, ValueError):
            return 1.0
        if np.isfinite(t) and t > 0:
            return t
    return 1.0


__all__ = ["apply_temperature", "brier", "card_temperature", "choose_thresholds",
           "fit_temperature", "logit", "operating_points"]
