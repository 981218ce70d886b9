"""Train a model on a dataset split and write a complete model directory (model, card, history, predictions).

The directory is built in a hidden staging folder and renamed into place only once every file is
written, under the one-training-at-a-time lock with SIGTERM as a clean cancellation (`store.run_safety`;
during a Keras fit it is raised at the next batch boundary): a crash, a cancel or a full disk leaves every
existing model untouched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from mammo_core.config import (CLASS_NAMES, DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_SEED, DEFAULT_THRESHOLD,
                               weights_dir)
from mammo_core.data import pipeline, splits
from mammo_core.data.datasets import scan_dataset
from mammo_core.errors import DatasetError
from mammo_core.evaluation.metrics import compute_metrics
from mammo_core.store.card import card_head, write_card
from mammo_core.store.files import atomic_write_text, sha256_file
from mammo_core.store.registry import (HISTORY_FILE, MODEL_FILE, PREDICTIONS_FILE, VAL_PREDICTIONS_FILE,
                                       record_model)
from mammo_core.store.run_safety import (Cancelled, cancel_at_batch_end, sigterm_cancels, staging_dir,
                                         training_lock)
from mammo_core.training.fit import fit_network

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")

PAPER_SPLIT_NOTE = (
    "Paper split: copies of every source image are in train, validation and test, so these test "
    "numbers measure recognition of augmented copies of training images, not performance on new "
    "mammograms. Use them only to compare with the paper."
)
GROUPED_SPLIT_NOTE = (
    "Grouped split: every {unit} has all its copies on one side (train, validation or test), so the "
    "test numbers estimate performance on mammograms the model has never seen. They rest on few "
    "{unit}s, so expect wide uncertainty."
)


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored in the model card."""

    data_dir: str
    name: str
    architecture: str = "paper-cnn"
    protocol: str = "grouped"
    group_by: str = "source"
    patient_map: str | None = None
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = DEFAULT_SEED
    channels: int = 1
    learning_rate: float | None = None
    #: paper-cnn only: "auto", "float32" or "mixed_bfloat16" (`fast_training`); other architectures train in float32
    precision: str = "auto"
    max_steps_per_epoch: int | None = None  # for smoke tests; None trains on every batch
    #: `preprocessing.PREPROCESSINGS`; None: the paper's whole-frame resize for the paper protocol (it
    #: reproduces the paper), the breast crop (`preprocessing.PREPROCESSING_ID`) otherwise
    preprocessing: str | None = None
    #: efficientnet-lite0-ft only: folds of the cross-validation whose fold models form the ensemble, and
    #: fields of `finetune.Recipe` that differ from its defaults
    folds: int = 5
    recipe: dict[str, Any] | None = None
    #: tf.distribute strategy (`distribute.STRATEGIES`): none, auto, mirrored or multi-worker (TF_CONFIG)
    strategy: str = "none"

    @property
    def input_pipeline(self) -> str:
        from mammo_core.io.preprocessing import LEGACY, PREPROCESSING_ID

        if self.preprocessing is not None:
            return self.preprocessing
        return LEGACY if self.protocol == "paper" else PREPROCESSING_ID

    def validate(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(
                f"model name {self.name!r} must start with a letter or digit and use only letters, digits, '.', '_' or '-'"
            )
        if self.protocol not in splits.PROTOCOLS:
            raise ValueError(f"protocol must be one of {splits.PROTOCOLS}, got {self.protocol!r}")
        if self.group_by not in splits.GROUP_BY:
            raise ValueError(f"group_by must be one of {splits.GROUP_BY}, got {self.group_by!r}")
        if self.group_by == "patient" and not self.patient_map:
            raise ValueError("grouping by patient needs a patient map (--patient-map)")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        from mammo_core.models.fast_training import check_precision

        check_precision(self.precision)
        from mammo_core.training.distribute import check_strategy

        check_strategy(self.strategy)
        from mammo_core.io.preprocessing import PREPROCESSINGS

        if self.input_pipeline not in PREPROCESSINGS:
            raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {self.preprocessing!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        from mammo_core.models.architectures import get_architecture

        arch = get_architecture(self.architecture)
        if self.strategy in ("mirrored", "multi-worker") and arch.strategy in ("features", "finetune"):
            raise ValueError(f"--strategy {self.strategy} trains networks on images; {self.architecture} trains a head "
                             "on cached features: use --strategy none")
        if arch.fixed_channels is not None and self.channels != arch.fixed_channels:
            raise ValueError(f"{self.architecture} takes {arch.fixed_channels}-channel input, got channels={self.channels}")


def _progress_callback(progress_path: Path | None, history_path: Path, epochs: int, steps: int,
                       on_progress: Callable[[dict], None] | None):
    import keras

    class Progress(keras.callbacks.Callback):
        """Write history.csv after each epoch and progress.json (epoch, step, logs) at most twice a second."""

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[dict[str, Any]] = []
            self.epoch = 0
            self.last = 0.0
            self.start = time.time()

        def _write(self, step: int, logs: dict | None, force: bool = False) -> None:
            now = time.time()
            if not force and now - self.last < 0.5:
                return
            self.last = now
            state = {
                "state": "running", "epoch": self.epoch + 1, "epochs": epochs, "step": step, "steps": steps,
                "logs": {k: float(v) for k, v in (logs or {}).items()}, "elapsed_s": round(now - self.start, 1),
                "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "history": self.rows,
            }
            if progress_path is not None:
                atomic_write_text(progress_path, json.dumps(state))
            if on_progress is not None:
                on_progress(state)

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            self._write(0, logs, force=True)

        def on_train_batch_end(self, batch, logs=None):
            self._write(batch + 1, logs)

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
            self.rows.append(row)
            pd.DataFrame(self.rows).to_csv(history_path, index=False)
            self._write(steps, logs, force=True)

    return Progress()


def _split_summary(frame: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split in splits.SPLITS:
        part = frame[frame["split"] == split]
        out[split] = {
            "images": int(len(part)),
            **{name: int((part["label"] == i).sum()) for i, name in enumerate(CLASS_NAMES)},
            "source_images": int(part["group"].nunique()),
            "patients": int(part["patient"].nunique()),
        }
    groups = {s: set(frame.loc[frame["split"] == s, "group"]) for s in splits.SPLITS}
    out["shared_source_images"] = {
        "train-val": len(groups["train"] & groups["val"]),
        "train-test": len(groups["train"] & groups["test"]),
        "val-test": len(groups["val"] & groups["test"]),
    }
    return out


def _predictions_table(part: pd.DataFrame, probs: np.ndarray, root: Path) -> pd.DataFrame:
    return pd.DataFrame({
        "path": [os.path.relpath(p, root) for p in part["path"]],
        "group": part["group"].to_numpy(),
        "patient": part["patient"].to_numpy(),
        "label": part["label"].to_numpy(),
        "probability": probs.astype(float),
    })


def train(config: TrainConfig, *, root: str | Path | None = None, progress_path: str | Path | None = None,
          on_progress: Callable[[dict], None] | None = None, log: Callable[[str], None] = print) -> Path:
    """Train `config.architecture` and write `root/<config.name>/`. Returns the model directory.

    Raises ValueError for a bad option, DatasetError for a bad dataset, TrainingBusyError when
    another run holds the lock, FileExistsError when the name is taken, Cancelled on SIGTERM.
    """
    config.validate()
    from mammo_core.training import distribute

    distribute.make_strategy(config.strategy)  # before any other TensorFlow operation (multi-worker needs it)
    # multi-worker: only the chief writes into `root`; the other workers train alongside into a scratch folder
    root = distribute.output_root(Path(root) if root is not None else weights_dir(), config.strategy)
    final_dir = root / config.name
    if final_dir.exists():
        raise FileExistsError(f"{final_dir}: a model with this name exists; choose another name (existing models are never overwritten).")
    progress_path = Path(progress_path) if progress_path is not None else None
    with distribute.scratch_removed(root), training_lock(root), sigterm_cancels() as cancel_requested:
        try:
            with staging_dir(root, config.name) as tmp_dir:
                card = _train_into(config, tmp_dir, root, progress_path, on_progress, log)
                if final_dir.exists():
                    raise FileExistsError(f"{final_dir}: appeared while training; the new model is discarded.")
                record_model(root, config.name, card["model_sha256"])  # trusted as "trained here" (registry)
                os.rename(tmp_dir, final_dir)
        except BaseException as exc:
            cancelled = isinstance(exc, (Cancelled, KeyboardInterrupt)) or cancel_requested.is_set()
            if progress_path is not None:
                with contextlib.suppress(OSError):
                    atomic_write_text(progress_path, json.dumps({"state": "cancelled" if cancelled else "failed",
                                                                 "error": str(exc)}))
            if cancelled and not isinstance(exc, (Cancelled, KeyboardInterrupt)):
                raise Cancelled("training cancelled") from exc  # SIGTERM, wrapped by library code
            raise
    if progress_path is not None:
        atomic_write_text(progress_path, json.dumps({"state": "finished", "model": config.name,
                                                     "metrics": card["metrics"]["test"]}))
    log(f"model written to {final_dir}")
    return final_dir


def _fit_on_images(config: TrainConfig, arch, parts: dict[str, pd.DataFrame], out: Path,
                   progress_path: Path | None, on_progress: Callable[[dict], None] | None,
                   log: Callable[[str], None]) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    """Decode the images and fit the whole network; returns (model, val/test probabilities, fit facts)."""
    import keras

    from mammo_core.inference.predict import predict_arrays
    from mammo_core.models.architectures import build_model, flip_augment
    from mammo_core.models.fast_training import training_model
    from mammo_core.training.heads import class_weights

    log(f"decoding {sum(len(p) for p in parts.values())} images from {config.data_dir} ...")
    t0 = time.time()
    images = {s: pipeline.load_images(part["path"].tolist(), preprocessing=config.input_pipeline)
              for s, part in parts.items()}
    log(f"decoded in {time.time() - t0:.1f} s; train {len(parts['train'])}, val {len(parts['val'])}, test {len(parts['test'])}")

    from mammo_core.training import distribute

    keras.utils.set_random_seed(config.seed)
    strategy = distribute.make_strategy(config.strategy)
    with distribute.scope(strategy):  # variables mirrored over the strategy's devices (none: one device)
        model = build_model(config.architecture, channels=config.channels, compile=False)
        # paper-cnn trains through an equivalent, cheaper computation; `model` is what gets saved
        trainer, computation = training_model(model, arch, precision=config.precision, learning_rate=config.learning_rate)
    computation["distribution"] = distribute.describe(strategy, config.strategy)
    log(f"training computation: {computation['precision']}, blocks {computation['block_order']}")
    if trainer is model and config.precision == "mixed_bfloat16":  # not a paper-cnn
        log(f"note: --precision applies to paper-cnn only; {config.architecture} trains in float32")
    train_ds = pipeline.make_tf_dataset(images["train"], parts["train"]["label"], batch_size=config.batch_size,
                                        shuffle=True, seed=config.seed, channels=config.channels,
                                        augment=flip_augment if arch.augment_flips else None)
    steps = int(np.ceil(len(parts["train"]) / config.batch_size))
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
        train_ds = train_ds.take(steps)
    progress = _progress_callback(progress_path, out / HISTORY_FILE, config.epochs, steps, on_progress)
    weights = class_weights(parts["train"]["label"].to_numpy()) if arch.class_weighted else None
    keep_best = config.protocol != "paper"  # the reproduction keeps the paper's last epoch
    t0 = time.time()
    with cancel_at_batch_end() as cancel:  # SIGTERM raises at a batch boundary, not inside TensorFlow
        best_epoch = fit_network(model, trainer, strategy, train_ds, images["val"], parts["val"]["label"],
                                 epochs=config.epochs, batch_size=config.batch_size, channels=config.channels,
                                 class_weight=weights, callbacks=[*cancel, progress], keep_best=keep_best, log=log,
                                 checkpoints=distribute.checkpoint_dir(out, config.name),
                                 chief=distribute.is_chief(config.strategy))
    if distribute.is_multi_worker(strategy):
        log(f"{distribute.task_name(config.strategy)}: final weights sha256 {distribute.weights_digest(model)}")
    computation["kept_epoch"] = (f"{best_epoch} (lowest validation loss)" if keep_best
                                 else f"{config.epochs} (the last, as in the paper)")
    fit_seconds = time.time() - t0
    probs = {split: predict_arrays(model, images[split], channels=config.channels, batch_size=128)
             for split in ("val", "test")}
    return model, probs, {"progress_rows": progress.rows, "steps": steps, "fit_seconds": fit_seconds,
                          "trained_images": config.epochs * min(len(parts["train"]), steps * config.batch_size),
                          "card_training": {"computation": computation}}


def _fit_feature_head(config: TrainConfig, frame: pd.DataFrame, parts: dict[str, pd.DataFrame], out: Path,
                      progress_path: Path | None, on_progress: Callable[[dict], None] | None,
                      log: Callable[[str], None]) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    """Frozen backbone: fit the Dense(1) head on cached features and put it into the full classifier.

    Features come from `feature_cache.cached_features` for the whole dataset (one cache entry, shared with
    cross-validation). The head's L2 is chosen on the validation split, as in `mammo_core cv`.
    """
    from mammo_core.models.architectures import build_model
    from mammo_core.training import feature_cache, heads

    full = feature_cache.cached_features(frame["path"].tolist(), architecture=config.architecture,
                                    preprocessing=config.input_pipeline, log=log)
    row = pd.Series(np.arange(len(frame)), index=[os.path.abspath(p) for p in frame["path"]])
    feats = {s: full[row[[os.path.abspath(p) for p in part["path"]]].to_numpy()] for s, part in parts.items()}
    labels = {s: part["label"].to_numpy() for s, part in parts.items()}
    steps = int(np.ceil(len(parts["train"]) / config.batch_size))
    t0 = time.time()
    with cancel_at_batch_end() as cancel:  # SIGTERM raises at a batch boundary, not inside TensorFlow
        fit = heads.select_head(
            feats["train"], labels["train"], feats["val"], labels["val"], epochs=config.epochs,
            batch_size=config.batch_size, learning_rate=config.learning_rate or 1e-3, seed=config.seed,
            callbacks_for=lambda i: [*cancel, _progress_callback(progress_path, out / HISTORY_FILE, config.epochs,
                                                                 steps, on_progress)],
        )
    fit_seconds = time.time() - t0
    pd.DataFrame(fit["history"]).to_csv(out / HISTORY_FILE, index=False)  # the chosen head's curves
    log(f"head: L2 {fit['l2']} chosen on validation AUC ({fit['val_auc']:.3f}), epoch {fit['best_epoch']}")
    model = build_model(config.architecture, channels=config.channels, compile=False)  # no optimizer in the saved file
    heads.set_head(model, fit["kernel"], fit["bias"])
    probs = {s: heads.head_probabilities(feats[s], fit["kernel"], fit["bias"]) for s in ("val", "test")}
    seconds = feature_cache.extraction_seconds(frame["path"].tolist(), architecture=config.architecture,
                                          preprocessing=config.input_pipeline)
    card_training = {
        "strategy": "frozen ImageNet backbone; Dense(1) head trained on cached pooled features",
        "head": {"l2": fit["l2"], "dropout": heads.HEAD_DROPOUT, "best_epoch": fit["best_epoch"],
                 "selection": "L2 by validation AUC, epoch by validation loss", "candidates": fit["candidates"]},
        "feature_extraction_images_per_second": round(len(frame) / seconds, 1) if seconds else None,
    }
    return model, probs, {"progress_rows": fit["history"], "steps": steps, "fit_seconds": fit_seconds,
                          "trained_images": len(parts["train"]) * config.epochs * len(fit["candidates"]),
                          "card_training": card_training}


def _train_into(config: TrainConfig, out: Path, root: Path, progress_path: Path | None,
                on_progress: Callable[[dict], None] | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Train into the staging folder `out`: split, fit, predictions, model.keras and the card. Returns the card."""
    from mammo_core.models.architectures import get_architecture

    arch = get_architecture(config.architecture)
    if arch.strategy == "finetune":
        from mammo_core.store.files import dumps
        from mammo_core.training.ensemble import train_ensemble_into

        card = json.loads(dumps(train_ensemble_into(config, out, log)))
        write_card(out, card)
        return card
    frame, parts = _split(config)
    if arch.strategy == "features":
        model, probs, fitted = _fit_feature_head(config, frame, parts, out, progress_path, on_progress, log)
    else:
        model, probs, fitted = _fit_on_images(config, arch, parts, out, progress_path, on_progress, log)
    preds = {split: _predictions_table(parts[split], probs[split], Path(config.data_dir)) for split in ("val", "test")}
    preds["test"].to_csv(out / PREDICTIONS_FILE, index=False)
    preds["val"].to_csv(out / VAL_PREDICTIONS_FILE, index=False)
    metrics = {s: compute_metrics(p["label"], p["probability"], threshold=DEFAULT_THRESHOLD) for s, p in preds.items()}
    model.save(out / MODEL_FILE)
    card = _card(config, arch, model, frame, fitted, metrics)
    card["model_sha256"] = sha256_file(out / MODEL_FILE)
    write_card(out, card)
    m = metrics["test"]
    log(f"test: accuracy {m['accuracy']:.4f}, loss {m['loss']:.4f}, AUC {m['auc']:.4f}")
    return card


def _split(config: TrainConfig) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The dataset index with its `split` column, and its train/val/test parts; DatasetError when a part
    lacks a class."""
    data_root = Path(config.data_dir)
    frame = scan_dataset(data_root, patient_map=config.patient_map)
    frame = splits.assign_split(frame, protocol=config.protocol, seed=config.seed, group_by=config.group_by)
    parts = {s: frame[frame["split"] == s].reset_index(drop=True) for s in splits.SPLITS}
    for s, part in parts.items():
        if part["label"].nunique() < 2:
            raise DatasetError(f"{data_root}: the {s} split has only one class; it needs both benign and malignant images.")
    return frame, parts


def _card(config: TrainConfig, arch: Any, model: Any, frame: pd.DataFrame, fitted: dict[str, Any],
          metrics: dict[str, Any]) -> dict[str, Any]:
    """The trained model's card (without `model_sha256`): split, training facts, evaluation note, metrics."""
    progress, steps, fit_seconds, trained_images = (fitted[k] for k in ("progress_rows", "steps", "fit_seconds",
                                                                          "trained_images"))
    unit = "source image" if config.group_by == "source" else "patient"
    note = PAPER_SPLIT_NOTE if config.protocol == "paper" else GROUPED_SPLIT_NOTE.format(unit=unit)
    return {
        **card_head(config, model, frame),
        "split": {"protocol": config.protocol, "group_by": config.group_by if config.protocol == "grouped" else None,
                  "seed": config.seed, **_split_summary(frame)},
        "training": {
            "epochs": config.epochs, "batch_size": config.batch_size, "seed": config.seed,
            "optimizer": arch.optimizer, "learning_rate": config.learning_rate or arch.learning_rate,
            "loss": "binary_crossentropy", "validation": "val split (never the test split)",
            "steps_per_epoch": steps, "fit_seconds": round(fit_seconds, 1),
            "images_per_second": round(trained_images / fit_seconds, 1) if fit_seconds else None,
            "final_epoch": progress[-1] if progress else None,
            "class_weighted": arch.class_weighted, "augment_flips": arch.augment_flips,
            **fitted.get("card_training", {}),
        },
        **({"cam_layer": arch.cam_layer} if arch.cam_layer else {}),
        "threshold": DEFAULT_THRESHOLD,
        "evaluation": {"note": note},
        "metrics": metrics,
        "config": asdict(config),
    }
