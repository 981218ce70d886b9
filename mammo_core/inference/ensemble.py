"""Scoring the fine-tuned ensemble (`efficientnet-lite0-ft`): one compiled call for every member.

Its probability is the mean of the members' calibrated probabilities; the interval is their range
(lowest to highest member): how much models trained on different 80 % of the source images disagree,
not a confidence interval for the patient. Grad-CAM is taken for the mean of the members' logits, on
the trunk's output that all members share (14x14 for the block5a and block6a cuts). Training it is
`training.ensemble`.
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
    graph_def = frozen.graph.as_graph_def()
    inputs, outputs = [t.name for t in frozen.inputs], [t.name for t in frozen.outputs]
    if bfloat16:
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
    """

    def __init__(self, model: Any, card: dict[str, Any], *, precision: str | None = None,
                 frozen: bool = True) -> None:
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
        self.precision = resolve_precision(precision)
        self.frozen = frozen or self.precision == "bfloat16"
        spec = [tf.TensorSpec((None, IMAGE_SIZE, IMAGE_SIZE, 1), tf.float32)]
        self._plain = tf.function(self._forward, input_signature=spec)
        self._with_cam = tf.function(self._forward_cam, input_signature=spec)
        self._compiled: dict[bool, Any] = {}
        self._lock = threading.Lock()

    def _ood(self, features):
        import tensorflow as tf

        return tf.reduce_sum(tf.square(self.whiten(self.pool(features))), axis=-1)

    def _forward(self, images):
        features = self.trunk(images, training=False)
        return self.members(features, training=False), self._ood(features)

    def _forward_cam(self, images):
        import tensorflow as tf

        from mammo_core.inference.explain import cam_from_gradients

        features = tf.stop_gradient(self.trunk(images, training=False))
        # only `features` is watched: no gradient for any weight, none through the trunk
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(features)
            logits = self.members(features, training=False)
            total = tf.reduce_sum(tf.reduce_mean(logits, axis=-1))  # each image depends only on itself
        grads = tape.gradient(total, features)
        return logits, self._ood(features), cam_from_gradients(features, grads, (IMAGE_SIZE, IMAGE_SIZE))

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
        out = self.function(with_cam)(tf.constant(batch))
        logits, ood = out[0], out[1]
        cams = out[2].numpy() if with_cam else None
        logits = np.asarray(logits, dtype=np.float64).reshape(len(batch), -1)
        return expit(logits / self.temperatures), ood.numpy().astype(np.float64), cams

