"""Scoring the fine-tuned ensemble (`efficientnet-lite0-ft`): one compiled call for every member.

Its probability is the mean of the members' calibrated probabilities; the interval is their range
(lowest to highest member): how much models trained on different 80 % of the source images disagree,
not a confidence interval for the patient. Grad-CAM is taken for the mean of the members' logits, on
the trunk's output that all members share (14x14 for the block5a and block6a cuts). Optional test-time
augmentation (`tta="dihedral8"`, issue 12) averages each member's logits over the 8 flips and 90° rotations
of the input, in the same single call. Training it is `training.ensemble`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mammo_core.config import IMAGE_SIZE


#: Arithmetic of the scoring call: "float32", "bfloat16" (convolutions and matrix products in bfloat16,
#: only where the CPU has native bfloat16), or "auto" (= float32; see `EnsembleScorer`).
PRECISIONS = ("auto", "float32", "bfloat16")
#: Environment variable that overrides the scorer's precision (for the bench and for trials).
PRECISION_ENV = "MAMMO_SCORING_PRECISION"

#: Test-time augmentation: "none" (the default: the plain view only) or "dihedral8" (the 8 views below).
TTA_MODES = ("none", "dihedral8")
#: The 8 views of the dihedral group of the square, as in experiments/tta_check.py (VIEWS there; "identity" is
#: its "plain"): name -> (transpose rows and columns first, then flip the rows (upside down), then flip the
#: columns (left-right)). rot90 and rot270 are `np.rot90(x, 1)` and `np.rot90(x, 3)` on each image.
DIHEDRAL8: dict[str, tuple[bool, bool, bool]] = {
    "identity": (False, False, False),
    "vflip": (False, True, False),
    "hflip": (False, False, True),
    "hvflip": (False, True, True),
    "rot90": (True, True, False),
    "rot270": (True, False, True),
    "transpose": (True, False, False),
    "antitranspose": (True, True, True),
}
#: With test-time augmentation, `EnsembleScorer` passes at most this many images (8x as many views) to each
#: compiled call: peak memory as a plain batch of 64 (about 3 GB on the shipped model; 64 images at once,
#: 512 views, took 8 GB).
TTA_IMAGES_PER_CALL = 8


def check_tta(tta: str | None) -> str:
    """The test-time augmentation name, checked: None -> "none"; a name not in `TTA_MODES` raises ValueError."""
    tta = tta or "none"
    if tta not in TTA_MODES:
        raise ValueError(f"test-time augmentation must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    return tta


def out_of_fold(members: np.ndarray, folds: np.ndarray, members_per_fold: int = 1) -> np.ndarray:
    """Each image's out-of-fold probability from all the members' probabilities: (N, k x members_per_fold)
    member probabilities and the (N,) fold of each image -> (N,) mean over the members of the image's fold,
    the ones that never trained on its group. Members are in the ensemble's order, fold by fold (a bagged
    fold's members together, `training.cv.run_folds`); the card's `ensemble.members_per_fold` gives the bag."""
    members = np.asarray(members)
    folds = np.asarray(folds, dtype=int)
    bag = int(members_per_fold)
    if bag < 1 or members.ndim != 2 or members.shape[1] % bag:
        raise ValueError(f"{members.shape[1] if members.ndim == 2 else members.shape} members cannot be "
                         f"{members_per_fold} per fold")
    k = members.shape[1] // bag
    if folds.size and (folds.min() < 0 or folds.max() >= k):
        raise ValueError(f"fold numbers must be 0..{k - 1}, got {folds.min()}..{folds.max()}")
    by_fold = members.reshape(len(members), k, bag).mean(axis=2)
    return by_fold[np.arange(len(members)), folds]


def dihedral_views(images: Any) -> Any:
    """(N, H, W, C) tensor -> (8N, H, W, C): the `DIHEDRAL8` views stacked view by view (the first N rows are
    the images themselves). Images must be square."""
    import tensorflow as tf

    views = []
    for transpose, flip_rows, flip_cols in DIHEDRAL8.values():
        x = tf.transpose(images, [0, 2, 1, 3]) if transpose else images
        axes = [axis for axis, flip in ((1, flip_rows), (2, flip_cols)) if flip]
        views.append(tf.reverse(x, axes) if axes else x)
    return tf.concat(views, axis=0)


def frozen_function(fn: Any, *, bfloat16: bool = False, tag: str = "scoring") -> Any:
    """A traced `tf.function` with its variables turned into constants, as a callable on the same inputs.

    With the weights constant, TensorFlow's graph optimiser folds each BatchNormalization into the
    convolution before it and fuses convolution, bias and ReLU6 into one oneDNN call, which variables
    prevent. `bfloat16=True` also runs grappler's oneDNN automatic mixed precision over the graph
    (bfloat16 convolutions, products and element-wise ops, float32 outputs). The result keeps the input
    signature of `fn` and is safe to call from several threads.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = fn.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete)
    if not bfloat16:
        # the converted function itself: re-importing its graph (below) would hold ~0.2 GB more for nothing
        return frozen
    graph_def = frozen.graph.as_graph_def()
    inputs, outputs = [t.name for t in frozen.inputs], [t.name for t in frozen.outputs]
    # grappler's own rewrite, run once here; no public API applies it to one function only
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
    from tensorflow.python.grappler import tf_optimizer

    meta = tf.compat.v1.train.export_meta_graph(graph_def=graph_def, graph=frozen.graph)
    for name in outputs:
        meta.collection_def["train_op"].node_list.value.append(name)
    config = config_pb2.ConfigProto()
    rewrite = config.graph_options.rewrite_options
    rewrite.auto_mixed_precision_onednn_bfloat16 = rewriter_config_pb2.RewriterConfig.ON
    rewrite.min_graph_nodes = -1
    graph_def = tf_optimizer.OptimizeGraph(config, meta, graph_id=f"{tag}-{id(graph_def)}".encode())
    wrapped = tf.compat.v1.wrap_function(lambda: tf.graph_util.import_graph_def(graph_def, name=""), [])
    pruned = wrapped.prune(feeds=[wrapped.graph.get_tensor_by_name(n) for n in inputs],
                           fetches=[wrapped.graph.get_tensor_by_name(n) for n in outputs])
    pruned._mammo_keep = wrapped  # the pruned function needs its graph alive
    return pruned


def resolve_precision(precision: str | None = None) -> str:
    """"auto" (the default, or $MAMMO_SCORING_PRECISION) -> "float32". "bfloat16" is honoured only on a CPU
    with native bfloat16 (AVX512-BF16 or AMX) and no GPU; elsewhere it falls back to float32."""
    from mammo_core.models.fast_training import _gpu_visible, cpu_has_native_bfloat16

    precision = precision or os.environ.get(PRECISION_ENV) or "auto"
    if precision not in PRECISIONS:
        raise ValueError(f"scoring precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bfloat16" and cpu_has_native_bfloat16() and not _gpu_visible():
        return "bfloat16"
    # "auto" stays float32: on this project's models bfloat16 moved probabilities by more than 1e-3
    # (docs/BENCHMARKS.md, issue 18)
    return "float32"


class EnsembleScorer:
    """One compiled call on (N, 224, 224) uint8 inputs: members' calibrated probabilities (N, k), squared
    Mahalanobis distances (N,), and (optionally) Grad-CAM of the mean logit (N, 224, 224).

    The trunk runs once for all members. Without Grad-CAM no gradient is computed; with it, the backward
    pass goes through the members only and stops at the trunk's output (the Grad-CAM layer). Each call
    is frozen (`frozen_function`: weights as constants, BatchNorm folded) on first use; `frozen=False`
    keeps the plain traced functions (the reference the tests compare with).

    `tta="dihedral8"`: the 8 `DIHEDRAL8` views of each image go through the trunk and the members in the same
    call (a batch of 8N); each member's logit is the mean of its 8 logits, then goes through that member's
    temperature and the sigmoid as without augmentation (averaging logits, as experiments/tta_check.py did).
    The out-of-distribution distance and the Grad-CAM map are those of the plain (identity) view only, the
    same as without augmentation. About 8x the arithmetic of `tta="none"`, the default. Calls take at most
    `TTA_IMAGES_PER_CALL` images each (larger inputs are split), to bound memory.
    """

    def __init__(self, model: Any, card: dict[str, Any], *, precision: str | None = None,
                 frozen: bool = True, tta: str | None = "none") -> None:
        import threading

        import tensorflow as tf

        from mammo_core.training.finetune import MEMBERS_NAME, OOD_LAYER, TRUNK_NAME

        self.trunk = model.get_layer(TRUNK_NAME)
        self.members = model.get_layer(MEMBERS_NAME)
        self.pool = model.get_layer("ood_pool")
        self.whiten = model.get_layer(OOD_LAYER)
        k = int(self.members.output.shape[-1])
        temps = (card.get("ensemble") or {}).get("temperatures") or [1.0] * k
        if len(temps) != k:
            from mammo_core.errors import ModelDirError

            raise ModelDirError(f"model card lists {len(temps)} member temperatures for {k} members; retrain the model.")
        self.temperatures = np.asarray(temps, dtype=np.float64)
        self.tta = check_tta(tta)
        self.precision = resolve_precision(precision)
        self.frozen = frozen or self.precision == "bfloat16"
        spec = [tf.TensorSpec((None, IMAGE_SIZE, IMAGE_SIZE, 1), tf.float32)]
        augmented = self.tta == "dihedral8"
        self._plain = tf.function(self._forward_tta if augmented else self._forward, input_signature=spec)
        self._with_cam = tf.function(self._forward_tta_cam if augmented else self._forward_cam, input_signature=spec)
        self._compiled: dict[bool, Any] = {}
        self._lock = threading.Lock()

    def _ood(self, features):
        import tensorflow as tf

        return tf.reduce_sum(tf.square(self.whiten(self.pool(features))), axis=-1)

    def _forward(self, images):
        features = self.trunk(images, training=False)
        return self.members(features, training=False), self._ood(features)

    def _members_with_cam(self, features):
        """The members' logits on trunk `features` and Grad-CAM of their mean logit, with `features` the only
        watched tensor: no gradient for any weight, none through the trunk."""
        import tensorflow as tf

        from mammo_core.inference.explain import cam_from_gradients

        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(features)
            logits = self.members(features, training=False)
            total = tf.reduce_sum(tf.reduce_mean(logits, axis=-1))  # each image depends only on itself
        grads = tape.gradient(total, features)
        return logits, cam_from_gradients(features, grads, (IMAGE_SIZE, IMAGE_SIZE))

    def _forward_cam(self, images):
        import tensorflow as tf

        features = tf.stop_gradient(self.trunk(images, training=False))
        logits, cams = self._members_with_cam(features)
        return logits, self._ood(features), cams

    def _forward_tta(self, images):
        import tensorflow as tf

        n, views = tf.shape(images)[0], len(DIHEDRAL8)
        features = self.trunk(dihedral_views(images), training=False)
        logits = self.members(features, training=False)  # (8N, k), view by view
        logits = tf.reduce_mean(tf.reshape(logits, [views, n, -1]), axis=0)
        return logits, self._ood(features[:n])

    def _forward_tta_cam(self, images):
        import tensorflow as tf

        n, views = tf.shape(images)[0], len(DIHEDRAL8)
        features = tf.stop_gradient(self.trunk(dihedral_views(images), training=False))
        plain = features[:n]
        plain_logits, cams = self._members_with_cam(plain)  # Grad-CAM of the plain view, as without augmentation
        others = tf.reshape(self.members(features[n:], training=False), [views - 1, n, -1])
        logits = tf.reduce_mean(tf.concat([plain_logits[None], others], axis=0), axis=0)
        return logits, self._ood(plain), cams

    def function(self, with_cam: bool) -> Any:
        """The compiled call used for `with_cam` (frozen on first use unless `frozen=False`)."""
        traced = self._with_cam if with_cam else self._plain
        if not self.frozen:
            return traced
        fn = self._compiled.get(with_cam)
        if fn is None:
            with self._lock:
                fn = self._compiled.get(with_cam)
                if fn is None:
                    fn = frozen_function(traced, bfloat16=self.precision == "bfloat16",
                                         tag="cam" if with_cam else "plain")
                    self._compiled[with_cam] = fn
        return fn

    def __call__(self, images: np.ndarray, *, with_cam: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        import tensorflow as tf
        from scipy.special import expit

        batch = np.asarray(images, dtype=np.float32)[..., None] / 255.0
        fn = self.function(with_cam)
        if self.tta == "none" or len(batch) <= TTA_IMAGES_PER_CALL:
            out = [t.numpy() for t in fn(tf.constant(batch))]
        else:
            parts = [[t.numpy() for t in fn(tf.constant(batch[i:i + TTA_IMAGES_PER_CALL]))]
                     for i in range(0, len(batch), TTA_IMAGES_PER_CALL)]
            out = [np.concatenate(pieces) for pieces in zip(*parts)]
        logits, ood = out[0], out[1]
        cams = out[2] if with_cam else None
        logits = np.asarray(logits, dtype=np.float64).reshape(len(batch), -1)
        return expit(logits / self.temperatures), np.asarray(ood, dtype=np.float64), cams

