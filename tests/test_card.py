"""The card contract: schema version, migration of version-1 cards, NaN-safe strict JSON, validation."""

from __future__ import annotations

import json
import math

import pytest

from mammo_core.errors import ModelDirError
from mammo_core.store import card as card_mod
from mammo_core.store import registry
from mammo_core.store.card import read_card, write_card

from .factories import minimal_card

V1 = {"name": "old", "created": "2026-11-01T00:00:00+00:00", "architecture": "paper-cnn", "model_sha256": "abc",
      "threshold": 0.5, "class_names": ["benign", "malignant"], "input_shape": [224, 224, 1], "dataset": {},
      "split": {"protocol": "grouped"}, "training": {}, "metrics": {},
      "evaluation": {"protocol": "grouped", "note": "n"},
      "calibration": {"method": "temperature", "temperature": 1.5, "brier_test_before": 0.2,
                      "brier_test_after": 0.19, "brier_before": 0.2, "brier_after": 0.19}}


def test_version_1_cards_are_migrated_on_load(tmp_path):
    (tmp_path / "card.json").write_text(json.dumps(V1))
    card = read_card(tmp_path)
    assert card["schema_version"] == card_mod.SCHEMA_VERSION
    assert card["input_pipeline"] == "resize"  # the only preprocessing that existed then
    assert "brier_before" not in card["calibration"] and card["calibration"]["brier_test_before"] == 0.2
    assert "protocol" not in card["evaluation"] and card["split"]["protocol"] == "grouped"
    card_mod.validate(card)


def test_nan_is_written_as_null_and_the_file_is_strict_json(tmp_path):
    card = minimal_card(metrics={"test": {"auc": float("nan"), "n": 3}})
    write_card(tmp_path, card)
    text = (tmp_path / "card.json").read_text()
    assert "NaN" not in text
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    assert back["metrics"]["test"]["auc"] is None and back["schema_version"] == card_mod.SCHEMA_VERSION


def test_numpy_values_are_written_as_plain_json(tmp_path):
    import numpy as np

    write_card(tmp_path, minimal_card(threshold=np.float32(0.25), input_shape=list(np.array([224, 224, 1]))))
    back = read_card(tmp_path)
    assert math.isclose(back["threshold"], 0.25) and back["input_shape"] == [224, 224, 1]


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("model_sha256"), "missing field"),
    (lambda c: c.update(threshold="high"), "threshold"),
    (lambda c: c.update(metrics=[1, 2]), "metrics"),
])
def test_bad_cards_are_refused_with_the_field_named(tmp_path, change, message):
    card = minimal_card()
    change(card)
    with pytest.raises(ModelDirError, match=message):
        write_card(tmp_path, card)
    assert not (tmp_path / "card.json").exists()


def test_newer_schema_is_refused(tmp_path):
    (tmp_path / "card.json").write_text(json.dumps({**V1, "schema_version": card_mod.SCHEMA_VERSION + 1}))
    with pytest.raises(ModelDirError, match="newer"):
        read_card(tmp_path)


def test_edit_card_goes_through_the_writer(tmp_path):
    write_card(tmp_path, minimal_card())
    card_mod.edit_card(tmp_path, lambda c: c.update(threshold=0.3))
    assert read_card(tmp_path)["threshold"] == 0.3


def test_shipped_cards_are_current_and_hold_no_machine_paths():
    for path in sorted(registry.PINNED_MANIFEST.parent.glob("*/card.json")):
        raw = json.loads(path.read_text())
        assert raw.get("schema_version") == card_mod.SCHEMA_VERSION, path
        card_mod.validate(raw, str(path))
        text = path.read_text()
        for prefix in ('"/work/', '"/home/', '"/tmp/', '"/root/', '"../'):
            assert prefix not in text, f"{path} holds a machine path ({prefix})"


def test_writer_replaces_the_data_dir_by_its_name(tmp_path, monkeypatch):
    data = tmp_path / "dataset"
    data.mkdir()
    monkeypatch.setenv("MAMMO_DATA_DIR", str(data))
    write_card(tmp_path, minimal_card(dataset={"path": str(data)}, config={"patient_map": str(data / "p.csv")}))
    text = (tmp_path / "card.json").read_text()
    assert str(data) not in text and '"$MAMMO_DATA_DIR/p.csv"' in text
