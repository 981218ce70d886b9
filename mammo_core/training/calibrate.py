"""Calibrate a trained model directory: temperature and operating points fitted on its validation predictions,
its prediction files and card rewritten with them (the maths is `evaluation.calibration`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from mammo_core.errors import ModelDirError
from mammo_core.evaluation.metrics import compute_metrics
from mammo_core.store.card import read_card, write_card
from mammo_core.store.files import atomic_write_text
from mammo_core.store.registry import PREDICTIONS_FILE, VAL_PREDICTIONS_FILE
from mammo_core.evaluation.calibration import (COMPUTED_ON, UNCALIBRATED_COLUMN, apply_temperature, brier,
                                               fit_temperature, operating_points)


def calibrate_model_dir(model_dir: str | Path) -> dict[str, Any]:
    """Fit temperature scaling and operating points for a model directory from its recorded predictions.

    Reads `val_predictions.csv` (written by training) and `test_predictions.csv`; the uncalibrated
    probabilities are column `probability_uncalibrated` when present (a re-run), else `probability`.
    Rewrites both files with `probability` = calibrated (what `Predictor` reports once the card holds
    the temperature) and `probability_uncalibrated`, recomputes the card's metrics on the calibrated
    probabilities (the previous ones are kept once as `metrics_uncalibrated`), and stores `calibration`
    and `operating_points`. Every file is replaced atomically; `model.keras` is not touched. Returns the card.

    Raises ModelDirError when a file is missing or unreadable.
    """
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    tables = {}
    for split, file in (("val", VAL_PREDICTIONS_FILE), ("test", PREDICTIONS_FILE)):
        try:
            table = pd.read_csv(model_dir / file)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise ModelDirError(f"{model_dir / file}: cannot read predictions ({exc}); calibration needs the "
                                "validation and test predictions written by training.") from None
        if not {"label", "probability"} <= set(table.columns):
            raise ModelDirError(f"{model_dir / file}: needs columns label and probability.")
        if UNCALIBRATED_COLUMN not in table.columns:
            table[UNCALIBRATED_COLUMN] = table["probability"]
        tables[split] = table
    val, test = tables["val"], tables["test"]
    temperature = fit_temperature(val["label"], val[UNCALIBRATED_COLUMN])
    for table in tables.values():
        table["probability"] = apply_temperature(table[UNCALIBRATED_COLUMN], temperature)
    card["calibration"] = {
        "method": "temperature",
        "temperature": temperature,
        "computed_on": COMPUTED_ON,
        "formula": "p = sigmoid(logit / temperature)",
        "brier_val_before": brier(val["label"], val[UNCALIBRATED_COLUMN]),
        "brier_val_after": brier(val["label"], val["probability"]),
        "brier_test_before": brier(test["label"], test[UNCALIBRATED_COLUMN]),
        "brier_test_after": brier(test["label"], test["probability"]),
    }
    card["operating_points"] = operating_points(val["label"], val["probability"], test["label"], test["probability"])
    threshold = float(card.get("threshold", 0.5))
    if "metrics" in card and "metrics_uncalibrated" not in card:
        card["metrics_uncalibrated"] = card["metrics"]
    card["metrics"] = {s: compute_metrics(t["label"], t["probability"], threshold=threshold) for s, t in tables.items()}
    for split, file in (("val", VAL_PREDICTIONS_FILE), ("test", PREDICTIONS_FILE)):
        atomic_write_text(model_dir / file, tables[split].to_csv(index=False))
    write_card(model_dir, card)
    return card
