"""A faster way to train `paper-cnn` on a CPU that trains the same network.

`FastPaperCNN` wraps a `paper-cnn` Sequential and shares its layers, so it has the same weights.
`model.fit` on the wrapper updates the Sequential, which is then the model that is saved, evaluated
and explained. Only the training computation differs, in two ways:

1. Each block runs conv -> max-pool -> bias -> ReLU, not conv -> bias -> ReLU -> max-pool. Max-pooling
   commutes with adding a per-channel constant and with ReLU, because both are monotone. So the
   outputs are identical, and the gradients reach the same weights (ties between equal maxima
   aside). The bias, the ReLU and their gradients then run on maps four times smaller. In block 1
   that map is 222x222x32 per image, and those memory-bound passes cost about as much as the
   convolution.
2. With `precision="mixed_bfloat16"`, the three convolutions and their max-pools compute in bfloat16
   from float32 weights. This is like Keras' mixed-precision policy, which would also run the rest in
   bfloat16; here the bias, the ReLU, the dense head and the loss stay float32. The weights and their
   updates are float32 too. There is no loss scaling, because bfloat16 has float32's range. bfloat16
   keeps 8 significant bits, about one grey level of an 8-bit pixel. This pays only on CPUs with
   native bfloat16 arithmetic (AVX512-BF16 or AMX), so `resolve_precision("auto")` picks it only there.

The per-epoch validation figures in history.csv go through the wrapper too, in its precision. The
card's metrics, predictions and Grad-CAM run the saved Sequential in float32.

On the 2-core AVX512-BF16 machine in docs/BENCHMARKS.md, a batch-64 training step took about 0.29 s with
both changes (221 images/s), against 0.60 s on plain `model.fit` (107 images/s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PRECISIONS = ("auto", "float32", "mixed_bfloat16")


def _gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def cpu_has_native_bfloat16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU advertises bfloat16 arithmetic (AVX512-BF16 or AMX-BF16); False when unknown."""
    try:
        flags = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def check_precision(precision: str) -> None:
    """Raise ValueError unless `precision` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def resolve_precision(precision: str) -> str:
    """"auto" -> "mixed_bfloat16" when training runs on a CPU with native bfloat16, else "float32".

    With a GPU visible, "auto" stays float32: not every GPU has fast bfloat16, and this path was
    measured on CPUs only. Other values are checked and returned as they are.
    """
    check_precision(precision)
    if precision == "auto":
        return "mixed_bfloat16" if cpu_has_native_bfloat16() and not _gpu_visible() else "float32"
    return precision


def is_paper_cnn(model: Any) -> bool:
    """True for a Sequential laid out exactly as paper-cnn, which is what `FastPaperCNN` knows how to compute.

    The layout is: three blocks of a 3x3 convolution (stride 1, valid, with bias, ReLU) and a 2x2
    max-pool (stride 2, valid), then Flatten, Dense (ReLU), Dropout and Dense(1, sigmoid).
    """
    layers = list(getattr(model, "layers", []))
    kinds = [type(layer).__name__ for layer in layers]
    if kinds != ["Conv2D", "MaxPooling2D"] * 3 + ["Flatten", "Dense", "Dropout", "Dense"]:
        return False
    cfg = [layer.get_config() for layer in layers]

    def pair(value: Any) -> tuple:
        return tuple(value) if isinstance(value, (list, tuple)) else (value, value)

    convs_ok = all(pair(c["kernel_size"]) == (3, 3) and pair(c["strides"]) == (1, 1)
                   and pair(c["dilation_rate"]) == (1, 1) and c["padding"] == "valid" and c["use_bias"]
                   and c["activation"] == "relu" and c.get("groups", 1) == 1 for c in cfg[0:6:2])
    pools_ok = all(pair(c["pool_size"]) == (2, 2) and pair(c["strides"] or c["pool_size"]) == (2, 2)
                   and c["padding"] == "valid" for c in cfg[1:6:2])
    head_ok = (cfg[7]["activation"] == "relu" and cfg[9]["activation"] == "sigmoid" and cfg[9]["units"] == 1
               and all(c.get("data_format", "channels_last") == "channels_last" for c in cfg[:7]))
    return convs_ok and pools_ok and head_ok


def _keras_model_class():
    import keras

    class FastPaperCNN(keras.Model):
        """Trains a `paper-cnn` Sequential through a cheaper, equivalent computation (module docstring).

        Args:
            base: the built paper-cnn Sequential; its layers (and weights) are shared, not copied.
            precision: "float32" or "mixed_bfloat16" (see `resolve_precision`).

        Compile and fit this wrapper as you would the base model. Then save, evaluate and explain `base`.
        """

        def __init__(self, base: Any, *, precision: str = "float32", **kwargs: Any) -> None:
            super().__init__(name=f"{base.name}_fast_training", **kwargs)
            if not is_paper_cnn(base):
                raise ValueError(f"{base.name} is not a paper-cnn Sequential; FastPaperCNN cannot train it")
            if precision not in ("float32", "mixed_bfloat16"):
                raise ValueError(f"precision must be 'float32' or 'mixed_bfloat16', got {precision!r}")
            self.base = base
            self.precision = precision
            self._convs = base.layers[0:6:2]
            self._dense, self._dropout, self._output = base.layers[7:10]

        def call(self, inputs: Any, training: bool = False) -> Any:
            import tensorflow as tf

            x = tf.cast(inputs, tf.float32)
            for conv in self._convs:
                dtype = tf.bfloat16 if self.precision == "mixed_bfloat16" else tf.float32
                z = tf.nn.conv2d(tf.cast(x, dtype), tf.cast(conv.kernel, dtype), strides=1, padding="VALID")
                z = tf.cast(tf.nn.max_pool2d(z, ksize=2, strides=2, padding="VALID"), tf.float32)
                x = tf.nn.relu(z + conv.bias)
            x = tf.reshape(x, (tf.shape(x)[0], -1))
            # the base's own Dense layers: the sigmoid output keeps its logits, so binary
            # cross-entropy is computed from them (stable where the probability saturates)
            x = self._dropout(self._dense(x), training=training)
            return self._output(x)

    return FastPaperCNN


def fast_trainer(base: Any, *, precision: str = "auto") -> Any:
    """A `FastPaperCNN` around `base` (see the module docstring), not yet compiled."""
    return _keras_model_class()(base, precision=resolve_precision(precision))


def training_model(model: Any, arch: Any, *, precision: str = "auto",
                   learning_rate: float | None = None) -> tuple[Any, dict[str, str]]:
    """What to call `fit` on for an uncompiled `model`, compiled, and a description of the computation.

    A paper-cnn gets a `FastPaperCNN` around it. Any other architecture is returned as it is and trains
    in float32 whatever `precision` says. Build `model` with `build_model(..., compile=False)`, so the
    saved model carries no optimizer state of its own.
    """
    from mammo_core.models.architectures import compile_model

    check_precision(precision)
    if not is_paper_cnn(model):
        compile_model(model, arch, learning_rate=learning_rate)
        return model, {"precision": "float32", "block_order": "as built"}
    trainer = fast_trainer(model, precision=precision)
    compile_model(trainer, arch, learning_rate=learning_rate)
    return trainer, {"precision": trainer.precision, "block_order": "conv -> max-pool -> bias -> ReLU (equivalent)"}
