"""Frozen-backbone features: an EfficientNet-Lite0 classifier's pooled features for every image, cached on disk.

With the ImageNet backbone frozen, the classifier's only trainable part is its Dense(1) head, so the
backbone's pooled output (layer ``avg_pool`` of the architecture's classifier: 1280-d for
`efficientnet-lite0`, 672-d for the shallower `efficientnet-lite0-mid`) is computed once per image and
reused by every training run and cross-validation fold. The cache lives
outside the repository (``$MAMMO_CACHE_DIR``, default ``~/.cache/mammo_core``) and is keyed by the
files (path, size, modification time) and the backbone's weights, so a changed file or weight file is
never served stale features.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .config import IMAGE_SIZE

#: Layer of the classifier whose output is cached (global average pool of its last feature map).
FEATURE_LAYER = "avg_pool"
DEFAULT_ARCHITECTURE = "efficientnet-lite0"
_VERSION = "avgpool-v1"


def cache_dir() -> Path:
    """Folder for feature caches: `$MAMMO_CACHE_DIR`, else ~/.cache/mammo_core."""
    return Path(os.environ.get("MAMMO_CACHE_DIR", Path.home() / ".cache" / "mammo_core"))


def _weights_id() -> str:
    from .efficientnet_lite import imagenet_weights_path
    from .registry import sha256_file

    return sha256_file(imagenet_weights_path())[:16]


def _cache_key(paths: Sequence[str], flip: bool, architecture: str, preprocessing: str) -> str:
    from .preprocessing import LEGACY

    # Keys of the original architecture and preprocessing are unchanged from the first version of this cache.
    arch = "" if architecture == DEFAULT_ARCHITECTURE else f"\t{architecture}"
    version = "efficientnet-lite0-avgpool-v1" if not arch else _VERSION
    prep = "" if preprocessing == LEGACY else f"\t{preprocessing}"
    digest = hashlib.sha256(f"{version}\t{_weights_id()}\tflip={flip}{arch}{prep}\n".encode())
    for path in sorted(paths):
        st = os.stat(path)
        digest.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def build_extractor(architecture: str = DEFAULT_ARCHITECTURE):
    """The architecture's frozen ImageNet classifier cut at `FEATURE_LAYER`: (N, 224, 224, 1) in [0, 1] -> (N, D)."""
    import keras

    from .model import build_model

    full = build_model(architecture, channels=1, compile=False)
    return keras.Model(full.inputs, full.get_layer(FEATURE_LAYER).output, name="features")


def extract(paths: Sequence[str], *, architecture: str = DEFAULT_ARCHITECTURE, flip: bool = False,
            preprocessing: str, batch_size: int = 32, chunk: int = 256,
            log: Callable[[str], None] = print) -> np.ndarray:
    """Features (len(paths), D) float32 for image files, decoded with `data.load_images` (no cache).

    `flip=True` mirrors every image left-right first (test-time augmentation).
    """
    import tensorflow as tf

    from .data import load_images

    extractor = build_extractor(architecture)
    infer = tf.function(lambda x: extractor(x, training=False),
                        input_signature=[tf.TensorSpec((None, IMAGE_SIZE, IMAGE_SIZE, 1), tf.float32)])
    out = np.empty((len(paths), int(extractor.output.shape[-1])), dtype=np.float32)
    t0 = time.time()
    for start in range(0, len(paths), chunk):
        images = load_images(list(paths[start:start + chunk]), preprocessing=preprocessing)
        if flip:
            images = images[:, :, ::-1]
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size].astype(np.float32)[..., None] / 255.0
            out[start + i:start + i + len(batch)] = infer(batch).numpy()
        done = min(start + chunk, len(paths))
        rate = done / max(time.time() - t0, 1e-6)
        log(f"features: {done}/{len(paths)} images, {rate:.1f} img/s")
    return out


def cached_features(paths: Sequence[str], *, architecture: str = DEFAULT_ARCHITECTURE, flip: bool = False,
                    preprocessing: str, log: Callable[[str], None] = print) -> np.ndarray:
    """Features for `paths` (in the given order), from the cache or computed once and stored.

    The cache file holds the sorted set of paths; any order or subset of the same set is served from it.
    """
    paths = [os.path.abspath(p) for p in paths]
    ordered = sorted(set(paths))
    folder = cache_dir()
    target = folder / f"features-{_cache_key(ordered, flip, architecture, preprocessing)}.npz"
    if target.is_file():
        with np.load(target, allow_pickle=False) as stored:
            stored_paths, feats = stored["paths"].tolist(), stored["features"]
        log(f"features: {len(stored_paths)} from cache {target}")
    else:
        t0 = time.time()
        feats = extract(ordered, architecture=architecture, flip=flip, preprocessing=preprocessing, log=log)
        seconds = time.time() - t0
        folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, paths=np.asarray(ordered), features=feats, seconds=np.float64(seconds))
        os.replace(tmp, target)
        stored_paths = ordered
        log(f"features: {len(ordered)} images in {seconds:.0f} s ({len(ordered) / max(seconds, 1e-6):.1f} img/s), cached in {target}")
    row = {p: i for i, p in enumerate(stored_paths)}
    return feats[[row[p] for p in paths]]


def extraction_seconds(paths: Sequence[str], *, architecture: str = DEFAULT_ARCHITECTURE,
                       flip: bool = False, preprocessing: str) -> float | None:
    """Seconds the cached extraction of `paths` took, when it is cached (for benchmarks)."""
    key = _cache_key(sorted({os.path.abspath(p) for p in paths}), flip, architecture, preprocessing)
    target = cache_dir() / f"features-{key}.npz"
    if not target.is_file():
        return None
    with np.load(target, allow_pickle=False) as stored:
        seconds = float(stored["seconds"])
    return seconds if seconds > 0 else None  # <= 0: the cache was filled from elsewhere, time unknown


# --- the Dense(1) head on cached features ------------------------------------------------------------

#: L2 strengths tried for the head; the one with the best validation AUC is kept (never the test split).
HEAD_L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
HEAD_DROPOUT = 0.5  # dropout on the 1280 features while training the head
HEAD_EPOCHS = 30


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Weights making each class's total weight equal (n / (2 * n_class))."""
    labels = np.asarray(labels, dtype=int)
    n = len(labels)
    return {c: float(n / (2.0 * max(int((labels == c).sum()), 1))) for c in (0, 1)}


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

    from .evaluate import auc

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
