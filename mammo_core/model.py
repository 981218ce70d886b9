"""Model architectures, by name. `paper-cnn` is exactly the authors' network.

Every builder returns an uncompiled-or-compiled Keras model taking (IMAGE_SIZE, IMAGE_SIZE, channels)
float input in [0, 1] and giving one sigmoid probability of malignancy. `compile_model` applies the
optimizer and loss used in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import IMAGE_SIZE


@dataclass(frozen=True)
class Architecture:
    """A named model family: how to build it and how to train it."""

    name: str
    description: str
    build: Callable[..., "object"]
    optimizer: str = "rmsprop"
    learning_rate: float = 1e-3


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


ARCHITECTURES: dict[str, Architecture] = {
    "paper-cnn": Architecture(
        name="paper-cnn",
        description="The paper's CNN: 3 conv/max-pool blocks (32/32/64), dense 64, dropout 0.5, sigmoid.",
        build=build_paper_cnn,
    ),
}


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
