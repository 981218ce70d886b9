"""Grad-CAM on several model shapes, checked against a direct GradientTape reference."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from mammo_core.inference.explain import GradCAM, find_last_conv_layer, overlay  # noqa: E402
from mammo_core.models.architectures import build_model  # noqa: E402


def small_functional(sigmoid_as_layer: bool):
    inp = keras.Input((224, 224, 1))
    x = keras.layers.Conv2D(4, 3, strides=4, activation="relu", name="c1")(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    if sigmoid_as_layer:
        x = keras.layers.Dense(1, name="logit")(x)
        out = keras.layers.Activation("sigmoid", name="probability")(x)
    else:
        out = keras.layers.Dense(1, activation="sigmoid", name="out")(x)
    return keras.Model(inp, out)


MODELS = {
    "paper-cnn (Sequential)": lambda: build_model("paper-cnn", compile=False),
    "functional, Activation sigmoid": lambda: small_functional(True),
    "functional, Dense sigmoid": lambda: small_functional(False),
}


def reference_cam(model, layer_name, images):
    """Independent Grad-CAM: the logit is recomputed from the output probability (logit = log(p/(1-p)))."""
    x = tf.constant(images)
    sub_layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    names = [l.name for l in sub_layers]
    idx = names.index(layer_name)
    with tf.GradientTape() as tape:
        h = x
        for layer in sub_layers[: idx + 1]:
            h = layer(h, training=False)
        conv = h
        tape.watch(conv)
        for layer in sub_layers[idx + 1:]:
            h = layer(h, training=False)
        p = tf.clip_by_value(h[:, 0], 1e-12, 1 - 1e-12)
        logit = tf.math.log(p) - tf.math.log1p(-p)
    grads = tape.gradient(logit, conv)
    w = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(w * conv, -1)).numpy()
    return h.numpy()[:, 0], cam


@pytest.mark.parametrize("kind", list(MODELS))
def test_gradcam_matches_reference(kind):
    keras.utils.set_random_seed(1)
    model = MODELS[kind]()
    rng = np.random.default_rng(0)
    images = rng.random((3, 224, 224, 1)).astype(np.float32)
    cam = GradCAM(model)
    assert cam.layer_name == find_last_conv_layer(model)
    probs, heat = cam(images)
    ref_probs, ref_cam = reference_cam(model, cam.layer_name, images)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-4, atol=1e-6)
    assert heat.shape == (3, 224, 224)
    assert heat.min() >= 0 and heat.max() <= 1
    for i in range(3):
        ref = ref_cam[i] / (ref_cam[i].max() + 1e-8)
        ref = tf.image.resize(ref[..., None], (224, 224), method="bilinear").numpy()[..., 0]
        np.testing.assert_allclose(heat[i], np.clip(ref, 0, 1), atol=2e-3)


def test_gradcam_points_at_the_evidence():
    """When the logit is the mean activation, the CAM is bright where the image is, in the right place."""
    inp = keras.Input((224, 224, 1))
    conv = keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer="ones", name="conv")(inp)
    logit = keras.layers.Dense(1, kernel_initializer="ones", name="logit")(keras.layers.GlobalAveragePooling2D()(conv))
    model = keras.Model(inp, keras.layers.Activation("sigmoid")(logit))
    image = np.zeros((1, 224, 224, 1), np.float32)
    image[0, :112, :112] = 1.0
    _, heat = GradCAM(model, "conv")(image)
    assert heat[0, :100, :100].mean() > 0.9
    assert heat[0, 124:, 124:].max() < 0.05
    assert heat[0, :100, 124:].max() < 0.05  # not transposed


def test_bad_layer_name_lists_conv_layers():
    model = build_model("paper-cnn", compile=False)
    with pytest.raises(ValueError, match="conv1.*conv2.*conv3"):
        GradCAM(model, "nope")


def test_model_without_sigmoid_is_refused():
    inp = keras.Input((224, 224, 1))
    x = keras.layers.Conv2D(2, 3, name="c")(inp)
    out = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(x))
    with pytest.raises(ValueError, match="sigmoid"):
        GradCAM(keras.Model(inp, out))(np.zeros((1, 224, 224, 1), np.float32))


def test_overlay_shape_and_blend():
    pixels = np.full((300, 200), 128, np.uint8)
    heat = np.zeros((224, 224), np.float32)
    out = overlay(pixels, heat, alpha=0.0)
    assert out.shape == (300, 200, 3) and out.dtype == np.uint8
    assert (out == 128).all()
    hot = overlay(pixels, np.ones((224, 224), np.float32), alpha=1.0)
    assert tuple(hot[0, 0]) == (128, 0, 0)  # jet(1.0) is dark red
    with pytest.raises(ValueError, match="alpha"):
        overlay(pixels, heat, alpha=2)


def _classic_jet(values: np.ndarray) -> np.ndarray:
    """The piecewise-linear jet the overlay drew before its colours came from a Plotly-built table."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    return np.concatenate([np.clip(1.5 - np.abs(4.0 * v - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], axis=-1)


@pytest.mark.parametrize("alpha,tolerance", [(0.4, 1), (1.0, 3)])
def test_overlay_colours_match_the_classic_jet(alpha, tolerance):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 96), dtype=np.uint8)
    heat = np.concatenate([np.linspace(0.0, 1.0, 64 * 48), rng.random(64 * 48)]).reshape(64, 96).astype(np.float32)
    gray = np.repeat((pixels / 255.0)[..., None], 3, axis=-1)
    expected = np.round(np.clip((1 - alpha) * gray + alpha * _classic_jet(heat), 0, 1) * 255).astype(int)
    got = overlay(pixels, heat, alpha=alpha).astype(int)
    assert np.abs(got - expected).max() <= tolerance
    assert (got != overlay(pixels, np.zeros_like(heat), alpha=alpha)).any()  # the heatmap is drawn


def test_overlay_in_bands_equals_the_whole_image_at_once(monkeypatch):
    """`overlay` blends in bands of rows to bound its memory; the bands change nothing."""
    import mammo_core.inference.explain as explain

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (601, 333), dtype=np.uint8)
    heat = rng.random((14, 14)).astype(np.float32)
    banded = [overlay(pixels, heat, alpha=0.45, floor=f) for f in (0.0, 0.3)]
    monkeypatch.setattr(explain, "OVERLAY_BAND_ROWS", 10_000)
    for f, out in zip((0.0, 0.3), banded):
        np.testing.assert_array_equal(out, overlay(pixels, heat, alpha=0.45, floor=f))
