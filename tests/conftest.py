"""Shared fixtures: tiny synthetic images, a tiny dataset and a tiny trained model, all in tmp dirs.

Nothing here touches the real dataset or the repository's weights/. The trained model is built
once per test session (about 10-20 s on a busy 2-core machine) and reused read-only; tests that
change a weights folder copy it first (`tiny_weights_copy`).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY_SIDE = 224


def synthetic_mammogram(seed: int, *, malignant: bool, size: int = TINY_SIDE) -> np.ndarray:
    """A 2-D uint8 image: noisy breast-like ellipse on black, with a bright spiky blob when malignant."""
    rng = np.random.default_rng(seed)
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    draw.ellipse((-size // 2, size // 8, size * 3 // 4, size * 7 // 8), fill=int(rng.integers(70, 110)))
    cx, cy = (int(v) for v in rng.integers(size // 4, size // 2, 2))
    r = int(rng.integers(8, 18))
    if malignant:
        pts = [(cx + (r + 10 * (i % 2)) * np.cos(a), cy + (r + 10 * (i % 2)) * np.sin(a))
               for i, a in enumerate(np.linspace(0, 2 * np.pi, 16, endpoint=False))]
        draw.polygon(pts, fill=230)
    else:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=150)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (size, size))
    return np.clip(arr, 0, 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def build_tiny_dataset(root: Path, *, sources_per_class: int = 4, copies: int = 3) -> Path:
    """train/val/test x benign/malignant; each source image has `copies` augmented copies in every
    split (the paper's layout), named like "1001 (2).png". Enough groups for the grouped protocol."""
    for split_i, split in enumerate(("train", "val", "test")):
        for label, cls in enumerate(("benign", "malignant")):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for s in range(sources_per_class):
                source_id = 1000 * (label + 1) + s + 1
                base = synthetic_mammogram(source_id, malignant=bool(label))
                for c in range(copies):
                    copy = np.rot90(base, k=(c + split_i) % 4) if c else base
                    noisy = np.clip(copy.astype(int) + (c + split_i), 0, 255).astype(np.uint8)
                    Image.fromarray(noisy).save(folder / f"{source_id} ({split_i * copies + c + 1}).png")
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 72-image dataset (3 splits x 2 classes x 4 sources x 3 copies) of 224x224 grayscale PNGs."""
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny-data") / "dataset")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory, tiny_dataset) -> Path:
    """A weights folder holding two tiny trained models: "tiny-grouped" (grouped split, active) and
    "tiny-paper" (paper split). Treat as read-only; use `tiny_weights_copy` to change it."""
    from mammo_core.registry import set_active_model
    from mammo_core.train import TrainConfig, train

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
