"""The one fit of a network on decoded images, shared by `training.train` and cross-validation.

Keras' `EarlyStopping(restore_best_weights=True)` keeps the best epoch; under a multi-worker strategy,
where Keras' `fit` fails, `training.distribute.fit_custom` runs the same loop with the same callbacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from mammo_core.data.pipeline import make_tf_dataset


def fit_network(model, trainer, strategy, train_ds, val_images: np.ndarray, val_labels, *, epochs: int, batch_size: int,
                channels: int, class_weight: dict | None, callbacks: list, keep_best: bool,
                log: Callable[[str], None] = print, checkpoints: Path | None = None, chief: bool = True) -> int:
    """The one fit of a network on decoded images, for `training.train` and `training.cv` alike. Returns the epoch kept.

    `trainer` is what fits (`models.fast_training.training_model`; it shares its weights with `model`). With
    `keep_best`, Keras' `EarlyStopping(restore_best_weights=True)` keeps the epoch with the lowest validation
    loss (it never stops early: patience = epochs); otherwise the last epoch is kept. Under a multi-worker
    strategy Keras' `fit` fails, so `training.distribute.fit_custom` runs the loop, with the same callbacks.
    """
    import keras

    from mammo_core.training import distribute

    stop = (keras.callbacks.EarlyStopping(monitor="val_loss", mode="min", patience=epochs, restore_best_weights=True)
            if keep_best else None)
    cbs = [*callbacks, *([stop] if stop else [])]
    if distribute.is_multi_worker(strategy):
        if stop is not None:
            stop.set_model(trainer)
            stop.on_train_begin()
        distribute.fit_custom(strategy, trainer, train_ds, epochs=epochs, global_batch_size=batch_size,
                              class_weight=class_weight, callbacks=cbs, log=log,
                              validate=distribute.validation(model, val_images, val_labels, channels),
                              checkpoints=checkpoints, chief=chief)
        if stop is not None:
            stop.on_train_end()
    else:
        val_ds = make_tf_dataset(val_images, val_labels, batch_size=128, channels=channels)
        trainer.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=cbs, class_weight=class_weight,
                    shuffle=False, verbose=0)  # the dataset shuffles
    return stop.best_epoch + 1 if stop is not None and stop.best_weights is not None else epochs
