"""Model directories under `weights/`: listing, cards, integrity checks, loading, the active model.

A model directory holds `model.keras`, `card.json`, `history.csv` and `test_predictions.csv`.
Directories whose name starts with "." are unfinished runs and are never listed.

Active model: the one named in `weights/ACTIVE`. There is no silent swap: when it (or a model the
user chose) fails to load, callers get a ModelDirError saying so and must ask the user to pick;
another model is never promoted automatically (with no ACTIVE file, the only trusted model is
used when there is exactly one, else none).

Trust: a model's `model.keras` must match the sha256 in its card *and*, where one is recorded,
the sha256 pinned for its name:
- shipped models: pinned in the repository, `weights/MANIFEST.json` (`MANIFEST_FILE`);
- models trained here: recorded by the trainer in `<weights>/.manifest.json` (`LOCAL_MANIFEST_FILE`)
  just before the finished directory is renamed into place, as are models an admin confirmed;
- anything else (a folder dropped in by hand) is *unverified*: listed, but it cannot become active
  until an admin confirms it (`set_active_model(..., confirmed_by=USER)`).
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mammo_core.config import REPO_ROOT, weights_dir
from mammo_core.errors import ModelDirError
from mammo_core.store.card import read_card
from mammo_core.store.files import atomic_write_text, sha256_file

MODEL_FILE = "model.keras"
CARD_FILE = "card.json"
HISTORY_FILE = "history.csv"
PREDICTIONS_FILE = "test_predictions.csv"
VAL_PREDICTIONS_FILE = "val_predictions.csv"
ACTIVE_FILE = "ACTIVE"
#: sha256 of the shipped models, pinned in the repository (not only in their own cards).
MANIFEST_FILE = "MANIFEST.json"
PINNED_MANIFEST: Path = REPO_ROOT / "weights" / MANIFEST_FILE
#: Models trained here (written by the trainer) and models an admin confirmed, per weights folder.
LOCAL_MANIFEST_FILE = ".manifest.json"
PICK_ANOTHER = ("No other model is used in its place: pick one (the app's sidebar, or --model NAME; "
                "`python -m mammo_core models` lists them).")
TRUST_SHIPPED, TRUST_TRAINED, TRUST_CONFIRMED, TRUST_UNVERIFIED = "shipped", "trained here", "confirmed", "unverified"


@dataclass
class ModelEntry:
    """One model directory and its card (empty when the card is unreadable; see `problem`)."""

    name: str
    path: Path
    card: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
    trust: str = TRUST_UNVERIFIED

    @property
    def created(self) -> str:
        return str(self.card.get("created", ""))

    @property
    def trusted(self) -> bool:
        return self.trust != TRUST_UNVERIFIED


# --- trust manifests ------------------------------------------------------------------------------


def _read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path}: unreadable model manifest ({exc.__class__.__name__}); restore it.") from None
    models = data.get("models") if isinstance(data, dict) else None
    return {str(k): v for k, v in models.items() if isinstance(v, dict)} if isinstance(models, dict) else {}


def pinned_models() -> dict[str, dict[str, Any]]:
    """{name: {"model_sha256": ...}} of the shipped models, from the repository's weights/MANIFEST.json."""
    return _read_manifest(PINNED_MANIFEST)


def local_models(root: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """{name: {"model_sha256", "source", "recorded"}} of models trained or confirmed in this weights folder."""
    root = Path(root) if root is not None else weights_dir()
    return _read_manifest(root / LOCAL_MANIFEST_FILE)


def record_model(root: str | Path, name: str, model_sha256: str, *, source: str = TRUST_TRAINED,
                 by: str | None = None) -> None:
    """Record `name` with its sha256 in the weights folder's manifest (atomic, under a lock).

    Called by the trainer just before a finished model directory is renamed into place, and when an
    admin confirms a hand-dropped model. Raises OSError when the folder cannot be written.
    """
    import datetime as dt

    root = Path(root)
    with open(root / f"{LOCAL_MANIFEST_FILE}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        path = root / LOCAL_MANIFEST_FILE
        models = _read_manifest(path)
        entry = {"model_sha256": model_sha256, "source": source,
                 "recorded": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        if by:
            entry["by"] = by
        models[name] = entry
        atomic_write_text(path, json.dumps({"schema": 1, "models": models}, indent=2, sort_keys=True) + "\n")


def trust_of(name: str, card: dict[str, Any], root: str | Path | None = None) -> str:
    """How the model named `name` is vouched for: shipped, trained here, confirmed or unverified.

    Compares the card's sha256 with the manifests; `verify_model_dir` checks the file against both.
    """
    sha = card.get("model_sha256")
    if not sha:
        return TRUST_UNVERIFIED
    if pinned_models().get(name, {}).get("model_sha256") == sha:
        return TRUST_SHIPPED
    local = local_models(root).get(name, {})
    if local.get("model_sha256") == sha:
        return TRUST_CONFIRMED if local.get("source") == TRUST_CONFIRMED else TRUST_TRAINED
    return TRUST_UNVERIFIED


def list_models(root: str | Path | None = None) -> list[ModelEntry]:
    """Every model directory under `root` (default: weights/), newest first, with its trust status."""
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
            card = read_card(path)
            entries.append(ModelEntry(path.name, path, card, trust=trust_of(path.name, card, root)))
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
    """The model named in weights/ACTIVE, whether or not it loads (callers report a failure and ask
    the user to pick; nothing is promoted in its place). Without an ACTIVE file (or with an empty
    one): the only trusted model when there is exactly one, else None."""
    root = Path(root) if root is not None else weights_dir()
    marker = root / ACTIVE_FILE
    try:
        name = marker.read_text(encoding="utf-8").strip()
    except OSError:
        name = ""
    if name:
        return name if not name.startswith(".") and "/" not in name else None
    trusted = [e for e in list_models(root) if e.problem is None and e.trusted]
    return trusted[0].name if len(trusted) == 1 else None


def set_active_model(name: str, root: str | Path | None = None, *, confirmed_by: str | None = None) -> None:
    """Make `name` the app's default model (atomic; the previous model stays on disk).

    An unverified model (neither shipped nor trained here) is refused unless `confirmed_by` names the
    admin who confirms it; the confirmation is recorded in the weights folder's manifest.
    """
    root = Path(root) if root is not None else weights_dir()
    card = verify_model_dir(root / name)
    if trust_of(name, card, root) == TRUST_UNVERIFIED:
        if not confirmed_by:
            raise ModelDirError(f"{name} is unverified (not a shipped model, not trained here); an admin must "
                                "confirm it before it can become active.")
        confirm_model(name, root, confirmed_by=confirmed_by)
    atomic_write_text(root / ACTIVE_FILE, name + "\n")


def delete_model(name: str, root: str | Path | None = None) -> None:
    """Remove the model directory `name` (trained here, confirmed or unverified) and its manifest entry.

    Refused with ModelDirError for a shipped model (its name is pinned in weights/MANIFEST.json), for
    the active model (make another one active first) and for a name that is not a model folder here.
    The folder is first renamed to a hidden name, so it disappears from every listing at once.
    """
    import shutil

    root = Path(root) if root is not None else weights_dir()
    path = root / name
    if not name or name.startswith(".") or "/" in name or not path.is_dir():
        raise ModelDirError(f"model {name!r} not found in {root}.")
    if name in pinned_models():
        raise ModelDirError(f"{name} is shipped with the app (pinned in {MANIFEST_FILE}); shipped models cannot be deleted.")
    if active_model_name(root) == name:
        raise ModelDirError(f"{name} is the active model; make another model active before deleting it.")
    trash = root / f".deleted-{name}-{os.getpid()}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
    with open(root / f"{LOCAL_MANIFEST_FILE}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        models = _read_manifest(root / LOCAL_MANIFEST_FILE)
        if models.pop(name, None) is not None:
            atomic_write_text(root / LOCAL_MANIFEST_FILE, json.dumps({"schema": 1, "models": models}, indent=2,
                                                                     sort_keys=True) + "\n")


def confirm_model(name: str, root: str | Path | None = None, *, confirmed_by: str) -> None:
    """An admin vouches for a hand-dropped model: record its (verified) sha256 as confirmed."""
    root = Path(root) if root is not None else weights_dir()
    card = verify_model_dir(root / name)
    record_model(root, name, card["model_sha256"], source=TRUST_CONFIRMED, by=confirmed_by)


def verify_model_dir(model_dir: str | Path) -> dict[str, Any]:
    """Check a model directory is complete, `model.keras` matches the sha256 in its card, and, when
    the name has a pinned (shipped) or recorded (trained here, confirmed) sha256, that one too.

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
    pinned = pinned_models().get(model_dir.name, {}).get("model_sha256")
    in_repo = model_dir.parent.resolve() == PINNED_MANIFEST.parent.resolve()
    if pinned and pinned != actual and in_repo:
        raise ModelDirError(f"{model_path}: sha256 {actual[:12]}... is not the shipped model's {pinned[:12]}... pinned "
                            f"in {PINNED_MANIFEST}; restore the shipped file (git checkout) or pick another model.")
    recorded = local_models(model_dir.parent).get(model_dir.name, {}).get("model_sha256")
    if recorded and recorded != actual and not (pinned == actual and in_repo):
        raise ModelDirError(f"{model_path}: sha256 {actual[:12]}... is not the {recorded[:12]}... recorded when it was "
                            f"trained or confirmed here; the model was replaced. Pick another model.")
    return card


def load_model(model_dir: str | Path):
    """Verify and load a model directory's Keras model (safe mode, not compiled). Returns (model, card)."""
    import keras

    try:
        card = verify_model_dir(model_dir)
    except ModelDirError as exc:  # never replaced by another model: the user picks
        raise ModelDirError(f"{exc} {PICK_ANOTHER}") from None
    try:
        model = keras.saving.load_model(Path(model_dir) / MODEL_FILE, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a damaged archive
        raise ModelDirError(f"{model_dir}: {MODEL_FILE} could not be loaded ({type(exc).__name__}: {exc}). "
                            f"{PICK_ANOTHER}") from None
    return model, card

