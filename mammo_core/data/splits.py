"""Split protocols and grouped, stratified folds: no source image (or patient) on two sides of a split.

`paper` keeps the dataset's own split folders (leaky: copies of a source image on every side); `grouped`
re-splits 50/25/25 by group. `group_folds` gives k grouped folds for cross-validation, `fold_assignment`
adds each fold's inner validation part, and `check_disjoint` refuses a split where a group leaks.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mammo_core.config import CLASS_NAMES
from mammo_core.errors import DatasetError

SPLITS: tuple[str, str, str] = ("train", "val", "test")
PROTOCOLS: tuple[str, ...] = ("paper", "grouped")
GROUP_BY: tuple[str, ...] = ("source", "patient")


def _group_column(group_by: str) -> str:
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {GROUP_BY}, got {group_by!r}")
    return "group" if group_by == "source" else "patient"


def assign_split(
    frame: pd.DataFrame, *, protocol: str, seed: int = 0, group_by: str = "source"
) -> pd.DataFrame:
    """Return a copy of `frame` with a `split` column ("train", "val" or "test").

    `paper` keeps the split folders; `grouped` splits 50/25/25 by group (source image, or patient
    with `group_by="patient"`), stratified by label, seeded, so no group is on two sides.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    out = frame.copy()
    if protocol == "paper":
        if (out["given_split"] == "").any():
            raise DatasetError("the paper protocol needs train/val/test folders; this dataset has none. Use --protocol grouped.")
        out["split"] = out["given_split"]
        missing = [s for s in SPLITS if not (out["split"] == s).any()]
        if missing:
            raise DatasetError(f"the dataset has no {', '.join(missing)} folder; the paper protocol needs all three.")
        return out
    folds = group_folds(out, n_folds=4, seed=seed, group_by=group_by)
    out["split"] = np.where(folds == 0, "test", np.where(folds == 1, "val", "train"))
    return out


def group_folds(frame: pd.DataFrame, *, n_folds: int, seed: int = 0, group_by: str = "source") -> np.ndarray:
    """Fold index (0..n_folds-1) per row: stratified by label, every group entirely in one fold.

    Groups are dealt per label in a seeded random order, so each fold gets the same share of
    benign and malignant groups (to within one). A patient with both benign and malignant images
    is dealt with the label of the majority of its images.

    Written by hand, not `sklearn.model_selection.StratifiedGroupKFold`: that splitter puts the groups in
    other folds (checked on the dataset), and the shipped cards' folds, out-of-fold predictions and the
    ensemble members (each trained without its fold) depend on this exact assignment.
    """
    column = _group_column(group_by)
    group_label = frame.groupby(column)["label"].agg(lambda s: int(round(s.mean())))
    n_groups = group_label.groupby(group_label).size()
    if (n_groups < n_folds).any():
        raise DatasetError(
            f"need at least {n_folds} {group_by} groups per class to split; have "
            f"{dict(zip((CLASS_NAMES[i] for i in n_groups.index), n_groups.tolist()))}."
        )
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    offset = 0
    for label in sorted(group_label.unique()):
        groups = sorted(group_label.index[group_label == label])
        rng.shuffle(groups)
        for i, g in enumerate(groups):
            fold_of[g] = (i + offset) % n_folds
        # Continue dealing where the previous class stopped, so fold sizes stay balanced overall.
        offset = (offset + len(groups)) % n_folds
    return frame[column].map(fold_of).to_numpy()


INNER_VAL_FOLDS = 4  # the validation part is 1 of 4 group folds of the training folds: 25 % of their groups


def inner_fold_count(frame: pd.DataFrame, folds: np.ndarray, f: int, group_by: str) -> int:
    """How many inner folds the training side of test fold `f` is cut into: `INNER_VAL_FOLDS`, fewer when a
    class has too few groups for that many (tiny data), never fewer than 2."""
    rest = frame[folds != f]
    per_class = rest.groupby(_group_column(group_by))["label"].agg(lambda s: int(round(s.mean()))).value_counts().min()
    return int(max(2, min(INNER_VAL_FOLDS, per_class)))


def fold_assignment(frame: pd.DataFrame, *, k: int, seed: int, group_by: str,
                    inner_part: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Test fold per row, and per fold a boolean "validation part" mask over the rows (False on the test fold).

    The validation part of fold f is inner fold `inner_part` of `INNER_VAL_FOLDS` grouped folds of the other
    folds (seed `seed + 1 + f`), fewer when a class has too few groups for four (tiny data). The default, 0,
    is the validation part every training run uses; the others let recipe selection use each inner fold in
    turn (nested cross-validation, `CVConfig.inner_parts`).

    Raises ValueError when `inner_part` is not below a fold's number of inner folds.
    """
    folds = group_folds(frame, n_folds=k, seed=seed, group_by=group_by)
    val_masks = []
    for f in range(k):
        rest = frame[folds != f]
        n_inner = inner_fold_count(frame, folds, f, group_by)
        if not 0 <= inner_part < n_inner:
            raise ValueError(f"inner_part must be in [0, {n_inner}) for fold {f}, got {inner_part}")
        inner = group_folds(rest, n_folds=n_inner, seed=seed + 1 + f, group_by=group_by)
        mask = np.zeros(len(frame), dtype=bool)
        mask[np.flatnonzero(folds != f)[inner == inner_part]] = True
        val_masks.append(mask)
    return folds, val_masks


def check_disjoint(parts: dict[str, pd.DataFrame], group_by: str, where: str) -> None:
    """Raise RuntimeError when a group (source image or patient) has rows in two of `parts` (the split leaks)."""
    column = _group_column(group_by)
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if set(parts[a][column]) & set(parts[b][column]):
                raise RuntimeError(f"{where}: a {column} is on both sides of the split ({a}/{b}); the folds leak")
