"""Shared fixtures: tiny synthetic images, a tiny dataset and a tiny trained model, all in tmp dirs.

Nothing here touches the real dataset or the repository's weights/. The trained model is built
once per test session (about 10-20 s on a busy 2-core machine) and reused read-only; tests that
change a weights folder copy it first (`tiny_weights_copy`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from .factories import build_tiny_dataset, png_bytes, synthetic_mammogram  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 72-image dataset (3 splits x 2 classes x 4 sources x 3 copies) of 224x224 grayscale PNGs."""
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny-data") / "dataset")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory, tiny_dataset) -> Path:
    """A weights folder holding two tiny trained models: "tiny-grouped" (grouped split, active) and
    "tiny-paper" (paper split). Treat as read-only; use `tiny_weights_copy` to change it."""
    from mammo_core.store.registry import set_active_model
    from mammo_core.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny-weights") / "weights"
    quiet = lambda message: None  # noqa: E731
    train(TrainConfig(data_dir=str(tiny_dataset), name="tiny-paper", protocol="paper", epochs=1, batch_size=8),
          root=root, log=quiet)
    train(TrainConfig(data_dir=str(tiny_dataset), name="tiny-grouped", protocol="grouped", epochs=1, batch_size=8),
          root=root, log=quiet)
    set_active_model("tiny-grouped", root)
    return root


@pytest.fixture
def tiny_weights_copy(tmp_path, tiny_weights) -> Path:
    """A private, writable copy of `tiny_weights`."""
    dest = tmp_path / "weights"
    shutil.copytree(tiny_weights, dest, ignore=shutil.ignore_patterns(".train.lock", ".runs"))
    return dest


@pytest.fixture
def sample_png() -> bytes:
    """One synthetic malignant-looking 224x224 grayscale PNG."""
    return png_bytes(synthetic_mammogram(7, malignant=True))
