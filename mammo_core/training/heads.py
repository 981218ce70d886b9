"""The Dense(1) head of a frozen-backbone classifier, trained on cached features (`training.feature_cache`).

`select_head` fits one head per L2 strength and keeps the best on the validation split; the fitted
kernel and bias work on raw features and go into the full classifier's ``logit`` layer (`set_head`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

#: L2 strengths tried for the head; the one with the best validation AUC is kept (never the test split).
HEAD_L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
HEAD_DROPOUT = 0.5  # dropout on the 1280 features while training the head
HEAD_EPOCHS = 30


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Weights making each class's total weight equal: scikit-learn's "balanced", n / (2 * n_class).

    When the rows hold only one class (or none), scikit-learn refuses; the absent class's count is then
    taken as 1 (so the present class weighs 0.5 and the absent one n / 2, never used on these rows), which
    keeps every caller's {0: w0, 1: w1} contract.
    """
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.asarray(labels, dtype=int)
    classes = np.array([0, 1])
    if np.isin(classes, labels).all():
        return {int(c): float(w) for c, w in zip(classes, compute_class_weight("balanced", classes=classes, y=labels))}
    # Hand-written only for the one-class case scikit-learn rejects.
    n = len(labels)
    return {int(c): float(n / (2.0 * max(int((labels == c).sum()), 1))) for c in classes}


def fit_head(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *, l2: float,
             dropout: float = HEAD_DROPOUT, epochs: int = HEAD_EPOCHS, batch_size: int = 64,
             learning_rate: float = 1e-3, seed: int = 0, callbacks: Sequence = ()) -> dict:
    """Train a Dense(1) sigmoid head on standardised features with L2, input dropout and class weights.

    The epoch with the lowest validation loss is kept (early stopping on the validation split). The
    standardisation is folded into the returned weights, so they apply to raw features:
    logit = features @ kernel + bias.

    Returns {"kernel": (1280, 1) float32, "bias": (1,) float32, "history": [per-epoch dicts],
    "best_epoch": int, "val_auc": float, "l2": l2}.
    """
    import keras

    from mammo_core.evaluation.metrics import auc

    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0) + 1e-6
    tx, vx = (train_x - mean) / std, (val_x - mean) / std
    keras.utils.set_random_seed(seed)
    head = keras.Sequential([
        keras.Input(shape=(train_x.shape[1],)),
        keras.layers.Dropout(dropout),
        keras.layers.Dense(1, activation="sigmoid", kernel_regularizer=keras.regularizers.L2(l2), name="logit"),
    ])
    head.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="binary_crossentropy",
                 metrics=["accuracy", keras.metrics.AUC(name="auc")])
    best: dict = {"loss": np.inf}

    class KeepBest(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs["val_loss"] < best["loss"]:
                best.update(loss=logs["val_loss"], epoch=epoch + 1, weights=[w.copy() for w in head.get_weights()])

    fit = head.fit(tx, np.asarray(train_y, dtype=np.float32), validation_data=(vx, np.asarray(val_y, dtype=np.float32)),
                   epochs=epochs, batch_size=batch_size, shuffle=True, class_weight=class_weights(train_y),
                   callbacks=[KeepBest(), *callbacks], verbose=0)
    head.set_weights(best["weights"])
    w, b = head.get_layer("logit").get_weights()
    kernel = (w[:, 0] / std).astype(np.float32)[:, None]
    bias = np.asarray([b[0] - float(np.sum(w[:, 0] * mean / std))], dtype=np.float32)
    history = [{"epoch": i + 1, **{k: float(v[i]) for k, v in fit.history.items()}} for i in range(len(fit.history["loss"]))]
    val_probs = head_probabilities(val_x, kernel, bias)
    return {"kernel": kernel, "bias": bias, "history": history, "best_epoch": best["epoch"],
            "val_auc": auc(val_y, val_probs), "val_loss": float(best["loss"]), "l2": l2}


def select_head(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                l2_grid: Sequence[float] | None = None, callbacks_for: Callable[[int], Sequence] | None = None,
                **kwargs) -> dict:
    """`fit_head` for every L2 in the grid (default `HEAD_L2_GRID`); keep the best validation AUC (ties: the stronger L2).

    Returns the chosen fit with "candidates": [{"l2", "val_auc", "val_loss", "best_epoch"}].
    """
    fits = []
    for i, l2 in enumerate(HEAD_L2_GRID if l2_grid is None else l2_grid):
        cbs = callbacks_for(i) if callbacks_for else ()
        fits.append(fit_head(train_x, train_y, val_x, val_y, l2=l2, callbacks=cbs, **kwargs))
    chosen = max(reversed(fits), key=lambda f: (np.nan_to_num(f["val_auc"], nan=-1.0)))
    chosen = dict(chosen)
    chosen["candidates"] = [{"l2": f["l2"], "val_auc": f["val_auc"], "val_loss": f["val_loss"],
                             "best_epoch": f["best_epoch"]} for f in fits]
    return chosen


def head_logits(features: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """logit = features @ kernel + bias, in float32 like the Keras Dense layer."""
    return (np.asarray(features, dtype=np.float32) @ kernel.astype(np.float32))[:, 0] + bias.astype(np.float32)[0]


def head_probabilities(features: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Sigmoid of `head_logits`, in float32."""
    from scipy.special import expit

    return expit(head_logits(features, kernel, bias)).astype(np.float32)


def set_head(model, kernel: np.ndarray, bias: np.ndarray) -> None:
    """Put a fitted head into the full classifier's ``logit`` layer."""
    model.get_layer("logit").set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
