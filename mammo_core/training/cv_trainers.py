"""The per-fold trainers of cross-validation: one per training strategy (frozen-feature head, image network,
fine-tuned ensemble member), each called as `trainer(train, val, test, seed)` and returning the fold's
validation and test probabilities with what it chose.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd

from mammo_core.data import pipeline

if TYPE_CHECKING:  # pragma: no cover
    from mammo_core.training.cv import CVConfig


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
        from mammo_core.training import feature_cache, heads

        self.heads = heads
        self.features = feature_cache.cached_features(frame["path"].tolist(), architecture=config.architecture,
                                                 preprocessing=config.preprocessing, log=log)
        self.extraction_seconds = feature_cache.extraction_seconds(frame["path"].tolist(), architecture=config.architecture,
                                                              preprocessing=config.preprocessing)
        self.epochs = config.epochs or heads.HEAD_EPOCHS
        self.config = config

    def budget(self) -> dict[str, Any]:
        f = self.heads
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
        f = self.heads
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
        from mammo_core.models.architectures import get_architecture

        self.arch = get_architecture(config.architecture)
        self.config = config
        self.epochs = config.epochs or self.DEFAULT_EPOCHS
        self.computation: dict[str, str] | None = None  # set by the first fold (fast_training.training_model)
        log(f"decoding {len(frame)} images ...")
        t0 = time.time()
        self.images = pipeline.load_images(frame["path"].tolist(), preprocessing=config.preprocessing)
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

        from mammo_core.inference.predict import predict_arrays
        from mammo_core.models.architectures import build_model, flip_augment
        from mammo_core.models.fast_training import training_model
        from mammo_core.training import distribute
        from mammo_core.training.fit import fit_network
        from mammo_core.training.heads import class_weights

        cfg = self.config
        train = _subsample(train, cfg.copies_per_source, seed)
        val = _subsample(val, cfg.val_copies_per_source, seed)

        keras.utils.set_random_seed(seed)
        strategy = distribute.make_strategy(cfg.strategy)
        with distribute.scope(strategy):
            model = build_model(cfg.architecture, channels=1, compile=False)
            trainer, self.computation = training_model(model, self.arch, precision=cfg.precision)
        train_ds = pipeline.make_tf_dataset(self.images[train.index], train["label"], batch_size=cfg.batch_size,
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

    Keeps every fold's member: the shipped ensemble is made of them (`training.ensemble.train_ensemble_into`).
    """

    def __init__(self, frame: pd.DataFrame, config: CVConfig, log: Callable[[str], None]) -> None:
        from mammo_core.training import finetune

        self.ft = finetune
        self.recipe = config.recipe or finetune.Recipe()
        self.recipe.validate()
        self.frame = frame
        self.log = log
        self.activations, self.extraction_seconds = finetune.cached_activations(
            frame["path"].tolist(), cut=self.recipe.cut, preprocessing=config.preprocessing,
            input_scale=self.recipe.input_scale, backbone=self.recipe.backbone, log=log)
        _, self.core = finetune.build_parts(self.recipe.cut, self.recipe.input_scale, self.recipe.backbone)
        self.labels = frame["label"].to_numpy()
        self.groups = frame["group"].to_numpy()
        self.members: list[Any] = []
        self.images_per_second: list[float] = []

    def budget(self) -> dict[str, Any]:
        n = len(self.activations)
        net = f"ImageNet EfficientNet-{self.recipe.backbone.capitalize()}"
        layer = self.ft.trunk_layer(self.recipe.cut, self.recipe.backbone)
        return {
            "strategy": (f"{net} fine-tuned whole (BatchNorm frozen) from decoded inputs cached "
                         "once per image, with a Dense(1) head, per fold" if layer is None else
                         f"{net} trunk frozen up to {layer} (activations "
                         f"cached once per image); stages from {self.recipe.cut} and a Dense(1) head fine-tuned per fold")
                        + (f"; the 224x224 input resized x{self.recipe.input_scale:g} (bilinear) inside the trunk"
                           if self.recipe.input_scale != 1 else ""),
            "recipe": self.ft.recipe_dict(self.recipe),
            "optimizer": "adamw", "class_weighted": True, "batchnorm": "inference mode, ImageNet statistics, frozen",
            "selection": ("epoch with the best validation AUC (Keras EarlyStopping, restore_best_weights)"
                          if not self.recipe.refit_parts else
                          f"nested refit: {self.recipe.refit_parts} inner model(s) per fold, each early-stopped on "
                          "the best validation AUC of one inner fold of the training side; the member is trained "
                          "on the whole training side for the median of their best epochs, rounded up")
                         + (f"; {self.recipe.members_per_fold} members per fold, each with its own seed"
                            if self.recipe.members_per_fold > 1 else ""),
            "copies_per_source": self.recipe.copies_per_source,
            "feature_extraction_seconds": round(self.extraction_seconds, 1) if self.extraction_seconds else None,
            "feature_extraction_images_per_second": round(n / self.extraction_seconds, 1) if self.extraction_seconds else None,
        }

    @property
    def members_per_fold(self) -> int:
        """How many members each fold trains (`Recipe.members_per_fold`), each with its own seed."""
        return self.recipe.members_per_fold

    @property
    def refit_parts(self) -> int:
        """How many inner models a member's nested refit needs (`Recipe.refit_parts`; 0: no refit)."""
        return self.recipe.refit_parts

    def refit(self, parts: list[tuple[pd.DataFrame, pd.DataFrame]], train: pd.DataFrame, test: pd.DataFrame,
              seeds: list[int], seed: int) -> dict[str, Any]:
        """A nested refit (`Recipe.refit_parts`): one inner model per (training, validation) pair of `parts`,
        early-stopped on its validation part and then discarded; the member is trained on all of `train` for
        `finetune.refit_epochs` of their best epochs and kept. The returned "val" probabilities are the inner
        models' on their own validation parts, pooled (disjoint parts): the temperature is fitted on them."""
        from scipy.special import expit

        best, val_logits, val_rows, inner_auc = [], [], [], []
        for (inner_train, inner_val), inner_seed in zip(parts, seeds):
            _, info = self.ft.fit_member(self.activations, self.labels, self.groups, inner_train.index.to_numpy(),
                                         inner_val.index.to_numpy(), self.recipe, seed=inner_seed, core=self.core,
                                         index=len(self.members), log=self.log)
            best.append(info["best_epoch"])
            val_logits.append(info["val_logits"])
            val_rows.append(info["val_rows"])
            inner_auc.append(info["history"][info["best_epoch"] - 1]["val_auc"])
        epochs = self.ft.refit_epochs(best)
        member, info = self.ft.fit_member(self.activations, self.labels, self.groups, train.index.to_numpy(),
                                          np.zeros(0, dtype=int), self.recipe, seed=seed, core=self.core,
                                          index=len(self.members), epochs=epochs, log=self.log)
        self.members.append(member)
        test_logits = self.ft.predict_logits(member, self.activations[test.index.to_numpy()]) if len(test) else np.zeros(0)
        return {
            "val": expit(np.concatenate(val_logits).astype(np.float64)),
            "test": expit(test_logits.astype(np.float64)),
            "val_frame": self.frame.iloc[np.concatenate(val_rows)],
            "info": {"best_epoch": epochs, "epochs_run": epochs, "inner_best_epochs": best,
                     "inner_val_auc": [round(a, 4) for a in inner_auc],
                     "train_images_per_epoch": info["trained_images"] // epochs},
            "trained_images": info["trained_images"],
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


def make_trainer(frame: pd.DataFrame, config: CVConfig, log: Callable[[str], None]):
    """The per-fold trainer for `config.architecture`'s training strategy (features, finetune or images)."""
    from mammo_core.models.architectures import get_architecture

    strategy = get_architecture(config.architecture).strategy
    if strategy == "features":
        return FeatureHeadTrainer(frame, config, log)
    if strategy == "finetune":
        return FineTuneTrainer(frame, config, log)
    return ImageModelTrainer(frame, config, log)
