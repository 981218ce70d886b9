"""fast_training: the cheaper paper-cnn training computation gives the same network, the same outputs
and the same gradients (float32), close ones in mixed bfloat16, and trains the Sequential in place."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from mammo_core.models import fast_training  # noqa: E402
from mammo_core.models.fast_training import (cpu_has_native_bfloat16, fast_trainer, is_paper_cnn, resolve_precision,
                                             training_model)
from mammo_core.models.architectures import build_model, get_architecture  # noqa: E402


@pytest.fixture(scope="module")
def base():
    import keras

    keras.utils.set_random_seed(3)
    model = build_model("paper-cnn", channels=1)
    # non-zero biases, so that moving the bias after the pooling is actually exercised
    for layer in model.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(np.random.default_rng(0).normal(0, 0.05, layer.bias.shape).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    return rng.random((6, 224, 224, 1)).astype(np.float32), rng.integers(0, 2, (6, 1)).astype(np.float32)


def _grads(model, x, y):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.keras.losses.binary_crossentropy(y, model(x, training=False)))
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


def test_float32_gives_the_same_outputs_and_gradients(base, batch):
    x, y = batch
    trainer = fast_trainer(base, precision="float32")
    np.testing.assert_allclose(trainer(x, training=False).numpy(), base(x, training=False).numpy(), atol=1e-6)
    assert [v.path for v in trainer.trainable_variables] == [v.path for v in base.trainable_variables]
    for got, want in zip(_grads(trainer, x, y), _grads(base, x, y)):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)


def test_confidently_wrong_outputs_still_get_a_gradient(batch):
    """The wrapper's sigmoid output keeps its logits, so binary cross-entropy does not clip a saturated
    probability to 1 - 1e-7 and lose the gradient (it matches the Sequential's)."""
    import keras

    keras.utils.set_random_seed(0)
    model = build_model("paper-cnn", channels=1, compile=False)
    model.layers[-1].bias.assign([40.0])  # probability ~1 for every image
    x, _ = batch
    y = np.zeros((len(x), 1), np.float32)  # every label benign: maximally wrong
    trainer = fast_trainer(model, precision="float32")
    grads, want = _grads(trainer, x, y), _grads(model, x, y)
    assert np.linalg.norm(grads[-1]) > 0.5  # the output bias gradient is ~1 per image, not 0
    np.testing.assert_allclose(grads[-1], want[-1], rtol=1e-3)


def test_rgb_paper_cnn_gives_the_same_outputs(batch):
    """The authors' 3-channel variant (`--channels 3`) goes through the same computation."""
    model = build_model("paper-cnn", channels=3)
    x = np.repeat(batch[0], 3, axis=-1)
    np.testing.assert_allclose(fast_trainer(model, precision="float32")(x).numpy(), model(x).numpy(), atol=1e-6)


def test_mixed_bfloat16_stays_close(base, batch):
    x, _ = batch
    trainer = fast_trainer(base, precision="mixed_bfloat16")
    got, want = trainer(x, training=False).numpy(), base(x, training=False).numpy()
    assert np.abs(got - want).max() < 5e-3
    assert all(v.dtype == "float32" for v in trainer.trainable_variables)  # float32 master weights


def test_fit_on_the_wrapper_trains_the_sequential(batch):
    import keras

    keras.utils.set_random_seed(0)
    model = build_model("paper-cnn", channels=1, compile=False)
    trainer, computation = training_model(model, get_architecture("paper-cnn"), precision="float32")
    assert computation == {"precision": "float32", "block_order": "conv -> max-pool -> bias -> ReLU (equivalent)"}
    before = [w.copy() for w in model.get_weights()]
    x, y = batch
    history = trainer.fit(x, y, batch_size=3, epochs=2, verbose=0)
    assert set(history.history) >= {"loss", "accuracy", "auc"}
    assert all(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    np.testing.assert_allclose(trainer(x).numpy(), model(x).numpy(), atol=1e-6)


def test_other_architectures_train_as_built():
    model = build_model("bn-gap-cnn", channels=1, compile=False)
    assert not is_paper_cnn(model)
    trainer, computation = training_model(model, get_architecture("bn-gap-cnn"), precision="mixed_bfloat16")
    assert trainer is model and computation["precision"] == "float32" and model.optimizer is not None
    with pytest.raises(ValueError, match="not a paper-cnn"):
        fast_trainer(model, precision="float32")


def test_a_changed_layout_is_not_taken_for_paper_cnn():
    """A Sequential of the same layer types but other strides, pool sizes or no bias would be computed
    wrongly by FastPaperCNN; it must be refused, not silently mistrained."""
    import keras
    from keras import layers

    def cnn(conv2=None, pool2=None):
        return keras.Sequential([
            keras.Input((64, 64, 1)), layers.Conv2D(4, 3, activation="relu"), layers.MaxPooling2D(2),
            conv2 or layers.Conv2D(4, 3, activation="relu"), pool2 or layers.MaxPooling2D(2),
            layers.Conv2D(4, 3, activation="relu"), layers.MaxPooling2D(2), layers.Flatten(),
            layers.Dense(8, activation="relu"), layers.Dropout(0.5), layers.Dense(1, activation="sigmoid")])

    assert is_paper_cnn(cnn())
    assert not is_paper_cnn(cnn(conv2=layers.Conv2D(4, 3, strides=2, activation="relu")))
    assert not is_paper_cnn(cnn(conv2=layers.Conv2D(4, 3, activation="relu", use_bias=False)))
    assert not is_paper_cnn(cnn(conv2=layers.Conv2D(4, 3, activation="relu", padding="same")))
    assert not is_paper_cnn(cnn(pool2=layers.MaxPooling2D(3)))
    assert not is_paper_cnn(cnn(pool2=layers.MaxPooling2D(2, strides=1)))


def test_precision_choice(tmp_path, monkeypatch):
    with_bf16 = tmp_path / "bf16"
    with_bf16.write_text("flags\t\t: fpu sse avx512f avx512_bf16 avx512vl\n")
    without = tmp_path / "plain"
    without.write_text("flags\t\t: fpu sse avx2 fma\n")
    assert cpu_has_native_bfloat16(with_bf16) and not cpu_has_native_bfloat16(without)
    assert not cpu_has_native_bfloat16(tmp_path / "missing")
    monkeypatch.setattr(fast_training, "cpu_has_native_bfloat16", lambda: False)
    assert resolve_precision("auto") == "float32"
    monkeypatch.setattr(fast_training, "cpu_has_native_bfloat16", lambda: True)
    monkeypatch.setattr(fast_training, "_gpu_visible", lambda: False)
    assert resolve_precision("auto") == "mixed_bfloat16"
    monkeypatch.setattr(fast_training, "_gpu_visible", lambda: True)
    assert resolve_precision("auto") == "float32"
    assert resolve_precision("float32") == "float32"
    with pytest.raises(ValueError, match="'float16'"):
        resolve_precision("float16")


def test_train_config_rejects_an_unknown_precision(tmp_path):
    from mammo_core.training.train import TrainConfig

    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(data_dir=str(tmp_path), name="x", precision="fp8").validate()
