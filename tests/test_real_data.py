"""Tests on the real Augmented INbreast dataset, found through MAMMO_DATA_DIR (skipped when unset)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mammo_core.config import REPO_ROOT
from mammo_core.data import datasets
from mammo_core.data.pipeline import load_images
from mammo_core.data.splits import SPLITS, assign_split
from mammo_core.store import registry

DATA = os.environ.get("MAMMO_DATA_DIR")
pytestmark = pytest.mark.skipif(not DATA, reason="MAMMO_DATA_DIR is not set; real-dataset tests need the Augmented INbreast folder")


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    root = Path(DATA)
    return datasets.scan_dataset(root, patient_map=datasets.default_patient_map(root))


def test_dataset_shape(frame):
    assert len(frame) == 7632
    assert frame["group"].nunique() == 106
    labels = frame.groupby("group")["label"].first()
    assert (labels == 0).sum() == 35 and (labels == 1).sum() == 71
    assert frame["patient"].nunique() == 50
    assert frame.groupby(["given_split", "label"]).size().to_dict() == {
        ("test", 0): 630, ("test", 1): 1278, ("train", 0): 1260, ("train", 1): 2556, ("val", 0): 630, ("val", 1): 1278}


def test_paper_split_shares_every_source_image(frame):
    split = assign_split(frame, protocol="paper")
    sides = split.groupby("group")["split"].nunique()
    assert (sides == 3).all()  # the leak this project exists to expose


@pytest.mark.parametrize("group_by, column", [("source", "group"), ("patient", "patient")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_leaks_nothing(frame, group_by, column, seed):
    split = assign_split(frame, protocol="grouped", seed=seed, group_by=group_by)
    sets = {s: set(split.loc[split["split"] == s, column]) for s in SPLITS}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    # grouping by patient also keeps every source image on one side
    assert split.groupby("group")["split"].nunique().max() == 1
    share = split["split"].value_counts(normalize=True)
    assert 0.4 < share["train"] < 0.6 and 0.15 < share["test"] < 0.35
    assert (split.groupby("split")["label"].nunique() == 2).all()


def test_tiny_model_trains_on_real_data(tmp_path):
    from mammo_core.training.train import TrainConfig, train

    cfg = TrainConfig(data_dir=DATA, name="real-smoke", protocol="grouped", epochs=1, batch_size=16, max_steps_per_epoch=3)
    model_dir = train(cfg, root=tmp_path, log=lambda m: None)
    card = registry.verify_model_dir(model_dir)
    assert card["dataset"]["n_files"] == 7632
    assert card["split"]["shared_source_images"] == {"train-val": 0, "train-test": 0, "val-test": 0}
    assert card["training"]["steps_per_epoch"] == 3
    assert card["metrics"]["test"]["n"] == card["split"]["test"]["images"]


def shipped_models() -> list[str]:
    return [e.name for e in registry.list_models(REPO_ROOT / "weights") if e.problem is None]


@pytest.mark.parametrize("name", shipped_models())
def test_shipped_model_rescoring_matches_its_predictions(name):
    from mammo_core.inference.ensemble import out_of_fold
    from mammo_core.inference.predict import Predictor

    model_dir = REPO_ROOT / "weights" / name
    recorded = pd.read_csv(model_dir / registry.PREDICTIONS_FILE)
    sample = recorded.sample(n=min(64, len(recorded)), random_state=0)
    predictor = Predictor.load(model_dir)
    if predictor.ensemble is not None:
        # out-of-fold predictions: each image by the member of its fold (trained on float16 cached trunk
        # activations, hence the looser tolerance); the ensemble's own probability is their mean
        images = load_images([str(Path(DATA) / p) for p in sample["path"]], preprocessing=predictor.preprocessing)
        members, _, _ = predictor.ensemble(images, with_cam=False)
        bag = int(predictor.card["ensemble"].get("members_per_fold", 1))
        by_fold = out_of_fold(members, sample["fold"].to_numpy(), bag)
        diff = np.abs(by_fold - sample["probability"].to_numpy())
        # kernels stored in float16 after training (store.compact) move each member's probability too, by
        # at most the change the card records, measured on every dataset image
        stored = (predictor.card.get("storage") or {}).get("measured") or {}
        median_bound = 2e-4 + (1e-3 if stored else 0.0)
        max_bound = 5e-3 + stored.get("max_abs_change_member_probability", 0.0)
        assert np.median(diff) < median_bound and diff.max() < max_bound, (np.median(diff), diff.max())
        np.testing.assert_allclose(predictor.score_batch(images, with_cam=False)["probability"], members.mean(axis=1),
                                   atol=1e-6)
        return
    results = list(predictor.score_many([(Path(DATA) / p, None) for p in sample["path"]], with_cam=False))
    assert all(r.error is None for r in results)
    np.testing.assert_allclose([r.probability for r in results], sample["probability"], atol=1e-4)
