"""Project-wide constants: image geometry, class names, default paths and training defaults.

Every other module imports these instead of retyping them.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Side of the square model input, in pixels (the paper's 224x224).
IMAGE_SIZE: int = 224

#: Class names in label order: index 0 is benign, index 1 is malignant (the sigmoid's positive class).
CLASS_NAMES: tuple[str, str] = ("benign", "malignant")

#: Decision threshold used when a model card does not give one.
DEFAULT_THRESHOLD: float = 0.5

#: Training defaults from the paper.
DEFAULT_EPOCHS: int = 25
DEFAULT_BATCH_SIZE: int = 64
DEFAULT_SEED: int = 0

#: The EfficientNet-Lite backbone every shipped model uses (`models.efficientnet_lite.VARIANTS` lists the others).
DEFAULT_BACKBONE: str = "lite0"

#: Repository root and the shipped models folder. `MAMMO_WEIGHTS_DIR` overrides it (tests use it).
REPO_ROOT: Path = Path(__file__).resolve().parent.parent


def weights_dir() -> Path:
    """Folder holding model directories; `MAMMO_WEIGHTS_DIR` overrides the repository's `weights/`."""
    return Path(os.environ.get("MAMMO_WEIGHTS_DIR", REPO_ROOT / "weights"))


def data_dir() -> Path | None:
    """The dataset folder from `MAMMO_DATA_DIR`, or None when it is unset."""
    value = os.environ.get("MAMMO_DATA_DIR")
    return Path(value) if value else None


#: File extensions treated as images when a folder is expanded.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
)
