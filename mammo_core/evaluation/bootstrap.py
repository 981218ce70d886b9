"""Cluster-bootstrap confidence intervals: resample whole groups (source images or patients) with replacement.

Written here because no library resamples clusters: copies of one image (or images of one patient) are
not independent observations, so rows are drawn group by group. `point_metrics` is the one cheap metrics
function the bootstrap calls thousands of times.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from mammo_core.config import DEFAULT_THRESHOLD
from mammo_core.evaluation.metrics import auc as auc_score
from mammo_core.evaluation.metrics import sensitivity_specificity

METRICS: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity")


def point_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """AUC, accuracy, sensitivity and specificity ("malignant" when p >= threshold); NaN when undefined."""
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probabilities, dtype=float)
    sens, spec = sensitivity_specificity(y, p, threshold)
    return {"auc": auc_score(y, p), "accuracy": float(((p >= threshold) == (y == 1)).mean()),
            "sensitivity": sens, "specificity": spec}


def cluster_bootstrap(labels: Sequence[int], probabilities: Sequence[float], groups: Sequence[Any], *,
                      n_boot: int = 2000, seed: int = 0, threshold: float = DEFAULT_THRESHOLD,
                      alpha: float = 0.05) -> dict[str, list[float]]:
    """Percentile (1 - alpha) CIs of `point_metrics`, resampling whole groups with replacement.

    Each replicate draws as many groups as there are, with replacement, and takes every row of each
    drawn group (a group drawn twice counts twice). Replicates where a metric is undefined (one class
    missing) are left out of that metric's interval.

    Returns {"auc": [lo, hi], "accuracy": [...], "sensitivity": [...], "specificity": [...]}.
    """
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probabilities, dtype=float)
    g = pd.Series(np.asarray(groups)).astype(str).to_numpy()
    if not (len(y) == len(p) == len(g)):
        raise ValueError(f"labels, probabilities and groups differ in length: {len(y)}, {len(p)}, {len(g)}")
    codes, uniques = pd.factorize(g)
    members = [np.flatnonzero(codes == i) for i in range(len(uniques))]
    rng = np.random.default_rng(seed)
    values = {m: [] for m in METRICS}
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[i] for i in pick])
        for m, v in point_metrics(y[idx], p[idx], threshold).items():
            values[m].append(v)
    out = {}
    for m, vs in values.items():
        arr = np.asarray(vs, dtype=float)
        arr = arr[np.isfinite(arr)]
        out[m] = ([float(np.quantile(arr, alpha / 2)), float(np.quantile(arr, 1 - alpha / 2))]
                  if arr.size else [float("nan"), float("nan")])
    return out


def paired_auc_difference(labels: Sequence[int], a: Sequence[float], b: Sequence[float], groups: Sequence[Any], *,
                          n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> list[float]:
    """Percentile (1 - alpha) interval of AUC(b) - AUC(a) for two sets of scores of the same rows, both
    arms on the same resampled groups (drawn as `cluster_bootstrap` draws them), so what the two share
    (the images, their difficulty) cancels. Replicates with one class only are left out."""
    y = np.asarray(labels, dtype=int)
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not (len(y) == len(a) == len(b) == len(groups)):
        raise ValueError(f"labels, scores and groups differ in length: {len(y)}, {len(a)}, {len(b)}, {len(groups)}")
    codes, uniques = pd.factorize(pd.Series(np.asarray(groups)).astype(str))
    members = [np.flatnonzero(codes == i) for i in range(len(uniques))]
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        diffs.append(auc_score(y[idx], b[idx]) - auc_score(y[idx], a[idx]))
    arr = np.asarray(diffs, dtype=float)
    arr = arr[np.isfinite(arr)]
    return [float(np.quantile(arr, alpha / 2)), float(np.quantile(arr, 1 - alpha / 2))] if arr.size else [float("nan")] * 2
