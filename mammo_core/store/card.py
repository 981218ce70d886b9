"""The model card (`card.json`): its schema and version, the migration of older cards, and the one writer.

Training, calibration and cross-validation write cards, and the CLI, the app, the PACS path and the
benchmarks read them; all of them go through `read_card` / `write_card` / `edit_card` here, so a card on disk is always strict JSON (NaN written as null), carries `schema_version`, and
has the fields `CardSchema` lists with the right types. Cards written before the schema (version 1) are
migrated on load: the preprocessing they were trained with is named (`input_pipeline`), and fields that
only repeated others are dropped.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from mammo_core.errors import ModelDirError
from mammo_core.store.files import atomic_write_text, dumps, plain_json

__all__ = ["CARD_FILE", "SCHEMA_VERSION", "CardSchema", "card_head", "edit_card", "migrate", "read_card", "validate",
           "write_card"]

CARD_FILE = "card.json"
SCHEMA_VERSION = 2


@dataclass
class CardSchema:
    """The fields every card has (required) or may have (optional), with their JSON types.

    Validation checks presence and type of these fields only; anything else in a card is kept as is.
    """

    name: str
    created: str
    architecture: str
    model_sha256: str
    input_pipeline: str
    threshold: float
    class_names: list
    input_shape: list
    dataset: dict
    split: dict
    training: dict
    evaluation: dict
    metrics: dict
    schema_version: int = SCHEMA_VERSION
    architecture_description: str = ""
    parameters: int | None = None
    preprocessing: str = ""
    cam_layer: str | None = None
    calibration: dict | None = None
    operating_points: list | None = None
    metrics_uncalibrated: dict | None = None
    cross_validation: dict | None = None
    cross_validation_patient: dict | None = None
    ensemble: dict | None = None
    ood: dict | None = None
    storage: dict | None = None  # how model.keras stores its weights when not plain float32 (store.compact)
    # out-of-fold AUC with and without the 8-view test-time augmentation, measured after training
    test_time_augmentation: dict | None = None
    config: dict | None = field(default=None)


_REQUIRED = {f.name for f in fields(CardSchema) if f.default is MISSING and f.default_factory is MISSING}
_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "created": (str,), "architecture": (str,), "model_sha256": (str,), "input_pipeline": (str,),
    "threshold": (int, float), "class_names": (list,), "input_shape": (list,), "dataset": (dict,), "split": (dict,),
    "training": (dict,), "evaluation": (dict,), "metrics": (dict,), "schema_version": (int,),
    "architecture_description": (str,), "parameters": (int,), "preprocessing": (str,), "cam_layer": (str,),
    "calibration": (dict,), "operating_points": (list,), "metrics_uncalibrated": (dict,),
    "cross_validation": (dict,), "cross_validation_patient": (dict,), "ensemble": (dict,), "ood": (dict,),
    "storage": (dict,), "test_time_augmentation": (dict,), "config": (dict,),
}


def card_head(config: Any, model: Any, frame: Any) -> dict[str, Any]:
    """The fields every freshly trained model's card starts with, from its `training.train.TrainConfig`, the Keras
    model and the dataset index it was trained on (training and the ensemble both start here)."""
    import datetime as dt

    from mammo_core.config import CLASS_NAMES, IMAGE_SIZE
    from mammo_core.data.datasets import fingerprint
    from mammo_core.io.preprocessing import CARD_KEY, DESCRIPTIONS
    from mammo_core.models.architectures import get_architecture

    return {
        "schema_version": SCHEMA_VERSION,
        "name": config.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "architecture": config.architecture,
        "architecture_description": get_architecture(config.architecture).description,
        "parameters": int(model.count_params()),
        "input_shape": [IMAGE_SIZE, IMAGE_SIZE, int(config.channels)],
        "preprocessing": DESCRIPTIONS[config.input_pipeline],
        CARD_KEY: config.input_pipeline,
        "class_names": list(CLASS_NAMES),
        "dataset": {"path": str(config.data_dir), **fingerprint(frame, config.data_dir),
                    "patient_map": config.patient_map},
    }


def migrate(card: dict[str, Any]) -> dict[str, Any]:
    """A copy of `card` in the current schema. Version 1 (no `schema_version`): name the preprocessing
    (the whole-frame resize, the only one that existed), drop `calibration.brier_before/after` (copies of
    `brier_test_before/after`) and `evaluation.protocol` (a copy of `split.protocol`)."""
    out = plain_json(card)  # a deep copy in plain JSON values
    version = out.get("schema_version", 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ModelDirError(f"model card schema version {version!r} is newer than this program's "
                            f"({SCHEMA_VERSION}); update mammo-assist.")
    if version < 2:
        from mammo_core.io.preprocessing import CARD_KEY, LEGACY

        out.setdefault(CARD_KEY, LEGACY)
        if isinstance(out.get("calibration"), dict):
            for key in ("brier_before", "brier_after"):
                out["calibration"].pop(key, None)
        if isinstance(out.get("evaluation"), dict):
            out["evaluation"].pop("protocol", None)
    out["schema_version"] = SCHEMA_VERSION
    return out


def validate(card: dict[str, Any], where: str = "model card") -> dict[str, Any]:
    """Check the schema's fields are present (the required ones) and typed; returns `card`.

    Raises ModelDirError naming the first bad field.
    """
    missing = sorted(k for k in _REQUIRED if k not in card)
    if missing:
        raise ModelDirError(f"{where}: missing field(s) {', '.join(missing)}.")
    for key, types in _TYPES.items():
        value = card.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            raise ModelDirError(f"{where}: field {key!r} should be {' or '.join(t.__name__ for t in types)}, "
                                f"not {type(value).__name__}.")
    return card


def read_card(model_dir: str | Path) -> dict[str, Any]:
    """Parse and migrate `card.json` of a model directory; ModelDirError naming the path when it cannot."""
    path = Path(model_dir) / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(f"{model_dir}: no {CARD_FILE}; not a model directory.") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path}: unreadable model card ({exc}).") from None
    if not isinstance(card, dict):
        raise ModelDirError(f"{path}: model card is not a JSON object.")
    return migrate(card)


def write_card(model_dir: str | Path, card: dict[str, Any]) -> None:
    """Validate and write a card atomically (readers see the old card or the new one, never a part).
    Paths under the folder MAMMO_DATA_DIR names are written as `$MAMMO_DATA_DIR/...`."""
    from mammo_core.config import data_dir
    from mammo_core.data.datasets import portable_paths

    path = Path(model_dir) / CARD_FILE
    current = migrate(card) if "schema_version" not in card else card
    current = portable_paths(current, data_dir())  # no machine paths: $MAMMO_DATA_DIR/... instead
    validate(plain_json(current), str(path))
    atomic_write_text(path, dumps(current))


def edit_card(model_dir: str | Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read, change in place with `change(card)`, validate and write back a card; returns it."""
    card = read_card(model_dir)
    change(card)
    write_card(model_dir, card)
    return card
