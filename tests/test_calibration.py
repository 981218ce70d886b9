"""Temperature scaling, Brier score and operating points (mammo_core.evaluation.calibration), and `calibrate` on a model directory."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.factories import minimal_card
from mammo_core.evaluation import calibration as cal
from mammo_core.store import registry
from mammo_core.store.card import write_card
from mammo_core.store.files import sha256_file
from mammo_core.training.calibrate import calibrate_model_dir


def synthetic(temperature: float, n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z) while the 'model' reports sigmoid(z * T): over-confident by T."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    reported = 1 / (1 + np.exp(-z * temperature))
    return y, reported


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_known_temperature(true_t):
    y, p = synthetic(true_t)
    assert cal.fit_temperature(y, p) == pytest.approx(true_t, rel=0.06)


def test_temperature_improves_brier_and_keeps_order():
    y, p = synthetic(3.0)
    t = cal.fit_temperature(y, p)
    q = cal.apply_temperature(p, t)
    assert cal.brier(y, q) < cal.brier(y, p)
    assert (np.diff(q[np.argsort(p)]) >= 0).all()  # order kept (ties only where p saturates)
    assert cal.apply_temperature([0.2, 0.5, 0.9], 1.0) == pytest.approx([0.2, 0.5, 0.9])
    assert cal.apply_temperature([0.5], 7.0) == pytest.approx([0.5])
    with pytest.raises(ValueError, match="temperature"):
        cal.apply_temperature([0.5], 0.0)


def test_brier_by_hand():
    # (0.9-1)^2 + (0.2-0)^2 + (0.6-1)^2 + (0.5-0)^2 = 0.01 + 0.04 + 0.16 + 0.25 = 0.46 -> /4
    assert cal.brier([1, 0, 1, 0], [0.9, 0.2, 0.6, 0.5]) == pytest.approx(0.115)
    with pytest.raises(ValueError, match="differ in length"):
        cal.brier([1, 0], [0.5])


def test_operating_points_meet_their_constraints():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(300, int), np.ones(500, int)]
    p = np.clip(np.r_[rng.normal(0.35, 0.15, 300), rng.normal(0.65, 0.15, 500)], 0, 1)
    yt = np.r_[np.zeros(100, int), np.ones(100, int)]
    pt = np.clip(np.r_[rng.normal(0.35, 0.15, 100), rng.normal(0.65, 0.15, 100)], 0, 1)
    points = {op["name"]: op for op in cal.operating_points(y, p, yt, pt)}
    assert set(points) == {"Youden's J", "Sensitivity ≥ 0.95", "Specificity ≥ 0.90"}
    for op in points.values():
        t = op["threshold"]
        assert op["sensitivity"] == pytest.approx(np.mean(p[y == 1] >= t))
        assert op["specificity"] == pytest.approx(np.mean(p[y == 0] < t))
        assert op["test_sensitivity"] == pytest.approx(np.mean(pt[yt == 1] >= t))
        assert op["computed_on"] == "validation split"
    sens95, spec90, youden = points["Sensitivity ≥ 0.95"], points["Specificity ≥ 0.90"], points["Youden's J"]
    assert sens95["sensitivity"] >= 0.95 and spec90["specificity"] >= 0.90
    # each is the best possible under its constraint: any stricter/looser candidate breaks it or does worse
    higher = p[p > sens95["threshold"]].min()
    assert np.mean(p[y == 1] >= higher) < 0.95
    lower = p[p < spec90["threshold"]].max()
    assert np.mean(p[y == 0] < lower) < 0.90
    j = youden["sensitivity"] + youden["specificity"] - 1
    for t in np.unique(p):
        assert np.mean(p[y == 1] >= t) + np.mean(p[y == 0] < t) - 1 <= j + 1e-12


def _model_dir(tmp_path, rng):
    d = tmp_path / "m"
    d.mkdir()
    for name, n in (("val_predictions.csv", 400), ("test_predictions.csv", 300)):
        y = rng.integers(0, 2, n)
        z = (y * 2 - 1) * 1.0 + rng.normal(0, 1.2, n)
        p = 1 / (1 + np.exp(-3.0 * z))  # over-confident by 3
        pd.DataFrame({"path": [f"x{i}.png" for i in range(n)], "group": "g", "patient": "p", "label": y,
                      "probability": p.astype(np.float32)}).to_csv(d / name, index=False)
    (d / "model.keras").write_bytes(b"not really a model")
    write_card(d, minimal_card(model_sha256=sha256_file(d / "model.keras"),
                                        metrics={"test": {"auc": 0.0}}))
    return d


def test_calibrate_model_dir_is_idempotent_and_consistent(tmp_path):
    d = _model_dir(tmp_path, np.random.default_rng(2))
    before = pd.read_csv(d / "test_predictions.csv")
    card = calibrate_model_dir(d)
    c = card["calibration"]
    assert c["method"] == "temperature" and c["computed_on"] == "validation split"
    assert 2.0 < c["temperature"] < 4.5
    assert c["brier_val_after"] < c["brier_val_before"] and c["brier_test_after"] < c["brier_test_before"]
    after = pd.read_csv(d / "test_predictions.csv")
    assert after["probability_uncalibrated"].tolist() == pytest.approx(before["probability"].tolist())
    assert after["probability"].tolist() == pytest.approx(
        cal.apply_temperature(before["probability"], c["temperature"]).tolist())
    assert card["metrics_uncalibrated"] == {"test": {"auc": 0.0}}
    assert card["metrics"]["test"]["n"] == 300
    assert [op["name"] for op in card["operating_points"]] == ["Youden's J", "Sensitivity ≥ 0.95", "Specificity ≥ 0.90"]
    assert cal.card_temperature(card) == c["temperature"]
    # a second run starts again from the uncalibrated column: same temperature, same files
    again = calibrate_model_dir(d)
    assert again["calibration"]["temperature"] == pytest.approx(c["temperature"], rel=1e-6)
    assert pd.read_csv(d / "test_predictions.csv")["probability"].tolist() == pytest.approx(after["probability"].tolist())
    assert json.loads((d / "card.json").read_text())["metrics_uncalibrated"] == {"test": {"auc": 0.0}}
    registry.verify_model_dir(d)  # model.keras untouched, sha still matches


def test_calibrate_needs_validation_predictions(tmp_path):
    from mammo_core.errors import ModelDirError

    d = _model_dir(tmp_path, np.random.default_rng(3))
    (d / "val_predictions.csv").unlink()
    with pytest.raises(ModelDirError, match="val_predictions.csv"):
        calibrate_model_dir(d)


def test_card_temperature_defaults_to_one():
    assert cal.card_temperature({}) == 1.0
    assert cal.card_temperature({"calibration": {"method": "platt", "a": 1}}) == 1.0
    assert cal.card_temperature({"calibration": {"method": "temperature", "temperature": -1}}) == 1.0
