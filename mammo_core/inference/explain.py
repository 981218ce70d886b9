"""Grad-CAM for a one-unit sigmoid classifier, and heatmap overlays.

Gradients are those of the pre-sigmoid logit with respect to the last convolutional feature map
(Selvaraju et al., 2017). The standard keras-io recipe builds `keras.Model(model.inputs,
[layer.output, model.output])`, which fails on a `Sequential` model such as `paper-cnn`; here the
network is split at the target layer and the head is replayed layer by layer, which works for
`Sequential` and functional models alike, and lets us stop before the final sigmoid.

Usage:
    cam = GradCAM(model)                      # last conv layer found automatically
    probs, heatmaps = cam(batch)              # (N,), (N, 224, 224) in [0, 1]
    rgb = overlay(pixels_uint8, heatmaps[0], alpha=0.4)
"""

from __future__ import annotations

from typing import Any

import numpy as np

_CONV_TYPES = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D")


def find_last_conv_layer(model: Any) -> str:
    """Name of the last Conv2D-like layer (used when the model card names no Grad-CAM layer)."""
    for layer in reversed(model.layers):
        if type(layer).__name__ in _CONV_TYPES:
            return layer.name
    raise ValueError(f"model {model.name!r} has no convolutional layer to take Grad-CAM from")


def _split_model(model: Any, layer_name: str):
    """Return (body, head_layers): body maps input -> feature map; head_layers lead to the output."""
    import keras

    names = [layer.name for layer in model.layers]
    if layer_name not in names:
        raise ValueError(
            f"layer {layer_name!r} not found in model {model.name!r}; convolutional layers are "
            f"{[l.name for l in model.layers if type(l).__name__ in _CONV_TYPES]}"
        )
    idx = names.index(layer_name)
    head = model.layers[idx + 1 :]
    if isinstance(model, keras.Sequential):
        body_layers = model.layers[: idx + 1]

        def body(x):
            for layer in body_layers:
                x = layer(x, training=False)
            return x

        return body, head
    # Functional model: the part after the layer must be a simple chain (true for our heads).
    prev = model.get_layer(layer_name)
    for layer in head:
        if layer.input is not prev.output:
            raise ValueError(
                f"cannot replay model {model.name!r} after {layer_name!r}: layer {layer.name!r} does not "
                "take the previous layer's output; choose a later layer."
            )
        prev = layer
    sub = keras.Model(model.inputs, model.get_layer(layer_name).output)
    return (lambda x: sub(x, training=False)), head


def _head_to_logit(head: list, x):
    """Run the head layers, ending on the pre-sigmoid logit."""
    import keras
    import tensorflow as tf

    last = head[-1] if head else None
    for layer in head[:-1]:
        x = layer(x, training=False)
    if isinstance(last, keras.layers.Activation) and last.activation is keras.activations.sigmoid:
        return x
    if isinstance(last, keras.layers.Dense) and last.activation is keras.activations.sigmoid:
        logit = tf.matmul(x, last.kernel)
        return logit + last.bias if last.use_bias else logit
    raise ValueError("the model must end in a sigmoid (a Dense with sigmoid activation or a sigmoid Activation)")


def cam_from_gradients(features, grads, size):
    """Grad-CAM maps from a feature map (N, h, w, c) and the logit's gradients with respect to it:
    channel weights = spatial mean of the gradients; map = ReLU of the weighted sum, scaled per image to
    [0, 1] and resized (bilinear) to `size`. TensorFlow tensors in and out (inside a compiled call)."""
    import tensorflow as tf

    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
    cam = cam / (tf.reduce_max(cam, axis=(1, 2), keepdims=True) + 1e-8)
    cam = tf.image.resize(cam[..., None], size, method="bilinear")[..., 0]
    return tf.clip_by_value(cam, 0.0, 1.0)


class GradCAM:
    """Probability and Grad-CAM heatmap from one compiled call (one forward and one backward pass).

    Args:
        model: a Keras model ending in one sigmoid unit (`Sequential` or functional).
        layer_name: the convolutional layer to explain; defaults to `find_last_conv_layer(model)`.

    Calling the object with a float32 batch (N, H, W, C) in [0, 1] returns NumPy arrays
    `(probabilities (N,), heatmaps (N, H, W))`, heatmaps scaled per image to [0, 1]. The traced
    function has a fixed input signature, so it compiles once and can be called from several
    threads (e.g. Streamlit sessions) at once.
    """

    def __init__(self, model: Any, layer_name: str | None = None) -> None:
        import tensorflow as tf

        self.model = model
        self.layer_name = layer_name or find_last_conv_layer(model)
        self._body, self._head = _split_model(model, self.layer_name)
        shape = tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) else tuple(model.input_shape[1:])
        self.input_shape = shape
        self._fn = tf.function(self._compute, input_signature=[tf.TensorSpec((None, *shape), tf.float32)])

    def _compute(self, images):
        import tensorflow as tf

        features = self._body(images)
        with tf.GradientTape() as tape:
            tape.watch(features)
            logit = _head_to_logit(self._head, features)
            total = tf.reduce_sum(logit)  # each image's logit depends only on its own features
        grads = tape.gradient(total, features)
        return tf.sigmoid(logit)[:, 0], cam_from_gradients(features, grads, self.input_shape[:2])

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, cams = self._fn(np.asarray(images, dtype=np.float32))
        return probs.numpy(), cams.numpy()


#: The classic (MATLAB/matplotlib) jet as colour-scale stops. Plotly's own "Jet" is a different map (dark
#: blue rgb(0,60,170) at 0.125 where jet is pure blue, up to 0.33 apart per channel), so its stops are not used.
JET_STOPS = [[0.0, "rgb(0,0,127.5)"], [0.125, "rgb(0,0,255)"], [0.375, "rgb(0,255,255)"],
             [0.625, "rgb(255,255,0)"], [0.875, "rgb(255,0,0)"], [1.0, "rgb(127.5,0,0)"]]
_JET_LUT: np.ndarray | None = None
#: Rows blended at a time by `overlay` (the result is the same for any value; this bounds its memory).
OVERLAY_BAND_ROWS = 256


def jet_lut() -> np.ndarray:
    """(256, 3) float RGB in [0, 1]: `JET_STOPS` sampled once by Plotly's colour-scale interpolation."""
    global _JET_LUT
    if _JET_LUT is None:
        from plotly.colors import sample_colorscale, unlabel_rgb

        samples = sample_colorscale(JET_STOPS, list(np.linspace(0.0, 1.0, 256)))
        _JET_LUT = np.asarray([unlabel_rgb(c) for c in samples], dtype=np.float64) / 255.0
    return _JET_LUT


def _jet(values: np.ndarray) -> np.ndarray:
    """Jet colours of [0, 1] floats: (..., 3) floats in [0, 1], from the 256-entry `jet_lut`."""
    index = np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.intp)
    return jet_lut()[index]


def overlay(pixels: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.4, floor: float = 0.0) -> np.ndarray:
    """Blend a heatmap in the jet colormap over a grayscale image.

    Args:
        pixels: 2-D uint8 image (any size).
        heatmap: 2-D float heatmap in [0, 1] (any size; resized to the image).
        alpha: heatmap opacity in [0, 1].
        floor: heatmap values below it are not drawn (the grey image shows there), so only the upper part
            of the map tints the image; 0 draws it everywhere.

    Returns:
        (H, W, 3) uint8 RGB image the size of `pixels`.
    """
    from PIL import Image

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be within [0, 1], got {floor}")
    if heatmap.shape != pixels.shape:
        heatmap = np.asarray(
            Image.fromarray(heatmap.astype(np.float32), mode="F").resize(pixels.shape[::-1], Image.BILINEAR)
        )
    out = np.empty(pixels.shape + (3,), dtype=np.uint8)
    # in bands of rows: the float64 temporaries of a whole 4096-px image would be ~1 GB at once
    for top in range(0, pixels.shape[0], OVERLAY_BAND_ROWS):
        rows = slice(top, top + OVERLAY_BAND_ROWS)
        heat = heatmap[rows]
        gray = np.repeat((pixels[rows].astype(np.float32) / 255.0)[..., None], 3, axis=-1)
        weight = np.where(heat >= floor, alpha, 0.0)[..., None] if floor > 0 else alpha
        blended = (1.0 - weight) * gray + weight * _jet(heat)
        out[rows] = np.round(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out
