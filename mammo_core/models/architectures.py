"""Model architectures, by name. `paper-cnn` is exactly the authors' network.

- `paper-cnn`: the paper's CNN, trained on images.
- `bn-gap-cnn`: a small from-scratch CNN with batch normalisation and global average pooling (about 9 % of
  paper-cnn's parameters), trained with class weights and random flips.
- `efficientnet-lite0`: ImageNet EfficientNet-Lite0, frozen, with a Dense(1) head trained on cached pooled
  features (`mammo_core.training.feature_cache`); the saved model is the complete image classifier.
- `efficientnet-lite0-mid`: the same, cut after block 6a's expansion (672 channels at 14x14): mid-level
  features, which did better than the top ones on the validation parts of the grouped CV.

Every builder returns an uncompiled-or-compiled Keras model taking (IMAGE_SIZE, IMAGE_SIZE, channels)
float input in [0, 1] and giving one sigmoid probability of malignancy. `compile_model` applies the
optimizer and loss used in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mammo_core.config import IMAGE_SIZE


@dataclass(frozen=True)
class Architecture:
    """A named model family: how to build it and how to train it."""

    name: str
    description: str
    build: Callable[..., "object"]
    optimizer: str = "rmsprop"
    learning_rate: float = 1e-3
    #: "images": fit the whole network on decoded images; "features": fit only the Dense(1) head on the
    #: frozen backbone's cached features (see train.py).
    strategy: str = "images"
    class_weighted: bool = False  # weight the loss so benign and malignant count equally
    augment_flips: bool = False  # random horizontal/vertical flips at train time
    cam_layer: str | None = None  # Grad-CAM layer; None = the last convolution
    fixed_channels: int | None = None  # input channels the architecture requires, if any


def build_paper_cnn(*, channels: int = 1, image_size: int = IMAGE_SIZE):
    """The paper's CNN, layer for layer, as a `keras.Sequential` (as the authors wrote it).

    Conv2D 32 3x3 ReLU -> MaxPool 2x2 -> Conv2D 32 3x3 ReLU -> MaxPool -> Conv2D 64 3x3 ReLU ->
    MaxPool -> Flatten -> Dense 64 ReLU -> Dropout 0.5 -> Dense 1 sigmoid. About 2.8 M parameters,
    almost all in the Flatten -> Dense head.
    """
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input(shape=(image_size, image_size, channels), name="image"),
            layers.Conv2D(32, (3, 3), activation="relu", name="conv1"),
            layers.MaxPooling2D((2, 2), name="pool1"),
            layers.Conv2D(32, (3, 3), activation="relu", name="conv2"),
            layers.MaxPooling2D((2, 2), name="pool2"),
            layers.Conv2D(64, (3, 3), activation="relu", name="conv3"),
            layers.MaxPooling2D((2, 2), name="pool3"),
            layers.Flatten(name="flatten"),
            layers.Dense(64, activation="relu", name="dense"),
            layers.Dropout(0.5, name="dropout"),
            layers.Dense(1, activation="sigmoid", name="output"),
        ],
        name="paper_cnn",
    )


def build_bn_gap_cnn(*, channels: int = 1, image_size: int = IMAGE_SIZE):
    """A small CNN with batch normalisation and global average pooling (about 250 k parameters).

    Conv 32 3x3 stride 2 -> MaxPool -> Conv 32 -> MaxPool -> Conv 64 -> MaxPool -> Conv 128 -> Conv 128,
    each convolution followed by BatchNorm and ReLU, then global average pooling, dropout 0.3 and a
    sigmoid unit. Replacing paper-cnn's 2.7 M-parameter Flatten -> Dense head by pooling leaves little
    to memorise; downsampling early keeps it as cheap to run as paper-cnn on a CPU.
    """
    import keras
    from keras import layers

    def block(filters: int, index: int, strides: int = 1) -> list:
        return [layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"conv{index}"),
                # momentum 0.9, not Keras' 0.99: short budgets (~100 steps) must still leave sound moving statistics
                layers.BatchNormalization(momentum=0.9, name=f"bn{index}"),
                layers.ReLU(name=f"relu{index}")]

    return keras.Sequential(
        [
            keras.Input(shape=(image_size, image_size, channels), name="image"),
            *block(32, 1, strides=2),
            layers.MaxPooling2D(2, name="pool1"),
            *block(32, 2),
            layers.MaxPooling2D(2, name="pool2"),
            *block(64, 3),
            layers.MaxPooling2D(2, name="pool3"),
            *block(128, 4),
            *block(128, 5),
            layers.GlobalAveragePooling2D(name="gap"),
            layers.Dropout(0.3, name="dropout"),
            layers.Dense(1, activation="sigmoid", name="output"),
        ],
        name="bn_gap_cnn",
    )


def build_efficientnet_lite0(*, channels: int = 1, image_size: int = IMAGE_SIZE):
    """ImageNet EfficientNet-Lite0 classifier with a frozen backbone (`efficientnet_lite`); only ``logit`` trains."""
    from mammo_core.models.efficientnet_lite import build_efficientnet_lite0_classifier

    return build_efficientnet_lite0_classifier(input_shape=(image_size, image_size, channels), weights="imagenet",
                                               train_backbone=False)


#: Where `efficientnet-lite0-mid` cuts the backbone: block 6a's expansion, 672 channels at 14x14 for 224x224.
MID_CUT_LAYER = "block6a_expand_activation"


def build_efficientnet_lite0_mid(*, channels: int = 1, image_size: int = IMAGE_SIZE):
    """ImageNet EfficientNet-Lite0 cut at `MID_CUT_LAYER`, frozen -> global average pooling -> dropout ->
    ``logit`` -> sigmoid ``probability``. Flat functional model; Grad-CAM takes `MID_CUT_LAYER`."""
    import keras

    from mammo_core.models.efficientnet_lite import build_efficientnet_lite0

    backbone = build_efficientnet_lite0(input_shape=(image_size, image_size, channels), weights="imagenet")
    for layer in backbone.layers:
        layer.trainable = False
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(backbone.get_layer(MID_CUT_LAYER).output)
    x = keras.layers.Dropout(0.2, name="head_dropout")(x)
    logit = keras.layers.Dense(1, name="logit")(x)
    probability = keras.layers.Activation("sigmoid", name="probability")(logit)
    return keras.Model(backbone.input, probability, name="efficientnet_lite0_mid_classifier")


#: How both frozen-backbone EfficientNet variants train: a class-weighted Dense(1) head on cached features.
_FROZEN_BACKBONE = dict(optimizer="adam", learning_rate=1e-3, strategy="features", class_weighted=True,
                        fixed_channels=1)

ARCHITECTURES: dict[str, Architecture] = {
    "paper-cnn": Architecture(
        name="paper-cnn",
        description="The paper's CNN: 3 conv/max-pool blocks (32/32/64), dense 64, dropout 0.5, sigmoid.",
        build=build_paper_cnn,
    ),
    "bn-gap-cnn": Architecture(
        name="bn-gap-cnn",
        description="Small CNN from scratch: 5 conv blocks (32/32/64/128/128) with batch norm, global average "
                    "pooling, dropout 0.3, sigmoid; class-weighted loss, random flips.",
        build=build_bn_gap_cnn,
        optimizer="adam",
        learning_rate=1e-3,
        class_weighted=True,
        augment_flips=True,
    ),
    "efficientnet-lite0": Architecture(
        name="efficientnet-lite0",
        description="EfficientNet-Lite0 pretrained on ImageNet, frozen; global average pooling, dropout, Dense(1) "
                    "head trained (L2, class-weighted) on cached pooled features.",
        build=build_efficientnet_lite0,
        cam_layer="top_activation",
        **_FROZEN_BACKBONE,
    ),
    "efficientnet-lite0-mid": Architecture(
        name="efficientnet-lite0-mid",
        description="EfficientNet-Lite0 pretrained on ImageNet, cut after block 6a's expansion (672 channels, "
                    "14x14), frozen; global average pooling, dropout, Dense(1) head trained on cached features.",
        build=build_efficientnet_lite0_mid,
        cam_layer=MID_CUT_LAYER,
        **_FROZEN_BACKBONE,
    ),
}


def build_efficientnet_lite0_ft(*, channels: int = 1, image_size: int = IMAGE_SIZE):
    """An untrained one-member `efficientnet-lite0-ft` ensemble (the trained one comes from `mammo_core train`)."""
    import numpy as np

    from mammo_core.training import finetune

    if channels != 1 or image_size != IMAGE_SIZE:
        raise ValueError("efficientnet-lite0-ft takes 224x224 grayscale input")
    recipe = finetune.Recipe()
    _, core = finetune.build_parts(recipe.cut)
    width = int(core.input.shape[-1])
    return finetune.build_ensemble([finetune.build_member(core, recipe)], recipe.cut,
                                   (np.eye(width, dtype=np.float32), np.zeros(width, dtype=np.float32)))


ARCHITECTURES["efficientnet-lite0-ft"] = Architecture(
    name="efficientnet-lite0-ft",
    description="ImageNet EfficientNet-Lite0, trunk frozen up to the recipe's cut (training.recipe.cut); the stages "
                "above it, the top convolution and a Dense(1) head fine-tuned on cached activations, once per "
                "cross-validation fold; the shipped model is the ensemble of the fold models (mean probability, "
                "range across members).",
    build=build_efficientnet_lite0_ft,
    optimizer="adamw",
    learning_rate=1e-4,
    strategy="finetune",
    class_weighted=True,
    cam_layer="trunk",
    fixed_channels=1,
)


def get_architecture(name: str) -> Architecture:
    """Look up an architecture by name, with an error that lists the known ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}") from None


def build_model(name: str = "paper-cnn", *, channels: int = 1, compile: bool = True, learning_rate: float | None = None):
    """Build (and by default compile) the named architecture for `channels`-channel input."""
    arch = get_architecture(name)
    model = arch.build(channels=channels)
    if compile:
        compile_model(model, arch, learning_rate=learning_rate)
    return model


def compile_model(model, arch: Architecture, *, learning_rate: float | None = None) -> None:
    """RMSprop (or the architecture's optimizer), binary cross-entropy, accuracy and AUC metrics."""
    import keras

    lr = learning_rate if learning_rate is not None else arch.learning_rate
    optimizer = {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam}[arch.optimizer](learning_rate=lr)
    model.compile(
        optimizer=optimizer,
        loss="binary_crossentropy",
        metrics=["accuracy", keras.metrics.AUC(name="auc")],
    )


def flip_augment(batch):
    """Random horizontal and vertical flips of a float image batch, each image independently (train time only)."""
    import tensorflow as tf

    n = tf.shape(batch)[0]
    flip_lr = tf.random.uniform((n, 1, 1, 1)) < 0.5
    batch = tf.where(flip_lr, tf.reverse(batch, axis=[2]), batch)
    flip_ud = tf.random.uniform((n, 1, 1, 1)) < 0.5
    return tf.where(flip_ud, tf.reverse(batch, axis=[1]), batch)
