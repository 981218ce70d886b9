"""Leakage-free k-fold cross-validation, grouped by source image or patient, with cluster-bootstrap CIs.

Every copy of a source image (or every image of a patient, with ``group_by="patient"``) lies in one
fold only (`data.group_folds`, stratified by label). For each test fold, the remaining folds are split
again by group into a training part and a validation part (25 % of their groups); everything that is
chosen — the head's L2 strength, the epoch to keep, the calibration temperature — is chosen on that
validation part, never on the test fold. Test-fold probabilities are temperature-calibrated with the
fold's own temperature, then pooled over folds (out-of-fold predictions). Confidence intervals come
from a cluster bootstrap that resamples groups (source images or patients) with replacement and takes
all their rows, because copies of one image are not independent observations.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from . import data as data_mod
from .calibration import apply_temperature, dumps, fit_temperature
from .config import DEFAULT_SEED, DEFAULT_THRESHOLD
from .evaluate import auc as auc_score
from .evaluate import sensitivity_specificity
from .preprocessing import PREPROCESSING_ID

METRICS: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity")
INNER_VAL_FOLDS = 4  # the validation part is 1 of 4 group folds of the training folds: 25 % of their groups
CARD_KEYS = {"source": "cross_validation", "patient": "cross_validation_patient"}


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
    #: tf.distribute strategy for image-trained architectures (`distribute.STRATEGIES`)
    strategy: str = "none"

    def validate(self) -> None:
        from .fast_training import check_precision
        from .model import get_architecture

        from .distribute import check_strategy

        arch = get_architecture(self.architecture)
        check_precision(self.precision)
        check_strategy(self.strategy)
        if self.strategy in ("mirrored", "multi-worker") and arch.strategy in ("features", "finetune"):
            raise ValueError(f"--strategy {self.strategy} trains networks on images; {self.architecture} does not")
        if self.k < 2:
            raise ValueError(f"k must be at least 2, got {self.k}")
        if self.group_by not in data_mod.GROUP_BY:
            raise ValueError(f"group_by must be one of {data_mod.GROUP_BY}, got {self.group_by!r}")
        if self.group_by == "patient" and not self.patient_map:
            raise ValueError("grouping by patient needs a patient map (--patient-map, or the dataset's patients.csv)")
        for key in ("copies_per_source", "val_copies_per_source", "epochs"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be at least 1, got {value}")
        if self.n_boot < 100:
            raise ValueError(f"n_boot must be at least 100, got {self.n_boot}")


# --- metrics and the cluster bootstrap ----------------------------------------------------------------

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


# --- per-fold trainers ---------------------------------------------------------------------------------

def _subsample(part: pd.DataFrame, per_group: int | None, seed: int) -> pd.DataFrame:
    """At most `per_group` rows of each source image (seeded), keeping the row order."""
    if per_group is None:
        return part
    rng = np.random.default_rng(seed)
    keep = []
    for _, positions in sorted(part.groupby("group").indices.items()):
        keep.extend(rng.choice(positions, size=min(per_group, len(positions)), replace=False).tolist())
    return part.iloc[sorted(keep)]


class FeatureHeadTrainer:
    """Frozen EfficientNet-Lite0 features (cached once for every image) and a Dense(1) head per fold."""

    def __init__(self, frame: pd.DataFrame, config: CVConfig, log: Callable[[str], None]) -> None:
        from . import features

        self.features_mod = features
        self.features = features.cached_features(frame["path"].tolist(), architecture=config.architecture,
                                                 preprocessing=config.preprocessing, log=log)
        self.extraction_seconds = features.extraction_seconds(frame["path"].tolist(), architecture=config.architecture,
                                                              preprocessing=config.preprocessing)
        self.epochs = config.epochs or features.HEAD_EPOCHS
        self.config = config

    def budget(self) -> dict[str, Any]:
        f = self.features_mod
        n = len(self.features)
        return {
            "strategy": f"frozen ImageNet backbone; pooled {self.features.shape[1]}-d features extracted once per image and cached; "
                        "Dense(1) head trained per fold on every training copy",
            "head": {"dropout": f.HEAD_DROPOUT, "l2_grid": list(f.HEAD_L2_GRID), "epochs": self.epochs,
                     "batch_size": self.config.batch_size, "optimizer": "adam", "learning_rate": 1e-3,
                     "class_weighted": True,
                     "selection": "L2 by validation AUC; epoch by validation loss (validation part of the training folds)"},
            "copies_per_source": None,
            "feature_extraction_seconds": round(self.extraction_seconds, 1) if self.extraction_seconds else None,
            "feature_extraction_images_per_second": round(n / self.extraction_seconds, 1) if self.extraction_seconds else None,
        }

    def __call__(self, train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, seed: int) -> dict[str, Any]:
        f = self.features_mod
        fit = f.select_head(self.features[train.index], train["label"].to_numpy(), self.features[val.index],
                            val["label"].to_numpy(), epochs=self.epochs, batch_size=self.config.batch_size, seed=seed)
        return {
            "val": f.head_probabilities(self.features[val.index], fit["kernel"], fit["bias"]),
            "test": f.head_probabilities(self.features[test.index], fit["kernel"], fit["bias"]),
            "val_frame": val,
            "info": {"l2": fit["l2"], "best_epoch": fit["best_epoch"], "candidates": fit["candidates"]},
            "trained_images": len(train) * self.epochs * len(f.HEAD_L2_GRID),
        }


class ImageModelTrainer:
    """A network trained from scratch on decoded images per fold, on a documented budget of copies and epochs."""

    DEFAULT_EPOCHS = 10

    def __init__(self, frame: pd.DataFrame, config: CVConfig, log: Callable[[str], None]) -> None:
        from .model import get_architecture

        self.arch = get_architecture(config.architecture)
        self.config = config
        self.epochs = config.epochs or self.DEFAULT_EPOCHS
        self.computation: dict[str, str] | None = None  # set by the first fold (fast_training.training_model)
        log(f"decoding {len(frame)} images ...")
        t0 = time.time()
        self.images = data_mod.load_images(frame["path"].tolist(), preprocessing=config.preprocessing)
        log(f"decoded in {time.time() - t0:.1f} s")

    def budget(self) -> dict[str, Any]:
        a = self.arch
        return {
            "strategy": "trained from scratch per fold on a subsample of copies",
            "epochs": self.epochs, "batch_size": self.config.batch_size,
            "copies_per_source": self.config.copies_per_source,
            "val_copies_per_source": self.config.val_copies_per_source,
            "optimizer": a.optimizer, "learning_rate": a.learning_rate,
            "class_weighted": a.class_weighted, "augment_flips": a.augment_flips,
            "selection": "epoch with the lowest validation loss (validation part of the training folds; "
                         "train.fit_network, Keras EarlyStopping restore_best_weights), as `mammo_core train` does",
            **({"computation": self.computation} if self.computation else {}),
        }

    def __call__(self, train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, seed: int) -> dict[str, Any]:
        import keras

        from .fast_training import training_model
        from .features import class_weights
        from .model import build_model, flip_augment
        from .predict import predict_arrays
        from .train import fit_network

        cfg = self.config
        train = _subsample(train, cfg.copies_per_source, seed)
        val = _subsample(val, cfg.val_copies_per_source, seed)
        from . import distribute

        keras.utils.set_random_seed(seed)
        strategy = distribute.make_strategy(cfg.strategy)
        with distribute.scope(strategy):
            model = build_model(cfg.architecture, channels=1, compile=False)
            trainer, self.computation = training_model(model, self.arch, precision=cfg.precision)
        train_ds = data_mod.make_tf_dataset(self.images[train.index], train["label"], batch_size=cfg.batch_size,
                                            shuffle=True, seed=seed,
                                            augment=flip_augment if self.arch.augment_flips else None)
        weights = class_weights(train["label"].to_numpy()) if self.arch.class_weighted else None
        best_epoch = fit_network(model, trainer, strategy, train_ds, self.images[val.index], val["label"],
                                 epochs=self.epochs, batch_size=cfg.batch_size, channels=1, class_weight=weights,
                                 callbacks=[], keep_best=True)
        return {
            "val": predict_arrays(model, self.images[val.index], channels=1),
            "test": predict_arrays(model, self.images[test.index], channels=1),
            "val_frame": val,
            "info": {"best_epoch": best_epoch, "train_images": len(train), "val_images": len(val)},
            "trained_images": len(train) * self.epochs,
        }


class FineTuneTrainer:
    """EfficientNet-Lite0's upper stages fine-tuned per fold on cached trunk activations (`finetune.fit_member`).

    Keeps every fold's member: the shipped ensemble is made of them (`ensemble.train_ensemble_into`).
    """

    def __init__(self, frame: pd.DataFrame, config: CVConfig, log: Callable[[str], None]) -> None:
        from . import finetune

        self.ft = finetune
        self.recipe = config.recipe or finetune.Recipe()
        self.recipe.validate()
        self.frame = frame
        self.log = log
        self.activations, self.extraction_seconds = finetune.cached_activations(
            frame["path"].tolist(), cut=self.recipe.cut, preprocessing=config.preprocessing, log=log)
        _, self.core = finetune.build_parts(self.recipe.cut)
        self.labels = frame["label"].to_numpy()
        self.groups = frame["group"].to_numpy()
        self.members: list[Any] = []
        self.images_per_second: list[float] = []

    def budget(self) -> dict[str, Any]:
        n = len(self.activations)
        return {
            "strategy": ("ImageNet EfficientNet-Lite0 fine-tuned whole (BatchNorm frozen) from decoded inputs cached "
                         "once per image, with a Dense(1) head, per fold" if self.ft.CUTS[self.recipe.cut] is None else
                         f"ImageNet EfficientNet-Lite0 trunk frozen up to {self.ft.CUTS[self.recipe.cut]} (activations "
                         f"cached once per image); stages from {self.recipe.cut} and a Dense(1) head fine-tuned per fold"),
            "recipe": self.ft.recipe_dict(self.recipe),
            "optimizer": "adamw", "class_weighted": True, "batchnorm": "inference mode, ImageNet statistics, frozen",
            "selection": "epoch with the best validation AUC (Keras EarlyStopping, restore_best_weights)",
            "copies_per_source": self.recipe.copies_per_source,
            "feature_extraction_seconds": round(self.extraction_seconds, 1) if self.extraction_seconds else None,
            "feature_extraction_images_per_second": round(n / self.extraction_seconds, 1) if self.extraction_seconds else None,
        }

    def __call__(self, train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, seed: int) -> dict[str, Any]:
        from scipy.special import expit

        member, info = self.ft.fit_member(self.activations, self.labels, self.groups, train.index.to_numpy(),
                                          val.index.to_numpy(), self.recipe, seed=seed, core=self.core,
                                          index=len(self.members), log=self.log)
        self.members.append(member)
        test_logits = self.ft.predict_logits(member, self.activations[test.index.to_numpy()]) if len(test) else np.zeros(0)
        return {
            "val": expit(info["val_logits"].astype(np.float64)),
            "test": expit(test_logits.astype(np.float64)),
            "val_frame": self.frame.iloc[info["val_rows"]],
            "info": {"best_epoch": info["best_epoch"], "epochs_run": info["epochs_run"],
                     "train_images_per_epoch": info["trained_images"] // max(info["epochs_run"], 1)},
            "trained_images": info["trained_images"],
        }


def _trainer(frame: pd.DataFrame, config: CVConfig, log: Callable[[str], None]):
    from .model import get_architecture

    strategy = get_architecture(config.architecture).strategy
    if strategy == "features":
        return FeatureHeadTrainer(frame, config, log)
    if strategy == "finetune":
        return FineTuneTrainer(frame, config, log)
    return ImageModelTrainer(frame, config, log)


# --- the run -------------------------------------------------------------------------------------------

def protocol_text(k: int, group_by: str) -> str:
    unit = "source image" if group_by == "source" else "patient"
    return f"{k}-fold CV grouped by {unit}, stratified"


def fold_assignment(frame: pd.DataFrame, config: CVConfig) -> tuple[np.ndarray, list[np.ndarray]]:
    """Test fold per row, and per fold a boolean "validation part" mask over the rows (False on the test fold)."""
    folds = data_mod.group_folds(frame, n_folds=config.k, seed=config.seed, group_by=config.group_by)
    val_masks = []
    for f in range(config.k):
        rest = frame[folds != f]
        column = "group" if config.group_by == "source" else "patient"
        per_class = rest.groupby(column)["label"].agg(lambda s: int(round(s.mean()))).value_counts().min()
        # 4 inner folds (a 25 % validation part) when every class has the groups for it, else fewer (tiny data)
        n_inner = int(max(2, min(INNER_VAL_FOLDS, per_class)))
        inner = data_mod.group_folds(rest, n_folds=n_inner, seed=config.seed + 1 + f, group_by=config.group_by)
        mask = np.zeros(len(frame), dtype=bool)
        mask[np.flatnonzero(folds != f)[inner == 0]] = True
        val_masks.append(mask)
    return folds, val_masks


def run_cv(config: CVConfig, *, log: Callable[[str], None] = print) -> tuple[dict[str, Any], pd.DataFrame]:
    """Cross-validate `config.architecture`. Returns (results dict in the model-card shape, out-of-fold table).

    The out-of-fold table has one row per image: path, group, patient, label, fold, probability
    (calibrated with the fold's temperature), probability_uncalibrated.
    """
    config.validate()
    from .distribute import make_strategy

    make_strategy(config.strategy)  # before any other TensorFlow operation (multi-worker needs it)
    frame = data_mod.scan_dataset(config.data_dir, patient_map=config.patient_map).reset_index(drop=True)
    trainer = _trainer(frame, config, log)
    return run_folds(config, frame, trainer, log=log)


def run_folds(config: CVConfig, frame: pd.DataFrame, trainer: Any, *,
              log: Callable[[str], None] = print) -> tuple[dict[str, Any], pd.DataFrame]:
    """The fold loop of `run_cv` with a given trainer (the ensemble keeps the trainer's fold members)."""
    folds, val_masks = fold_assignment(frame, config)
    group_col = "group" if config.group_by == "source" else "patient"
    oof_uncal = np.full(len(frame), np.nan)
    oof_cal = np.full(len(frame), np.nan)
    fold_rows = []
    seconds = []
    trained = 0
    for f in range(config.k):
        test = frame[folds == f]
        val = frame[val_masks[f]]
        train = frame[(folds != f) & ~val_masks[f]]
        if set(train[group_col]) & set(test[group_col]) or set(val[group_col]) & set(test[group_col]):
            raise RuntimeError(f"fold {f}: a {group_col} is on both sides of the split; the folds leak")
        if config.inner_only:
            test = test.iloc[0:0]  # recipe selection: the test fold is never scored
        t0 = time.time()
        out = trainer(train, val, test, seed=config.seed + f)
        seconds.append(time.time() - t0)
        trained += out["trained_images"]
        val_labels = out["val_frame"]["label"].to_numpy()
        if config.inner_only:
            fold_rows.append({"fold": f, "val_auc": auc_score(val_labels, out["val"]), "minutes": round(seconds[-1] / 60, 2),
                              **out["info"]})
            log(f"fold {f}: validation AUC {fold_rows[-1]['val_auc']:.3f}; {seconds[-1]:.0f} s")
            continue
        temperature = fit_temperature(val_labels, out["val"])
        test_cal = apply_temperature(out["test"], temperature)
        oof_uncal[test.index] = out["test"]
        oof_cal[test.index] = test_cal
        m = point_metrics(test["label"].to_numpy(), test_cal, config.threshold)
        row = {"fold": f, **m, "n_images": int(len(test)), "n_groups": int(test[group_col].nunique()),
               "n_source_images": int(test["group"].nunique()), "n_patients": int(test["patient"].nunique()),
               "val_auc": auc_score(val_labels, out["val"]), "temperature": temperature,
               "train_images": int(len(train)), "val_images": int(len(val)),
               "minutes": round(seconds[-1] / 60, 2), **out["info"]}
        fold_rows.append(row)
        log(f"fold {f}: test AUC {m['auc']:.3f}, acc {m['accuracy']:.3f}, sens {m['sensitivity']:.3f}, "
            f"spec {m['specificity']:.3f} ({len(test)} images, {row['n_groups']} groups); "
            f"validation AUC {row['val_auc']:.3f}; {seconds[-1]:.0f} s")
    if config.inner_only:
        return {"protocol": protocol_text(config.k, config.group_by) + " (validation parts only)",
                "architecture": config.architecture, "group_by": config.group_by, "folds": fold_rows,
                "mean_validation_auc": float(np.nanmean([r["val_auc"] for r in fold_rows])),
                "training": trainer.budget(), "config": asdict(config)}, pd.DataFrame()
    oof = pd.DataFrame({"path": frame["path"], "group": frame["group"], "patient": frame["patient"],
                        "label": frame["label"], "fold": folds, "probability": oof_cal,
                        "probability_uncalibrated": oof_uncal})
    pooled = point_metrics(oof["label"].to_numpy(), oof_cal, config.threshold)
    cis = cluster_bootstrap(oof["label"], oof_cal, oof[group_col], n_boot=config.n_boot, seed=config.seed,
                            threshold=config.threshold)
    pooled_out: dict[str, Any] = {}
    for metric in METRICS:
        pooled_out[metric] = pooled[metric]
        pooled_out[f"{metric}_ci"] = cis[metric]
    pooled_out.update({"n_images": int(len(oof)), "n_groups": int(oof[group_col].nunique()),
                       "auc_uncalibrated": auc_score(oof["label"], oof_uncal)})
    total = float(sum(seconds))
    budget = trainer.budget()
    budget.update({"minutes_per_fold": round(total / 60 / config.k, 2),
                   "train_images_per_second": round(trained / total, 1) if total else None})
    results = {
        "protocol": protocol_text(config.k, config.group_by),
        "k": config.k,
        "group_by": config.group_by,
        "seed": config.seed,
        "architecture": config.architecture,
        "training": budget,
        "validation": "inside each training fold, 25 % of its groups (stratified) are held out as the validation "
                      "part: model choices, early stopping and the temperature come from it; the test fold is "
                      "used only for the reported metrics",
        "threshold": f"{config.threshold} on the temperature-calibrated probability (the card's default threshold)",
        "confidence_intervals": f"95 % percentile cluster bootstrap, {config.n_boot} resamples of "
                                f"{'source images' if config.group_by == 'source' else 'patients'} (all copies of a drawn group)",
        "folds": fold_rows,
        "pooled": pooled_out,
        "mean_validation_auc": float(np.nanmean([r["val_auc"] for r in fold_rows])),
        "dataset": {"path": str(config.data_dir), **data_mod.fingerprint(frame, config.data_dir),
                    "patient_map": config.patient_map},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
    }
    return results, oof


def write_results(results: dict[str, Any], oof: pd.DataFrame, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `cv_results.json` and `oof_predictions.csv` into `out_dir`; returns both paths."""
    from .registry import atomic_write_text

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
    from .registry import read_card, write_card

    card = read_card(model_dir)
    if card.get("architecture") != results.get("architecture") and not allow_other_architecture:
        raise ValueError(f"{model_dir}: the card is for {card.get('architecture')!r} but the CV results are for "
                         f"{results.get('architecture')!r}; pass --allow-other-architecture to store them anyway.")
    stored = data_mod.portable_paths({k: v for k, v in results.items() if k not in ("config",)},
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
