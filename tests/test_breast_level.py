"""Breast- and exam-level AUC from an out-of-fold table (`mammo_core.evaluation.breast_level`, `breast-level` CLI)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mammo_core.cli import main
from mammo_core.evaluation import breast_level
from mammo_core.pacs.scoring import combine
from mammo_core.store.card import read_card

from .test_app import app_env  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


def synthetic(n_patients: int = 24, copies: int = 3, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """An out-of-fold table and a patient map: each patient has a left breast (CC + ML) and, for even
    patients, a right breast (CC + ML). Malignant breasts get higher probabilities on average."""
    rng = np.random.default_rng(seed)
    oof_rows, map_rows = [], []
    image = 1000
    for p in range(n_patients):
        patient = f"pat{p:03d}"
        for side in ("L", "R") if p % 2 == 0 else ("L",):
            malignant = (p + (side == "R")) % 3 == 0
            for view in ("CC", "ML"):
                image += 1
                # a malignant breast may show its lesion in one view only: label the ML view benign there
                label = int(malignant and (view == "CC" or p % 4 == 0))
                map_rows.append({"image_id": str(image), "patient_id": patient, "laterality": side, "view": view,
                                 "evidence": "synthetic"})
                centre = 0.35 + 0.3 * label + rng.normal(0, 0.15)
                for c in range(copies):
                    oof_rows.append({"path": f"x/{image} ({c}).png", "group": image, "patient": patient, "label": label,
                                     "fold": p % 5, "probability": float(np.clip(centre + rng.normal(0, 0.05), 0, 1)),
                                     "probability_uncalibrated": 0.5})
    return pd.DataFrame(oof_rows), pd.DataFrame(map_rows)


def test_image_probability_is_the_mean_of_its_copies():
    oof, patients = synthetic()
    images = breast_level.image_table(oof, patients)
    assert len(images) == oof["group"].nunique()
    first = images.iloc[0]
    copies = oof[oof["group"].astype(str) == first["image"]]
    assert first["probability"] == pytest.approx(copies["probability"].mean())
    assert {"patient", "laterality", "view", "label", "copies"} <= set(images.columns)


def test_breast_rules_and_labels_follow_the_views():
    oof, patients = synthetic()
    images = breast_level.image_table(oof, patients)
    for rule in ("max", "mean"):
        breasts = breast_level.breast_table(images, rule)
        assert len(breasts) == 24 + 12  # every patient's left breast, even patients' right one
        for _, b in breasts.iterrows():
            mine = images[(images["patient"] == b["patient"]) & (images["laterality"] == b["laterality"])]
            assert b["label"] == mine["label"].max()  # malignant when any view is
            assert b["probability"] == pytest.approx(combine(mine["probability"].tolist(), rule))
            assert b["views"] == "CC+ML"
    mx, mn = breast_level.breast_table(images, "max"), breast_level.breast_table(images, "mean")
    assert (mx["probability"] >= mn["probability"] - 1e-12).all() and (mx["probability"] > mn["probability"]).any()
    # a breast labelled malignant although one of its views is benign exists in the fixture
    assert any(len(set(images[(images["patient"] == r.patient) & (images["laterality"] == r.laterality)]["label"])) == 2
               for r in mx.itertuples())
    exams = breast_level.exam_table(mx)
    assert len(exams) == 24
    two = mx[mx["patient"] == "pat000"]
    assert exams.set_index("patient").loc["pat000", "probability"] == pytest.approx(two["probability"].max())


def test_measure_gives_points_inside_their_intervals_and_chooses_the_better_rule():
    oof, patients = synthetic()
    block = breast_level.measure(oof, patients, n_boot=200)
    assert block["n_breasts"] == 36 and block["n_patients"] == 24 and block["n_images"] == 72
    assert block["n_breasts_both_views"] == 36
    for rule in ("max", "mean"):
        for level in ("breast", "exam"):
            fig = block["rules"][rule][level]
            lo, hi = fig["auc_ci"]
            assert lo <= fig["auc"] <= hi
            assert 0.5 < fig["auc"] <= 1.0  # the synthetic scores separate the classes
    aucs = {r: block["rules"][r]["breast"]["auc"] for r in ("max", "mean")}
    assert block["chosen_rule"] == max(aucs, key=aucs.get)
    assert "weak evidence" in block["choice_note"] and "36 breasts" in block["choice_note"]
    json.dumps(block)  # storable


def test_inconsistent_inputs_are_clear_errors():
    from mammo_core.errors import DatasetError

    oof, patients = synthetic()
    with pytest.raises(DatasetError, match="not in the patient map"):
        breast_level.image_table(oof, patients.iloc[2:])
    mixed = oof.copy()
    mixed.loc[0, "label"] = 1 - mixed.loc[0, "label"]
    with pytest.raises(DatasetError, match="different labels"):
        breast_level.image_table(mixed, patients)


def test_cli_stores_the_block_in_the_card(tmp_path, capsys):
    oof, patients = synthetic()
    oof_path, map_path = tmp_path / "oof.csv", tmp_path / "patients.csv"
    oof.to_csv(oof_path, index=False)
    patients.to_csv(map_path, index=False)
    weights = tmp_path / "weights"
    model = weights / "m"
    model.mkdir(parents=True)
    shutil.copy(REPO / "weights" / "efficientnet-lite0-mid-breast-crop" / "card.json", model / "card.json")
    argv = ["--weights", str(weights), "breast-level", "--model", "m", "--oof", str(oof_path),
            "--patient-map", str(map_path), "--n-boot", "100", "--json", "--into-card"]
    # the card's patient CV is another model's: refused unless asked
    assert main(argv) == 1
    assert "not this model's out-of-fold table" in capsys.readouterr().err
    assert main(argv + ["--allow-mismatch"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stored = read_card(model)["breast_level"]
    assert stored["chosen_rule"] == printed["chosen_rule"]
    assert stored["rules"]["max"]["breast"]["auc"] == pytest.approx(printed["rules"]["max"]["breast"]["auc"])
    assert stored["n_breasts"] == 36


@pytest.mark.skipif(not os.environ.get("MAMMO_DATA_DIR"), reason="MAMMO_DATA_DIR is not set (the real dataset's patients.csv)")
def test_real_patient_map_gives_breasts_for_the_shipped_default():
    data = Path(os.environ["MAMMO_DATA_DIR"])
    patients = breast_level.read_patients(data / "patients.csv")
    oof_path = REPO / "cv-results" / "efficientnet-lite0-ft-x2-refit-ensemble-patient" / "oof_predictions.csv"
    card = read_card(REPO / "weights" / "efficientnet-lite0-ft-x2-refit-ensemble")
    if oof_path.is_file():
        oof = breast_level.read_oof(oof_path)
        assert breast_level.copy_auc_matches(oof, card["cross_validation_patient"]) is True
        block = breast_level.measure(oof, patients, n_boot=200)
        assert block["rules"]["max"]["breast"]["auc"] == pytest.approx(card["breast_level"]["rules"]["max"]["breast"]["auc"])
    else:  # cv-results/ is gitignored: score a table of the real images instead
        oof = pd.DataFrame({"group": patients["image_id"], "label": 0, "probability": 0.5})
        oof.loc[::3, "label"] = 1
        block = breast_level.measure(oof, patients, n_boot=50)
    assert block["n_images"] == 106 and block["n_patients"] == 50
    assert block["n_breasts"] == card["breast_level"]["n_breasts"] == 54


def test_metrics_page_shows_breast_and_exam_auc(app_env, tiny_weights_copy):
    from .test_app import start

    app_env(tiny_weights_copy)
    oof, patients = synthetic()
    block = breast_level.measure(oof, patients, n_boot=50)
    breast_level.store_in_card(tiny_weights_copy / "tiny-grouped", block)
    assert "breast_level" in read_card(tiny_weights_copy / "tiny-grouped")
    at = start("metrics")
    assert any(s.value == "By breast and by exam" for s in at.subheader)
    table = next(t.value for t in at.table if "breast AUC [95 % CI] (36 breasts)" in t.value.columns)
    chosen = f"{block['chosen_rule']} of views (chosen)"
    fig = block["rules"][block["chosen_rule"]]["breast"]
    assert table.loc[chosen, "breast AUC [95 % CI] (36 breasts)"].startswith(f"{fig['auc']:.3f} [")
    assert any("weak evidence" in c.value for c in at.caption)
