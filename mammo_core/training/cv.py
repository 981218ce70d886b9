"""Leakage-free k-fold cross-validation of a training recipe: the fold loop, its results and their place in a card.

Every copy of a source image (or every image of a patient, with ``group_by="patient"``) lies in one
fold only (`data.splits.fold_assignment`, stratified by label). For each test fold, the remaining folds
are split again by group into a training part and a validation part (25 % of their groups); everything
that is chosen — the head's L2 strength, the epoch to keep, the calibration temperature — is chosen on
that validation part, never on the test fold. Test-fold probabilities are temperature-calibrated with
the fold's own temperature, then pooled over folds (out-of-fold predictions), with confidence intervals
from `evaluation.bootstrap.cluster_bootstrap`. The per-fold trainers are in `training.cv_trainers`.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from mammo_core.config import DEFAULT_SEED, DEFAULT_THRESHOLD
from mammo_core.data.datasets import fingerprint, portable_paths, scan_dataset
from mammo_core.data.splits import GROUP_BY, INNER_VAL_FOLDS, check_disjoint, fold_assignment
from mammo_core.evaluation.bootstrap import METRICS, cluster_bootstrap, point_metrics
from mammo_core.evaluation.calibration import apply_temperature, fit_temperature
from mammo_core.evaluation.metrics import auc as auc_score
from mammo_core.io.preprocessing import PREPROCESSING_ID
from mammo_core.store.files import atomic_write_text, dumps

CARD_KEYS = {"source": "cross_validation", "patient": "cross_validation_patient"}
#: a fold's member s > 0 (`Recipe.members_per_fold`) trains with seed (seed + fold + 1000 x inner part) + s x stride:
#: never a seed of another fold, inner part or member
MEMBER_SEED_STRIDE = 10_000


@dataclass
class CVConfig:
    """Everything that defines a cross-validation run; stored in the results."""

    data_dir: str
    architecture: str = "efficientnet-lite0"
    k: int = 5
    group_by: str = "source"
    patient_map: str | None = None
    seed: int = DEFAULT_SEED
    epochs: int | None = None  # image models: epochs per fold (default 10); features: head epochs (default 30)
    batch_size: int = 64
    copies_per_source: int | None = None  # image models: training copies kept per source image (None: all)
    val_copies_per_source: int | None = 8  # image models: validation copies per source image (None: all)
    n_boot: int = 2000
    threshold: float = DEFAULT_THRESHOLD
    precision: str = "auto"  # paper-cnn only (fast_training); other architectures train in float32
    preprocessing: str = PREPROCESSING_ID  # `preprocessing.PREPROCESSINGS`
    #: efficientnet-lite0-ft: the fine-tuning recipe (None: `finetune.Recipe()`)
    recipe: Any = None
    #: score only the validation parts (recipe selection): the test folds are never predicted
    inner_only: bool = False
    #: with `inner_only`: how many of each fold's inner folds serve in turn as its validation part (nested CV:
    #: 4 scores every training source image once per fold, at 4x the cost); 1 is the usual validation part only
    inner_parts: int = 1
    #: tf.distribute strategy for image-trained architectures (`distribute.STRATEGIES`)
    strategy: str = "none"

    def validate(self) -> None:
        from mammo_core.models.architectures import get_architecture
        from mammo_core.models.fast_training import check_precision
        from mammo_core.training.distribute import check_strategy

        arch = get_architecture(self.architecture)
        check_precision(self.precision)
        check_strategy(self.strategy)
        if self.strategy in ("mirrored", "multi-worker") and arch.strategy in ("features", "finetune"):
            raise ValueError(f"--strategy {self.strategy} trains networks on images; {self.architecture} does not")
        if self.k < 2:
            raise ValueError(f"k must be at least 2, got {self.k}")
        if self.group_by not in GROUP_BY:
            raise ValueError(f"group_by must be one of {GROUP_BY}, got {self.group_by!r}")
        if self.group_by == "patient" and not self.patient_map:
            raise ValueError("grouping by patient needs a patient map (--patient-map, or the dataset's patients.csv)")
        for key in ("copies_per_source", "val_copies_per_source", "epochs"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be at least 1, got {value}")
        if self.n_boot < 100:
            raise ValueError(f"n_boot must be at least 100, got {self.n_boot}")
        if not 1 <= self.inner_parts <= INNER_VAL_FOLDS:
            raise ValueError(f"inner_parts must be in [1, {INNER_VAL_FOLDS}], got {self.inner_parts}")
        if self.inner_parts > 1 and not self.inner_only:
            raise ValueError("inner_parts > 1 is for recipe selection: it needs inner_only (--inner-only)")


# --- the run -------------------------------------------------------------------------------------------


def protocol_text(k: int, group_by: str) -> str:
    unit = "source image" if group_by == "source" else "patient"
    return f"{k}-fold CV grouped by {unit}, stratified"


def run_cv(config: CVConfig, *, log: Callable[[str], None] = print) -> tuple[dict[str, Any], pd.DataFrame]:
    """Cross-validate `config.architecture`. Returns (results dict in the model-card shape, out-of-fold table).

    The out-of-fold table has one row per image: path, group, patient, label, fold, probability
    (calibrated with the fold's temperature), probability_uncalibrated.
    """
    from mammo_core.training.cv_trainers import make_trainer
    from mammo_core.training.distribute import make_strategy

    config.validate()
    make_strategy(config.strategy)  # before any other TensorFlow operation (multi-worker needs it)
    frame = scan_dataset(config.data_dir, patient_map=config.patient_map).reset_index(drop=True)
    trainer = make_trainer(frame, config, log)
    return run_folds(config, frame, trainer, log=log)


def run_folds(config: CVConfig, frame: pd.DataFrame, trainer: Any, *,
              log: Callable[[str], None] = print) -> tuple[dict[str, Any], pd.DataFrame]:
    """The fold loop of `run_cv` with a given trainer (the ensemble keeps the trainer's fold members)."""
    if config.inner_only:
        if getattr(trainer, "members_per_fold", 1) > 1:
            raise ValueError("members_per_fold > 1 trains several members per fold for the test folds and the shipped "
                             "ensemble; recipe selection (inner_only) scores one member per validation part: "
                             "set members_per_fold=1")
        return _run_inner_parts(config, frame, trainer, log=log)
    folds, val_masks = fold_assignment(frame, k=config.k, seed=config.seed, group_by=config.group_by)
    oof_uncal = np.full(len(frame), np.nan)
    oof_cal = np.full(len(frame), np.nan)
    fold_rows = []
    seconds = []
    trained = 0
    refit = getattr(trainer, "refit_parts", 0)
    bag = getattr(trainer, "members_per_fold", 1)
    inner_masks = [fold_assignment(frame, k=config.k, seed=config.seed, group_by=config.group_by, inner_part=p)[1]
                   for p in range(refit)]
    for f in range(config.k):
        test, val = frame[folds == f], frame[val_masks[f]]
        train = frame[(folds != f) & ~val_masks[f]]
        check_disjoint({"train": train, "validation": val, "test": test}, config.group_by, f"fold {f}")
        t0 = time.time()
        outs = []
        for s in range(bag):  # member 0 keeps the seeds of a one-member run, so its results are reproduced
            offset = MEMBER_SEED_STRIDE * s
            if refit:
                # nested refit: the inner models are those (and have the seeds) of `_run_inner_parts`'s selection
                train = frame[folds != f]
                parts = [(frame[(folds != f) & ~masks[f]], frame[masks[f]]) for masks in inner_masks]
                for p, (inner_train, inner_val) in enumerate(parts):
                    check_disjoint({"train": inner_train, "validation": inner_val, "test": test}, config.group_by,
                                   f"fold {f}, inner part {p}")
                outs.append(trainer.refit(parts, train, test,
                                          seeds=[config.seed + f + 1000 * p + offset for p in range(refit)],
                                          seed=config.seed + f + offset))
                val = outs[-1]["val_frame"]
            else:
                outs.append(trainer(train, val, test, seed=config.seed + f + offset))
        seconds.append(time.time() - t0)
        trained += sum(out["trained_images"] for out in outs)
        row, test_cal = _test_fold_row(f, config, train, val, test, outs, seconds[-1], log)
        oof_uncal[test.index] = np.mean([out["test"] for out in outs], axis=0)
        oof_cal[test.index] = test_cal
        fold_rows.append(row)
    oof = pd.DataFrame({"path": frame["path"], "group": frame["group"], "patient": frame["patient"],
                        "label": frame["label"], "fold": folds, "probability": oof_cal,
                        "probability_uncalibrated": oof_uncal})
    budget = trainer.budget()
    total = float(sum(seconds))
    budget.update({"minutes_per_fold": round(total / 60 / config.k, 2),
                   "train_images_per_second": round(trained / total, 1) if total else None})
    return _results(config, frame, fold_rows, _pooled(config, oof), budget, refit, bag), oof


def _group_column(config: CVConfig) -> str:
    return "group" if config.group_by == "source" else "patient"


def _run_inner_parts(config: CVConfig, frame: pd.DataFrame, trainer: Any, *,
                     log: Callable[[str], None] = print) -> tuple[dict[str, Any], pd.DataFrame]:
    """Recipe selection: per fold, train on its training side and score only the validation part, for each
    of the first `config.inner_parts` inner folds in turn; the test folds are never predicted. Part 0 is the
    validation part (and seed) of every other run, so `inner_parts=1` reproduces earlier selections."""
    rows = []
    for part in range(config.inner_parts):
        folds, val_masks = fold_assignment(frame, k=config.k, seed=config.seed, group_by=config.group_by,
                                           inner_part=part)
        for f in range(config.k):
            val, test = frame[val_masks[f]], frame[folds == f].iloc[0:0]  # the test fold is never scored
            train = frame[(folds != f) & ~val_masks[f]]
            check_disjoint({"train": train, "validation": val, "test": frame[folds == f]}, config.group_by,
                           f"fold {f}, inner part {part}")
            t0 = time.time()
            out = trainer(train, val, test, seed=config.seed + f + 1000 * part)
            rows.append(_inner_fold_row(f, part, out, time.time() - t0, log))
    by_part = [float(np.nanmean([r["val_auc"] for r in rows if r["part"] == p])) for p in range(config.inner_parts)]
    return {"protocol": protocol_text(config.k, config.group_by) + " (validation parts only"
                        + (f", {config.inner_parts} inner folds in turn)" if config.inner_parts > 1 else ")"),
            "architecture": config.architecture, "group_by": config.group_by, "folds": rows,
            "mean_validation_auc": float(np.nanmean([r["val_auc"] for r in rows])),
            "mean_validation_auc_by_part": by_part,
            "training": trainer.budget(), "config": asdict(config)}, pd.DataFrame()


def _inner_fold_row(f: int, part: int, out: dict[str, Any], seconds: float,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """A fold of recipe selection: only its validation part (inner fold `part`) was scored."""
    val_labels = out["val_frame"]["label"].to_numpy()
    row = {"fold": f, "part": part, "val_auc": auc_score(val_labels, out["val"]), "minutes": round(seconds / 60, 2),
           **out["info"]}
    log(f"fold {f}{f', inner part {part}' if part else ''}: validation AUC {row['val_auc']:.3f}; {seconds:.0f} s")
    return row


def _test_fold_row(f: int, config: CVConfig, train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame,
                   outs: list[dict[str, Any]], seconds: float, log: Callable[[str], None]) -> tuple[dict[str, Any], np.ndarray]:
    """Calibrate each of the fold's members with the temperature of its own validation part, average their
    calibrated test probabilities (the shipped ensemble's rule) and measure the result.

    Returns (the fold's row of the results, the calibrated test probabilities). A fold of one member keeps the
    row's earlier shape (one `temperature`); a bagged fold lists `temperatures` and each member's facts.
    """
    temperatures, calibrated, val_aucs = [], [], []
    for out in outs:
        val_labels = out["val_frame"]["label"].to_numpy()
        temperatures.append(fit_temperature(val_labels, out["val"]))
        calibrated.append(apply_temperature(out["test"], temperatures[-1]))
        val_aucs.append(auc_score(val_labels, out["val"]))
    test_cal = np.mean(calibrated, axis=0)
    m = point_metrics(test["label"].to_numpy(), test_cal, config.threshold)
    if len(outs) == 1:
        per_member = {"temperature": temperatures[0], **outs[0]["info"]}
    else:
        per_member = {"temperatures": temperatures, "members": len(outs),
                      **{key: [out["info"][key] for out in outs] for key in outs[0]["info"]}}
    row = {"fold": f, **m, "n_images": int(len(test)), "n_groups": int(test[_group_column(config)].nunique()),
           "n_source_images": int(test["group"].nunique()), "n_patients": int(test["patient"].nunique()),
           "val_auc": float(np.mean(val_aucs)), "train_images": int(len(train)), "val_images": int(len(val)),
           "minutes": round(seconds / 60, 2), **per_member}
    log(f"fold {f}: test AUC {m['auc']:.3f}, acc {m['accuracy']:.3f}, sens {m['sensitivity']:.3f}, "
        f"spec {m['specificity']:.3f} ({len(test)} images, {row['n_groups']} groups); "
        f"validation AUC {row['val_auc']:.3f}" + (f" (mean of {len(outs)} members)" if len(outs) > 1 else "")
        + f"; {seconds:.0f} s")
    return row, test_cal


def _pooled(config: CVConfig, oof: pd.DataFrame) -> dict[str, Any]:
    """Metrics of the pooled out-of-fold predictions with their cluster-bootstrap CIs."""
    group_col = _group_column(config)
    calibrated = oof["probability"].to_numpy()
    pooled = point_metrics(oof["label"].to_numpy(), calibrated, config.threshold)
    cis = cluster_bootstrap(oof["label"], calibrated, oof[group_col], n_boot=config.n_boot, seed=config.seed,
                            threshold=config.threshold)
    out: dict[str, Any] = {}
    for metric in METRICS:
        out[metric] = pooled[metric]
        out[f"{metric}_ci"] = cis[metric]
    out.update({"n_images": int(len(oof)), "n_groups": int(oof[group_col].nunique()),
                "auc_uncalibrated": auc_score(oof["label"], oof["probability_uncalibrated"])})
    return out


def _results(config: CVConfig, frame: pd.DataFrame, fold_rows: list[dict[str, Any]], pooled: dict[str, Any],
             budget: dict[str, Any], refit: int = 0, bag: int = 1) -> dict[str, Any]:
    """The results dict, in the shape a model card stores (`store_in_card`)."""
    return {
        "protocol": protocol_text(config.k, config.group_by),
        "k": config.k,
        "group_by": config.group_by,
        "seed": config.seed,
        "architecture": config.architecture,
        "training": budget,
        "validation": _validation_text(refit, bag),
        "threshold": f"{config.threshold} on the temperature-calibrated probability (the card's default threshold)",
        "confidence_intervals": f"95 % percentile cluster bootstrap, {config.n_boot} resamples of "
                                f"{'source images' if config.group_by == 'source' else 'patients'} (all copies of a drawn group)",
        "folds": fold_rows,
        "pooled": pooled,
        "mean_validation_auc": float(np.nanmean([r["val_auc"] for r in fold_rows])),
        "dataset": {"path": str(config.data_dir), **fingerprint(frame, config.data_dir),
                    "patient_map": config.patient_map},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
    }


def _validation_text(refit: int, bag: int = 1) -> str:
    """How the validation parts were used, in the card's words: plain, or the nested refit of `refit` inner
    models that the trainer ran (its recipe's, which may be `Recipe()`'s default when the config names none);
    with `bag` members per fold, each member does so with its own seed."""
    if bag > 1:
        return (f"{bag} members per fold, differing only in their seed (initialisation, the copies drawn, and the "
                "validation copies); for each of them: " + _validation_text(refit) + "; the fold's test probability "
                "is the mean of its members' calibrated probabilities")
    if refit:
        return (f"nested refit: inside each training fold, {refit} of its {INNER_VAL_FOLDS} inner folds (25 % of its "
                "groups each, stratified) serve in turn as the validation part of an inner model, which early-stops "
                "on it; the fold's member is then trained on the whole training fold for the median of the inner "
                "models' best epochs (rounded up), and its temperature is fitted on their pooled validation parts; "
                "the test fold is used only for the reported metrics")
    return ("inside each training fold, 25 % of its groups (stratified) are held out as the validation part: model "
            "choices, early stopping and the temperature come from it; the test fold is used only for the reported "
            "metrics")


def write_results(results: dict[str, Any], oof: pd.DataFrame, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `cv_results.json` and `oof_predictions.csv` into `out_dir`; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "cv_results.json", out_dir / "oof_predictions.csv"
    atomic_write_text(json_path, dumps(results))
    atomic_write_text(csv_path, oof.to_csv(index=False))
    return json_path, csv_path


def store_in_card(model_dir: str | Path, results: dict[str, Any], *, allow_other_architecture: bool = False) -> dict[str, Any]:
    """Put CV results into a model card (`cross_validation` for source grouping, `cross_validation_patient`
    for patient grouping) and restate the card's evaluation note. The card is replaced atomically;
    `model.keras` (the only file `model_sha256` covers) is untouched. Returns the card.

    Raises ValueError when the results are for another architecture than the card's (unless allowed).
    """
    from mammo_core.store.card import read_card, write_card

    card = read_card(model_dir)
    if card.get("architecture") != results.get("architecture") and not allow_other_architecture:
        raise ValueError(f"{model_dir}: the card is for {card.get('architecture')!r} but the CV results are for "
                         f"{results.get('architecture')!r}; pass --allow-other-architecture to store them anyway.")
    stored = portable_paths({k: v for k, v in results.items() if k not in ("config",)},
                                     (results.get("dataset") or {}).get("path"))
    card[CARD_KEYS[results["group_by"]]] = json.loads(dumps(stored))
    evaluation = card.setdefault("evaluation", {})
    evaluation.setdefault("split_note", evaluation.get("note", ""))
    evaluation["note"] = evaluation_note(card)
    write_card(model_dir, card)
    return card


def evaluation_note(card: dict[str, Any]) -> str:
    """The card's split note followed by one sentence per stored cross-validation."""
    parts = [card.get("evaluation", {}).get("split_note", "")]
    for key in CARD_KEYS.values():
        cv = card.get(key)
        if not isinstance(cv, dict):
            continue
        p = cv.get("pooled", {})

        def fmt(metric: str) -> str:
            ci = p.get(f"{metric}_ci") or [float("nan")] * 2
            return f"{metric} {p.get(metric, float('nan')):.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

        parts.append(f"{cv.get('protocol', key)} ({cv.get('architecture')}, same training recipe, out-of-fold "
                     f"predictions pooled): {fmt('auc')}, {fmt('accuracy')}, {fmt('sensitivity')}, "
                     f"{fmt('specificity')} (95 % CIs from resampling "
                     f"{'source images' if cv.get('group_by') == 'source' else 'patients'}).")
    return " ".join(s for s in parts if s)
