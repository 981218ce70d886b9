"""Partial fine-tuning of ImageNet EfficientNet-Lite (Lite0 unless the recipe says otherwise) from cached
activations, and the ensemble built from it.

The dataset's copies are already augmented, so the frozen lower part of the network (the *trunk*: stem to
the cut) is a fixed function of each file. Its output is computed once per image (`cached_activations`,
float16 on disk, keyed by files, weights, cut and preprocessing), and only the stages above the cut plus
a new Dense(1) head (the *upper part*) are trained on it (`fit_member`). That is exact: the upper part
sees the same tensors it would see in full fine-tuning with a frozen trunk, at a fraction of the cost.
BatchNorm layers of the upper part stay in inference mode with their ImageNet statistics (small batches
of one domain would give poor batch statistics); their scale and shift are frozen too.

`fit_member` is the one fit function: cross-validation calls it per fold, and the shipped model is the
k fold members of that same cross-validation (`build_ensemble`): one Keras model whose trunk runs once,
whose k upper parts run on its output and give k logits, and which also outputs whitened pooled trunk
features for the out-of-distribution check (`ood`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mammo_core.config import DEFAULT_BACKBONE, IMAGE_SIZE
from mammo_core.data.splits import INNER_VAL_FOLDS

#: Cut points: name of the first trained block (`trunk_layer` gives the trunk layer whose output feeds it).
#: "stem" is full fine-tuning: the trunk is the identity and the "activations" cached are the model inputs.
CUTS: tuple[str, ...] = ("stem", "block5a", "block6a", "block7a")
TRUNK_NAME, MEMBERS_NAME, OOD_LAYER = "trunk", "members", "ood_whiten"
ARCHITECTURE = "efficientnet-lite0-ft"
#: more members per fold than this would make the shipped ensemble slow to score for little gain
MAX_MEMBERS_PER_FOLD = 5


@dataclass(frozen=True)
class Recipe:
    """How one member is fine-tuned. Every field is recorded in the model card.

    The defaults are the shipped default's recipe ("K" in docs/EXPERIMENTS.md: recipe I, chosen on validation
    parts, with a nested refit), so `train --arch efficientnet-lite0-ft` and the app's Retrain page reproduce it."""

    cut: str = "block6a"
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    max_epochs: int = 8
    patience: int = 3  # epochs without a better validation AUC before stopping (the best epoch is restored)
    copies_per_source: int = 16  # training copies drawn afresh per source image each epoch (of ~72)
    val_copies_per_source: int = 8
    dropout: float = 0.3
    batch_size: int = 32
    #: the 224x224 model input is resized (bilinear) by this factor inside the trunk before the network: the
    #: ImageNet filters then see the breast's structures larger (the model's input contract stays 224x224)
    input_scale: float = 2.0
    #: which ImageNet EfficientNet-Lite ("lite0", "lite1", "lite2"; `models.efficientnet_lite.VARIANTS`)
    backbone: str = DEFAULT_BACKBONE
    #: 0: the member is early-stopped on one validation part (25 % of its training groups), which also gives
    #: its temperature. N >= 1: nested refit. N inner models, each early-stopped on one of the first N inner
    #: folds of the training side, give the epoch count (`refit_epochs` of their best epochs) and, pooled, the
    #: validation logits for the temperature; the member is then trained on the *whole* training side for that
    #: many epochs (`training.cv.run_folds`). N+1 trainings per member.
    refit_parts: int = 2
    #: members trained per fold, differing only in their seed (initialisation, copies drawn, validation copies);
    #: each is calibrated on its own validation part, and the fold's test probability is the mean of their
    #: calibrated probabilities (the shipped ensemble's rule). The shipped ensemble holds k x N members, so
    #: the upper parts cost N times as much to score; the trunk still runs once.
    members_per_fold: int = 1

    def validate(self) -> None:
        from mammo_core.models.efficientnet_lite import VARIANTS

        if self.cut not in CUTS:
            raise ValueError(f"cut must be one of {', '.join(CUTS)}, got {self.cut!r}")
        if self.backbone not in VARIANTS:
            raise ValueError(f"backbone must be one of {', '.join(VARIANTS)}, got {self.backbone!r}")
        for key in ("max_epochs", "patience", "copies_per_source", "val_copies_per_source", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if not 1 <= self.members_per_fold <= MAX_MEMBERS_PER_FOLD:
            raise ValueError(f"members_per_fold must be in [1, {MAX_MEMBERS_PER_FOLD}], got {self.members_per_fold}")
        if not 0 <= self.refit_parts <= INNER_VAL_FOLDS:
            raise ValueError(f"refit_parts must be in [0, {INNER_VAL_FOLDS}], got {self.refit_parts}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 1 <= self.input_scale <= 4 or round(IMAGE_SIZE * self.input_scale) % 16:
            raise ValueError(f"input_scale must be in [1, 4] with {IMAGE_SIZE} x input_scale a multiple of 16 "
                             f"(1, 1.5, 2, ...), got {self.input_scale}")

    @classmethod
    def from_card(cls, recorded: dict[str, Any]) -> "Recipe":
        """The recipe a model card records. A field the card predates takes the value the model was trained
        with (`FIELDS_BEFORE_THEY_EXISTED`), not today's default."""
        known = {f.name for f in fields(cls)}
        return cls(**{**FIELDS_BEFORE_THEY_EXISTED, **{k: v for k, v in recorded.items() if k in known}})


#: Recipe fields added after the first cards were written, with the value those cards' models were trained with.
FIELDS_BEFORE_THEY_EXISTED: dict[str, Any] = {"input_scale": 1.0, "backbone": "lite0", "refit_parts": 0,
                                              "members_per_fold": 1}


def refit_epochs(best_epochs: Sequence[int]) -> int:
    """Epochs of a nested refit: the median of the inner models' best epochs, rounded up (the refit sees a
    third more source images per epoch than each inner model, so rounding down would train it less)."""
    if not len(best_epochs):
        raise ValueError("refit_epochs needs at least one inner model's best epoch")
    return int(np.ceil(np.median(best_epochs)))


# --- the two parts -----------------------------------------------------------------------------------


def network_size(input_scale: float = 1.0) -> int:
    """Side of the square the network runs on: the model input's side times `input_scale`."""
    return int(round(IMAGE_SIZE * input_scale))


def trunk_layer(cut: str, backbone: str = DEFAULT_BACKBONE) -> str | None:
    """The layer of `backbone` whose output feeds block `cut` (the last block before it: "block5c_add" for
    Lite0's "block6a", "block5d_add" for Lite1's and Lite2's); None for "stem" (full fine-tuning)."""
    from mammo_core.models.efficientnet_lite import block_names

    if cut == "stem":
        return None
    if cut not in CUTS:
        raise ValueError(f"cut must be one of {', '.join(CUTS)}, got {cut!r}")
    names = block_names(backbone)
    # every cut starts a stage whose previous stage ends in a repeated block, so its output is the residual sum
    return f"{names[names.index(cut) - 1]}_add"


def build_parts(cut: str, input_scale: float = 1.0, backbone: str = DEFAULT_BACKBONE):
    """(trunk, upper_core): ImageNet EfficientNet-Lite `backbone` split at `trunk_layer(cut)`; trunk frozen,
    both uncompiled.

    The trunk takes the (N, 224, 224, 1) model input; with `input_scale` > 1 its first layer resizes it
    (bilinear) to `network_size(input_scale)` before the network."""
    import keras

    from mammo_core.models.efficientnet_lite import build_efficientnet_lite, build_upper

    size = network_size(input_scale)
    full = build_efficientnet_lite(backbone, input_shape=(size, size, 1), weights="imagenet")
    layer = trunk_layer(cut, backbone)
    cut_tensor = full.input if layer is None else full.get_layer(layer).output
    if size == IMAGE_SIZE:
        image = full.input
        # full fine-tuning: nothing is frozen below the trained part, the trunk is the identity
        out = keras.layers.Identity(name="trunk_identity")(image) if layer is None else cut_tensor
    else:
        image = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1), name="image")
        resized = keras.layers.Resizing(size, size, interpolation="bilinear", name="trunk_resize")(image)
        out = resized if layer is None else keras.Model(full.input, cut_tensor, name="lower")(resized)
    trunk = keras.Model(image, out, name=TRUNK_NAME)
    trunk.trainable = False
    # built afresh from the cut (not as a view of `full`), so that it and its copies hold only their layers
    core = build_upper(cut, cut_tensor.shape[1:], full, backbone)
    return trunk, core


def build_member(core, recipe: Recipe, index: int = 0):
    """A trainable upper part: a fresh copy of `core` (ImageNet weights, BatchNorm frozen) -> GAP ->
    dropout -> Dense(1) logit. Input: trunk activations; output: (N, 1) logits."""
    import keras

    clone = keras.models.clone_model(core)
    clone.set_weights(core.get_weights())
    for layer in clone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    clone.name = f"upper_{index}"
    inp = keras.Input(core.input.shape[1:], name=f"activations_{index}")
    x = clone(inp)
    x = keras.layers.GlobalAveragePooling2D(name=f"pool_{index}")(x)
    x = keras.layers.Dropout(recipe.dropout, name=f"dropout_{index}")(x)
    logit = keras.layers.Dense(1, name=f"logit_{index}")(x)
    return keras.Model(inp, logit, name=f"member_{index}")


# --- the activation cache ----------------------------------------------------------------------------


def cache_dir() -> Path:
    from mammo_core.training.feature_cache import cache_dir as features_cache_dir

    return features_cache_dir()


def _cache_key(paths: Sequence[str], cut: str, preprocessing: str, input_scale: float = 1.0,
               backbone: str = DEFAULT_BACKBONE) -> str:
    from mammo_core.models.efficientnet_lite import imagenet_weights_path
    from mammo_core.store.files import sha256_file
    from mammo_core.training.feature_cache import _weights_id

    # keeps the keys of caches made before the scale and the backbone were knobs
    scale = "" if input_scale == 1 else f"\tx{input_scale:g}"
    weights = _weights_id() if backbone == DEFAULT_BACKBONE else f"{sha256_file(imagenet_weights_path(backbone))[:16]}\t{backbone}"
    digest = hashlib.sha256(f"trunk-v1\t{weights}\t{cut}\t{preprocessing}{scale}\n".encode())
    for path in paths:
        st = os.stat(path)
        digest.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def trunk_function(trunk):
    """A compiled forward pass of the trunk on (N, 224, 224, 1) float32 in [0, 1]."""
    import tensorflow as tf

    return tf.function(lambda x: trunk(x, training=False),
                       input_signature=[tf.TensorSpec((None, IMAGE_SIZE, IMAGE_SIZE, 1), tf.float32)])


def cached_activations(paths: Sequence[str], *, cut: str, preprocessing: str, input_scale: float = 1.0,
                       backbone: str = DEFAULT_BACKBONE, batch_size: int = 64, chunk: int = 512,
                       log: Callable[[str], None] = print) -> tuple[np.ndarray, float | None]:
    """Trunk activations (N, h, w, c) float16 for image files, in the given order, from the on-disk cache
    (a memory-mapped .npy) or computed once and stored. Returns (activations, extraction seconds or None)."""
    from mammo_core.data.pipeline import load_images

    paths = [os.path.abspath(p) for p in paths]
    folder = cache_dir()
    target = folder / f"trunk-{_cache_key(paths, cut, preprocessing, input_scale, backbone)}.npy"
    seconds_file = target.with_suffix(".seconds")
    if target.is_file():
        log(f"trunk activations: {len(paths)} from cache {target}")
        seconds = float(seconds_file.read_text()) if seconds_file.is_file() else None
        return np.load(target, mmap_mode="r"), seconds
    trunk, _ = build_parts(cut, input_scale, backbone)
    infer = trunk_function(trunk)
    shape = (len(paths), *trunk.output.shape[1:])
    folder.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
    t0 = time.time()
    try:
        for start in range(0, len(paths), chunk):
            images = load_images(paths[start:start + chunk], preprocessing=preprocessing)
            for i in range(0, len(images), batch_size):
                batch = images[i:i + batch_size].astype(np.float32)[..., None] / 255.0
                out[start + i:start + i + len(batch)] = infer(batch).numpy().astype(np.float16)
            done = min(start + chunk, len(paths))
            log(f"trunk activations: {done}/{len(paths)} images, {done / max(time.time() - t0, 1e-6):.0f} img/s")
        out.flush()
        del out
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    seconds = time.time() - t0
    seconds_file.write_text(f"{seconds:.2f}\n")
    return np.load(target, mmap_mode="r"), seconds


# --- the one fit function ----------------------------------------------------------------------------


def _per_group_sample(indices: np.ndarray, groups: np.ndarray, per_group: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `per_group` of `indices` from each group, drawn without replacement."""
    out = [np.zeros(0, dtype=np.asarray(indices).dtype)]
    for g in np.unique(groups[indices]):
        members = indices[groups[indices] == g]
        out.append(members if len(members) <= per_group else rng.choice(members, per_group, replace=False))
    return np.sort(np.concatenate(out))


def fit_member(activations: np.ndarray, labels: np.ndarray, groups: np.ndarray, train_idx: np.ndarray,
               val_idx: np.ndarray, recipe: Recipe, *, seed: int = 0, core=None, index: int = 0,
               epochs: int | None = None, log: Callable[[str], None] = print) -> tuple[Any, dict[str, Any]]:
    """Fine-tune one upper part on cached activations; the epoch with the best validation AUC is kept
    (Keras `EarlyStopping(restore_best_weights=True)`). With `epochs` (a nested refit's count), `val_idx` must
    be empty: the member trains for exactly that many epochs and the last is kept.

    Each epoch draws `recipe.copies_per_source` fresh copies of every training source image; validation
    uses a fixed `val_copies_per_source` copies per source image. The loss is class-weighted
    (scikit-learn's "balanced" weights over the training rows). Returns (member model, facts for the card)
    where the facts include the validation rows and their logits (for calibration).
    """
    import keras
    from sklearn.utils.class_weight import compute_class_weight

    from mammo_core.store.run_safety import cancel_at_batch_end

    recipe.validate()
    labels = np.asarray(labels, dtype=np.float32)
    groups = np.asarray(groups)
    keras.utils.set_random_seed(seed)
    if core is None:
        _, core = build_parts(recipe.cut, recipe.input_scale, recipe.backbone)
    if epochs is not None and (epochs < 1 or len(val_idx)):
        raise ValueError(f"a fixed epoch count ({epochs}) needs at least one epoch and no validation rows")
    member = _compiled_member(core, recipe, index)
    rng = np.random.default_rng(seed)
    val_rows = _per_group_sample(np.asarray(val_idx), groups, recipe.val_copies_per_source, rng)
    val_x = np.asarray(activations[val_rows], dtype=np.float32)
    val_y = labels[val_rows]
    classes = np.unique(labels[train_idx])
    weights = dict(zip(classes.astype(int), compute_class_weight("balanced", classes=classes, y=labels[train_idx])))
    t0 = time.time()
    sampler = _epoch_sampler_class()(activations, labels, groups, np.asarray(train_idx), recipe, weights, rng)
    with cancel_at_batch_end() as cancel:  # under `train`, SIGTERM raises at a batch boundary, not inside TensorFlow
        if epochs is None:
            stop = keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=recipe.patience,
                                                 restore_best_weights=True)
            fit = member.fit(sampler, validation_data=(val_x, val_y), epochs=recipe.max_epochs,
                             callbacks=[*cancel, stop], verbose=0)
        else:
            fit = member.fit(sampler, epochs=epochs, callbacks=[*cancel], verbose=0)
    seconds = time.time() - t0
    history = [{"epoch": i + 1, **{k: float(v[i]) for k, v in fit.history.items()}} for i in range(len(fit.history["loss"]))]
    best = int(np.nanargmax([h["val_auc"] for h in history])) + 1 if epochs is None else epochs
    val_logits = predict_logits(member, val_x) if len(val_x) else np.zeros(0, dtype=np.float32)
    trained = len(history) * len(_per_group_sample(np.asarray(train_idx), groups, recipe.copies_per_source, rng))
    log(f"member {index}: " + (f"best epoch {best}/{len(history)}, validation AUC {history[best - 1]['val_auc']:.3f}, "
                               if epochs is None else f"refitted for {epochs} epochs, ")
        + f"{trained / max(seconds, 1e-6):.0f} img/s")
    return member, {"best_epoch": best, "epochs_run": len(history), "history": history, "val_rows": val_rows,
                    "val_logits": val_logits, "seconds": seconds, "trained_images": trained}


def _compiled_member(core: Any, recipe: Recipe, index: int) -> Any:
    """`build_member`, compiled with AdamW, logit binary cross-entropy and a logit AUC metric."""
    import keras

    member = build_member(core, recipe, index)
    member.compile(optimizer=keras.optimizers.AdamW(recipe.learning_rate, weight_decay=recipe.weight_decay),
                   loss=keras.losses.BinaryCrossentropy(from_logits=True),
                   metrics=[keras.metrics.AUC(name="auc", from_logits=True)])
    return member


@functools.cache
def _epoch_sampler_class() -> type:
    """The Keras `PyDataset` of `fit_member`'s training batches (made on first use: keras loads lazily)."""
    import keras

    class EpochSampler(keras.utils.PyDataset):
        """Fresh copies per source image each epoch (`copies_per_source` per group of `train_idx`, drawn
        with `rng`), shuffled, in batches of (activations, labels, class weights)."""

        def __init__(self, activations: np.ndarray, labels: np.ndarray, groups: np.ndarray, train_idx: np.ndarray,
                     recipe: Recipe, weights: dict[int, float], rng: np.random.Generator) -> None:
            super().__init__()
            self.activations, self.labels, self.groups, self.train_idx = activations, labels, groups, train_idx
            self.recipe, self.weights, self.rng = recipe, weights, rng
            self.on_epoch_end()

        def on_epoch_end(self) -> None:
            rows = _per_group_sample(self.train_idx, self.groups, self.recipe.copies_per_source, self.rng)
            self.rows = self.rng.permutation(rows)

        def __len__(self) -> int:
            return int(np.ceil(len(self.rows) / self.recipe.batch_size))

        def __getitem__(self, i: int):
            size = self.recipe.batch_size
            rows = np.sort(self.rows[i * size:(i + 1) * size])
            y = self.labels[rows]
            x = np.asarray(self.activations[rows], dtype=np.float32)
            return x, y, np.vectorize(self.weights.get)(y.astype(int)).astype(np.float32)

    return EpochSampler


def predict_logits(member, activations: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N,) logits of a member on activations (float16 or float32)."""
    # Keras' own predict function, traced once per model (a tf.function made per call was traced anew for
    # every member and batch size, and TensorFlow warned about retracing)
    out = [np.asarray(member.predict_on_batch(np.asarray(activations[i:i + batch_size], dtype=np.float32))).ravel()
           for i in range(0, len(activations), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


# --- the ensemble model ------------------------------------------------------------------------------


def fit_ood(pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whitening (W, b) so that ||pooled @ W + b||^2 is the squared Mahalanobis distance to the rows' mean
    under a Ledoit-Wolf shrunk covariance (scikit-learn)."""
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(np.asarray(pooled, dtype=np.float64))
    vals, vecs = np.linalg.eigh(lw.precision_)
    w = vecs @ np.diag(np.sqrt(np.clip(vals, 0, None))) @ vecs.T  # symmetric square root of the precision
    return w.astype(np.float32), (-lw.location_ @ w).astype(np.float32)


def pooled_activations(activations: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Global average of trunk activations over space: (N, c) float32."""
    return np.concatenate([np.asarray(activations[i:i + chunk], dtype=np.float32).mean(axis=(1, 2))
                           for i in range(0, len(activations), chunk)])


def build_ensemble(members: Sequence[Any], cut: str, ood_weights: tuple[np.ndarray, np.ndarray],
                   input_scale: float = 1.0, backbone: str = DEFAULT_BACKBONE):
    """One Keras model: image (N, 224, 224, 1) in [0, 1] -> [member logits (N, k), whitened pooled trunk
    features (N, c)]. The trunk is a nested model named `TRUNK_NAME`, the k upper parts a nested model
    named `MEMBERS_NAME`, so Grad-CAM can split at the trunk's output."""
    import keras

    trunk, core = build_parts(cut, input_scale, backbone)
    acts = keras.Input(core.input.shape[1:], name="activations")
    clean = []
    for m in members:  # rebuilt from their config: Keras' clone_model would copy the optimizer into the file
        copy = keras.Model.from_config(m.get_config())
        copy.set_weights(m.get_weights())
        clean.append(copy)
    outs = [m(acts) for m in clean]
    logits = keras.layers.Concatenate(name="member_logits")(outs) if len(outs) > 1 else outs[0]
    heads = keras.Model(acts, logits, name=MEMBERS_NAME)
    image = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1), name="image")
    features = trunk(image)
    pooled = keras.layers.GlobalAveragePooling2D(name="ood_pool")(features)
    whiten = keras.layers.Dense(ood_weights[0].shape[1], name=OOD_LAYER)
    ood = whiten(pooled)
    whiten.set_weights([ood_weights[0], ood_weights[1]])
    model = keras.Model(image, [heads(features), ood], name="efficientnet_lite0_ft_ensemble")
    model.trainable = False
    return model


def is_ensemble(model) -> bool:
    """True for a model made by `build_ensemble`."""
    names = {layer.name for layer in model.layers}
    return TRUNK_NAME in names and MEMBERS_NAME in names


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    return asdict(recipe)
