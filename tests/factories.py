"""Builders for small images and datasets in tmp_path (no image files are committed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def mammo_like(seed: int, malignant: bool, size: int = 224) -> np.ndarray:
    """A synthetic 8-bit 'breast' image: a bright half-disc, plus a bright blob when malignant."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    breast = ((xx / size) ** 2 + ((yy - size / 2) / (size / 2)) ** 2) < 0.8
    img = rng.normal(40, 10, (size, size)) + breast * 90
    if malignant:
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        img += 120 * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 16) ** 2)))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_dataset(root: Path, *, sources_per_class: int = 4, copies: int = 3, splits: bool = True,
                 class_dirs: tuple[str, str] = ("benign", "malignant")) -> Path:
    """A tiny dataset in the paper's layout (train/val/test with class folders) or flat class folders.

    Source image ids are 1000 + k; copy j of source k is named "<id> (<j>).png" (copy 0 is "<id>.png").
    With splits, each source's copies are spread over train/val/test like the paper's split.
    """
    split_names = ("train", "val", "test")
    for label, cls in enumerate(class_dirs):
        for k in range(sources_per_class):
            source_id = 1000 + 100 * label + k
            for j in range(copies):
                name = f"{source_id}.png" if j == 0 else f"{source_id} ({j}).png"
                folder = root / split_names[j % 3] / cls if splits else root / cls
                write_png(folder / name, mammo_like(source_id * 100 + j, malignant=bool(label)))
    return root
