"""Model directories under `weights/`: listing, cards, integrity checks, loading, the active model.

A model directory holds `model.keras`, `card.json`, `history.csv` and `test_predictions.csv`.
Directories whose name starts with "." are unfinished runs and are never listed. The active model
is named in `weights/ACTIVE`; when it is missing or fails to load, the newest model that loads
is used instead and the caller is told why.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import weights_dir
from .errors import ModelDirError

MODEL_FILE = "model.keras"
CARD_FILE = "card.json"
HISTORY_FILE = "history.csv"
PREDICTIONS_FILE = "test_predictions.csv"
VAL_PREDICTIONS_FILE = "val_predictions.csv"
ACTIVE_FILE = "ACTIVE"


@dataclass
class ModelEntry:
    """One model directory and its card (empty when the card is unreadable; see `problem`)."""

    name: str
    path: Path
    card: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None

    @property
    def created(self) -> str:
        return str(self.card.get("created", ""))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file so readers see either the old content or the new, never a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_card(model_dir: str | Path) -> dict[str, Any]:
    """Parse `card.json` of a model directory; ModelDirError naming the path when it cannot."""
    path = Path(model_dir) / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(f"{model_dir}: no {CARD_FILE}; not a model directory.") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path}: unreadable model card ({exc}).") from None
    if not isinstance(card, dict):
        raise ModelDirError(f"{path}: model card is not a JSON object.")
    return card


def write_card(model_dir: str | Path, card: dict[str, Any]) -> None:
    atomic_write_text(Path(model_dir) / CARD_FILE, json.dumps(card, indent=2, sort_keys=False) + "\n")


def list_models(root: str | Path | None = None) -> list[ModelEntry]:
    """Every model directory under `root` (default: weights/), newest first."""
    root = Path(root) if root is not None else weights_dir()
    if not root.is_dir():
        return []
    entries = []
    for path in sorted(root.iterdir()):
        if not path.is_dir() or path.name.startswith("."):
            continue
        if not (path / CARD_FILE).exists() and not (path / MODEL_FILE).exists():
            continue
        try:
            entries.append(ModelEntry(path.name, path, read_card(path)))
        except ModelDirError as exc:
            entries.append(ModelEntry(path.name, path, {}, problem=str(exc)))
    return sorted(entries, key=lambda e: e.created, reverse=True)


def resolve_model_dir(name_or_dir: str | Path | None = None, *, root: str | Path | None = None) -> Path:
    """A model name under weights/, a path to a model directory, or None for the active model."""
    root = Path(root) if root is not None else weights_dir()
    if name_or_dir is None:
        name = active_model_name(root)
        if name is None:
            raise ModelDirError(f"{root}: no model found; train one with `python -m mammo_core train`.")
        return root / name
    candidate = Path(name_or_dir)
    if candidate.is_dir():
        return candidate
    if (root / str(name_or_dir)).is_dir() and not str(name_or_dir).startswith("."):
        return root / str(name_or_dir)
    known = ", ".join(e.name for e in list_models(root)) or "none"
    raise ModelDirError(f"model {str(name_or_dir)!r} not found (not a folder, not a model in {root}; known: {known}).")


def active_model_name(root: str | Path | None = None) -> str | None:
    """Name in weights/ACTIVE if it names an existing model, else the newest model, else None."""
    root = Path(root) if root is not None else weights_dir()
    marker = root / ACTIVE_FILE
    if marker.is_file():
        name = marker.read_text(encoding="utf-8").strip()
        if name and (root / name / CARD_FILE).is_file():
            return name
    models = [e for e in list_models(root) if e.problem is None]
    return models[0].name if models else None


def set_active_model(name: str, root: str | Path | None = None) -> None:
    """Make `name` the app's default model (atomic; the previous model stays on disk)."""
    root = Path(root) if root is not None else weights_dir()
    verify_model_dir(root / name)
    atomic_write_text(root / ACTIVE_FILE, name + "\n")


def verify_model_dir(model_dir: str | Path) -> dict[str, Any]:
    """Check a model directory is complete and `model.keras` matches the sha256 in its card.

    Returns the card. Raises ModelDirError saying what is wrong and what to do.
    """
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    model_path = model_dir / MODEL_FILE
    if not model_path.is_file():
        raise ModelDirError(f"{model_dir}: {MODEL_FILE} is missing.")
    expected = card.get("model_sha256")
    if not expected:
        raise ModelDirError(f"{model_dir / CARD_FILE}: card has no model_sha256; cannot check the model's integrity.")
    actual = sha256_file(model_path)
    if actual != expected:
        raise ModelDirError(
            f"{model_path}: sha256 {actual[:12]}... does not match the card's {expected[:12]}...; the file is "
            "corrupted or was altered. Restore it or retrain the model."
        )
    return card


def load_model(model_dir: str | Path):
    """Verify and load a model directory's Keras model (safe mode, not compiled). Returns (model, card)."""
    import keras

    card = verify_model_dir(model_dir)
    custom_objects = None
    if card.get("architecture", "").startswith("efficientnet"):
        from . import efficientnet_lite  # registers its custom objects, if any

        custom_objects = getattr(efficientnet_lite, "CUSTOM_OBJECTS", None)
    try:
        model = keras.saving.load_model(
            Path(model_dir) / MODEL_FILE, compile=False, safe_mode=True, custom_objects=custom_objects
        )
    except Exception as exc:  # Keras raises many types for a damaged archive
        raise ModelDirError(f"{model_dir}: {MODEL_FILE} could not be loaded ({type(exc).__name__}: {exc}).") from None
    return model, card


def load_model_with_fallback(
    name_or_dir: str | Path | None = None, *, root: str | Path | None = None
) -> tuple[Any, dict[str, Any], Path, list[str]]:
    """Load the requested (or active) model; if it fails, the newest other model that loads.

    Returns (model, card, model_dir, warnings); `warnings` explains any fallback. Raises
    ModelDirError when no model loads at all.
    """
    root = Path(root) if root is not None else weights_dir()
    problems: list[str] = []
    first: Path | None = None
    try:
        first = resolve_model_dir(name_or_dir, root=root)
        model, card = load_model(first)
        return model, card, first, problems
    except ModelDirError as exc:
        problems.append(str(exc))
    for entry in list_models(root):
        if first is not None and entry.path == first:
            continue
        try:
            model, card = load_model(entry.path)
        except ModelDirError as exc:
            problems.append(str(exc))
            continue
        problems.append(f"Using {entry.name} instead.")
        return model, card, entry.path, problems
    raise ModelDirError("no model could be loaded: " + " | ".join(problems))
