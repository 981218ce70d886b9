"""The fine-tuned ensemble: one fit path for CV and training, the ensemble model directory, scoring with
an interval, Grad-CAM of the mean logit, and the out-of-distribution distance."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mammo_core.inference.predict import OOD_WARNING, Predictor
from mammo_core.store.card import read_card
from mammo_core.store.registry import verify_model_dir
from mammo_core.training import finetune
from mammo_core.training.train import TrainConfig, train

TINY_RECIPE = {"max_epochs": 2, "copies_per_source": 2, "val_copies_per_source": 2, "batch_size": 8}


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory, tiny_dataset):
    import os

    os.environ.setdefault("MAMMO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("ens-weights")
    config = TrainConfig(data_dir=str(tiny_dataset), name="tiny-ft", architecture="efficientnet-lite0-ft",
                         folds=2, recipe=TINY_RECIPE)
    return train(config, root=root, log=lambda m: None)


def test_ensemble_directory_and_card(ensemble_dir, tiny_dataset):
    card = verify_model_dir(ensemble_dir)
    assert card["architecture"] == "efficientnet-lite0-ft"
    assert card["input_pipeline"] == "breast-crop-v1"
    assert card["ensemble"]["members"] == 2 and len(card["ensemble"]["temperatures"]) == 2
    assert card["ood"]["threshold"] > 0
    cv = card["cross_validation"]
    assert len(cv["folds"]) == 2 and 0.0 <= cv["pooled"]["auc"] <= 1.0
    assert cv["training"]["recipe"]["max_epochs"] == 2
    # strict JSON (no NaN), readable back
    json.loads((ensemble_dir / "card.json").read_text())
    import pandas as pd

    oof = pd.read_csv(ensemble_dir / "test_predictions.csv")
    assert set(oof["fold"]) == {0, 1} and oof["probability"].between(0, 1).all()


def test_ensemble_scores_with_interval_and_cam(ensemble_dir, sample_png):
    predictor = Predictor.load(ensemble_dir)
    assert predictor.ensemble is not None
    pred = predictor.score_one(sample_png, name="x.png", with_cam=True)
    assert pred.error is None
    low, high = pred.probability_interval
    assert low <= pred.probability <= high
    assert pred.heatmap.shape == (224, 224) and 0 <= pred.heatmap.min() and pred.heatmap.max() <= 1
    assert pred.ood_score is not None and pred.ood_score >= 0
    line = pred.to_json(predictor.name)
    assert line["probability_interval"] == [round(low, 6), round(high, 6)]
    assert isinstance(line["in_distribution"], bool) and isinstance(line["warnings"], list)
    # scoring without Grad-CAM gives the same probabilities
    plain = predictor.score_one(sample_png, name="x.png", with_cam=False)
    assert abs(plain.probability - pred.probability) < 1e-5 and plain.heatmap is None


def test_ensemble_probability_is_mean_of_calibrated_members(ensemble_dir):
    from scipy.special import expit

    predictor = Predictor.load(ensemble_dir)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 224, 224), dtype=np.uint8)
    out = predictor.score_batch(images, with_cam=False)
    logits, _ = predictor.model.predict(images.astype(np.float32)[..., None] / 255.0, verbose=0)
    members = expit(logits / np.asarray(predictor.card["ensemble"]["temperatures"]))
    np.testing.assert_allclose(out["probability"], members.mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(out["interval"][:, 0], members.min(axis=1), atol=1e-5)


def test_ensemble_gradcam_matches_reference(ensemble_dir):
    """Grad-CAM of the mean logit, recomputed independently with a plain GradientTape."""
    import tensorflow as tf

    predictor = Predictor.load(ensemble_dir)
    rng = np.random.default_rng(1)
    images = rng.integers(30, 220, (2, 224, 224), dtype=np.uint8)
    cams = predictor.score_batch(images, with_cam=True)["heatmap"]
    x = tf.constant(images.astype(np.float32)[..., None] / 255.0)
    trunk, members = predictor.model.get_layer("trunk"), predictor.model.get_layer("members")
    feats = trunk(x)
    with tf.GradientTape() as tape:
        tape.watch(feats)
        mean = tf.reduce_mean(members(feats), axis=-1)
    grads = tape.gradient(mean, feats).numpy()
    w = grads.mean(axis=(1, 2))
    raw = np.maximum((feats.numpy() * w[:, None, None, :]).sum(-1), 0)
    for i in range(2):
        ref = raw[i] / (raw[i].max() + 1e-8)
        ref = tf.image.resize(ref[..., None], (224, 224), method="bilinear").numpy()[..., 0]  # as the app shows it
        np.testing.assert_allclose(cams[i], np.clip(ref, 0, 1), atol=2e-3)


def test_ood_flags_what_is_far_from_training(ensemble_dir):
    predictor = Predictor.load(ensemble_dir)
    predictor.ood_threshold = 0.0  # everything is "far": the warning must appear
    pred = predictor.score_one(_noise_png(), name="n.png", with_cam=False)
    assert OOD_WARNING in pred.warnings and pred.in_distribution is False
    predictor.ood_threshold = float("inf")
    pred = predictor.score_one(_noise_png(), name="n.png", with_cam=False)
    assert OOD_WARNING not in pred.warnings


def test_fit_ood_is_mahalanobis():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 4)) @ np.diag([1, 2, 3, 4])
    w, b = finetune.fit_ood(x)
    d = np.sum((x @ w + b) ** 2, axis=1)
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(x)
    np.testing.assert_allclose(d, lw.mahalanobis(x), rtol=1e-4)


def test_recipe_validation():
    with pytest.raises(ValueError, match="cut"):
        finetune.Recipe(cut="block9z").validate()
    with pytest.raises(ValueError, match="copies_per_source"):
        finetune.Recipe(copies_per_source=0).validate()
    for bad in (0.5, 1.1, 5.0):
        with pytest.raises(ValueError, match="input_scale"):
            finetune.Recipe(input_scale=bad).validate()
    finetune.Recipe(input_scale=1.5).validate()
    with pytest.raises(ValueError, match="backbone must be one of lite0, lite1, lite2, got 'lite4'"):
        finetune.Recipe(backbone="lite4").validate()
    finetune.Recipe(backbone="lite2").validate()


def test_recipe_from_a_card_that_predates_a_field():
    """An older card has no input_scale: its model ran at 1, whatever today's default; unknown keys are ignored."""
    old = {"cut": "block6a", "learning_rate": 3e-4, "copies_per_source": 32}
    assert finetune.Recipe().input_scale == 2.0
    assert finetune.Recipe.from_card(old) == finetune.Recipe(learning_rate=3e-4, copies_per_source=32, input_scale=1.0,
                                                             refit_parts=0)
    assert finetune.Recipe.from_card({**old, "input_scale": 2.0, "later_field": 1}).input_scale == 2.0
    assert finetune.Recipe.from_card(old).backbone == "lite0"
    assert finetune.Recipe.from_card({**old, "backbone": "lite2"}).backbone == "lite2"


def test_trunk_layer_is_the_block_before_the_cut_in_each_backbone():
    assert finetune.trunk_layer("stem") is None
    assert [finetune.trunk_layer(c) for c in ("block5a", "block6a", "block7a")] == [
        "block4c_add", "block5c_add", "block6d_add"]
    for deeper in ("lite1", "lite2"):  # stages 4, 5, 6 have 4, 4, 5 blocks instead of 3, 3, 4
        assert [finetune.trunk_layer(c, deeper) for c in ("block5a", "block6a", "block7a")] == [
            "block4d_add", "block5d_add", "block6e_add"]
    with pytest.raises(ValueError, match="cut"):
        finetune.trunk_layer("block9z")


def test_a_deeper_backbone_splits_at_its_own_cut_and_caches_apart():
    """Lite2 (wider: 120 channels into block6a) splits where Lite0 does, by block name, and its activations
    get their own cache key."""
    trunk, core = finetune.build_parts("block6a", 1.0, "lite2")
    assert tuple(trunk.output.shape[1:]) == (14, 14, 120) and tuple(core.input.shape[1:]) == (14, 14, 120)
    assert core.output.shape[-1] == 1280 and "block6e_project_conv" in {layer.name for layer in core.layers}
    paths = [__file__]
    assert finetune._cache_key(paths, "block6a", "p", 1.0, "lite2") != finetune._cache_key(paths, "block6a", "p")
    assert finetune._cache_key(paths, "block6a", "p", 1.0, "lite0") == finetune._cache_key(paths, "block6a", "p")


def test_input_scale_resizes_inside_the_trunk():
    """With input_scale 2 the trunk takes the 224x224 model input and equals the 448x448 network's lower
    part on the bilinearly resized image; the cached activations get their own cache key."""
    import keras
    import tensorflow as tf

    from mammo_core.models.efficientnet_lite import build_efficientnet_lite0

    trunk, core = finetune.build_parts("block6a", 2.0)
    assert tuple(trunk.input.shape[1:]) == (224, 224, 1)
    assert tuple(trunk.output.shape[1:]) == (28, 28, 112) and tuple(core.input.shape[1:]) == (28, 28, 112)
    full = build_efficientnet_lite0(input_shape=(448, 448, 1))
    lower = keras.Model(full.input, full.get_layer(finetune.trunk_layer("block6a")).output)
    x = np.random.default_rng(0).random((2, 224, 224, 1)).astype(np.float32)
    expected = lower(tf.image.resize(x, (448, 448), method="bilinear")).numpy()
    np.testing.assert_allclose(trunk(x).numpy(), expected, atol=1e-5)
    paths = [__file__]
    assert finetune._cache_key(paths, "block6a", "p", 2.0) != finetune._cache_key(paths, "block6a", "p", 1.0)
    assert finetune._cache_key(paths, "block6a", "p") == finetune._cache_key(paths, "block6a", "p", 1.0)


def test_ensemble_with_input_scale_trains_scores_and_explains(tiny_dataset, tmp_path_factory, sample_png):
    """A scaled recipe goes through the same train path: the card records the scale, the saved model takes
    224x224 inputs, and scoring gives an interval and a 224x224 Grad-CAM map from the larger trunk output."""
    import os

    os.environ.setdefault("MAMMO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    config = TrainConfig(data_dir=str(tiny_dataset), name="tiny-ft-x1.5", architecture="efficientnet-lite0-ft",
                         folds=2, recipe={**TINY_RECIPE, "input_scale": 1.5})
    model_dir = train(config, root=tmp_path_factory.mktemp("scaled-weights"), log=lambda m: None)
    card = verify_model_dir(model_dir)
    assert card["training"]["recipe"]["input_scale"] == 1.5
    assert "resized x1.5" in card["cross_validation"]["training"]["strategy"]
    predictor = Predictor.load(model_dir)
    assert tuple(predictor.model.input.shape[1:]) == (224, 224, 1)
    pred = predictor.score_one(sample_png, name="x.png", with_cam=True)
    assert pred.error is None and pred.heatmap.shape == (224, 224)
    low, high = pred.probability_interval
    assert low <= pred.probability <= high


def test_nested_refit_ensemble_trains_members_on_every_training_group(tiny_dataset, tmp_path_factory):
    """With `refit_parts`, each member is trained on its whole training side for the inner models' median best
    epoch (rounded up); the card says how the epochs and temperatures were found."""
    import os

    os.environ.setdefault("MAMMO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    config = TrainConfig(data_dir=str(tiny_dataset), name="tiny-ft-refit", architecture="efficientnet-lite0-ft",
                         folds=2, recipe={**TINY_RECIPE, "refit_parts": 2})
    model_dir = train(config, root=tmp_path_factory.mktemp("refit-weights"), log=lambda m: None)
    card = verify_model_dir(model_dir)
    assert card["training"]["recipe"]["refit_parts"] == 2 and card["ensemble"]["members"] == 2
    assert "nested refit" in card["cross_validation"]["validation"]
    assert "inner model" in card["calibration"]["computed_on"]
    for fold in card["cross_validation"]["folds"]:
        assert len(fold["inner_best_epochs"]) == 2
        assert fold["best_epoch"] == fold["epochs_run"] == finetune.refit_epochs(fold["inner_best_epochs"])
        # the member saw every training source image (2 copies each), the inner models three quarters of them
        assert fold["train_images_per_epoch"] == 2 * (8 - fold["n_source_images"])
    pred = Predictor.load(model_dir).score_one(_noise_png(), name="x.png")
    assert pred.error is None and 0 <= pred.probability <= 1


def test_bagged_ensemble_ships_every_member_of_every_fold(tiny_dataset, tmp_path_factory, sample_png):
    """`members_per_fold=2`: k x 2 members in one model, a temperature each in member order, and a card that
    says the out-of-fold figures average one fold's members."""
    import os

    from appkit import cards

    os.environ.setdefault("MAMMO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    config = TrainConfig(data_dir=str(tiny_dataset), name="tiny-ft-bag", architecture="efficientnet-lite0-ft",
                         folds=2, recipe={**TINY_RECIPE, "refit_parts": 0, "members_per_fold": 2})
    model_dir = train(config, root=tmp_path_factory.mktemp("bag-weights"), log=lambda m: None)
    card = verify_model_dir(model_dir)
    assert card["ensemble"]["members"] == 4 and card["ensemble"]["members_per_fold"] == 2
    folds = card["cross_validation"]["folds"]
    assert card["ensemble"]["temperatures"] == [t for fold in folds for t in fold["temperatures"]]
    assert all(len(fold["best_epoch"]) == 2 for fold in folds)
    assert "2 members per fold" in card["cross_validation"]["validation"]
    assert "the 2 ensemble members" in card["evaluation"]["note"] and "differ in their seed" in card["ensemble"]["interval"]
    predictor = Predictor.load(model_dir)
    assert len(predictor.ensemble.temperatures) == 4
    pred = predictor.score_one(sample_png, name="x.png", with_cam=True)
    low, high = pred.probability_interval
    assert pred.error is None and low <= pred.probability <= high and pred.heatmap.shape == (224, 224)
    table = cards.fold_table(folds)  # the Metrics page's per-fold table shows both members' figures
    assert table["best epoch"].str.split().map(len).tolist() == [2, 2]
    assert table["temperatures"].str.split().map(len).tolist() == [2, 2]


def test_out_of_fold_averages_the_members_of_each_images_fold():
    from mammo_core.inference.ensemble import out_of_fold

    members = np.array([[0.1, 0.3, 0.9, 0.7, 0.5, 0.5],   # 3 folds x 2 members, fold by fold
                        [0.2, 0.4, 0.6, 0.8, 0.0, 1.0]])
    np.testing.assert_allclose(out_of_fold(members, [1, 0], members_per_fold=2), [0.8, 0.3])
    np.testing.assert_allclose(out_of_fold(members, [5, 2]), [0.5, 0.6])  # one member per fold: its own column
    with pytest.raises(ValueError, match="4 per fold"):
        out_of_fold(members, [0, 0], members_per_fold=4)
    with pytest.raises(ValueError, match="0..2"):
        out_of_fold(members, [3, 0], members_per_fold=2)


def test_metrics_fold_table_names_a_refits_columns():
    """Metrics' per-fold table: a refit's epoch count and pooled inner validation AUC are labelled as such."""
    from appkit import cards

    plain = cards.fold_table([{"fold": 0, "auc": 0.8, "best_epoch": 3, "val_auc": 0.7, "history": [1]}])
    assert list(plain.columns) == ["fold", "AUC", "best epoch", "validation AUC"]
    refit = cards.fold_table([{"fold": 0, "auc": 0.8, "best_epoch": 4, "val_auc": 0.7, "inner_best_epochs": [3, 5]}])
    assert list(refit.columns) == ["fold", "AUC", "epochs (refit)", "validation AUC", "inner models' best epochs"]
    assert refit["inner models' best epochs"].tolist() == ["3 5"]


def test_refit_epochs_and_recipe_field():
    assert finetune.refit_epochs([3, 3, 5, 3]) == 3 and finetune.refit_epochs([2, 5]) == 4
    with pytest.raises(ValueError, match="at least one"):
        finetune.refit_epochs([])
    with pytest.raises(ValueError, match=r"refit_parts must be in \[0, 4\], got 5"):
        finetune.Recipe(refit_parts=5).validate()
    assert finetune.Recipe.from_card({"cut": "block6a"}).refit_parts == 0  # cards before the field: no refit
    with pytest.raises(ValueError, match=r"members_per_fold must be in \[1, 5\], got 0"):
        finetune.Recipe(members_per_fold=0).validate()
    assert finetune.Recipe.from_card({"cut": "block6a"}).members_per_fold == 1


def test_sigterm_during_a_member_fit_is_raised_at_a_batch_boundary(monkeypatch):
    """The ensemble's fits, like `train`'s, take the cancel callback: under `sigterm_cancels` the handler only
    records a SIGTERM, and Cancelled comes at the end of the batch during which it arrived."""
    import keras

    from mammo_core.store.run_safety import Cancelled, sigterm_cancels

    from .factories import sigterm_and_wait

    seen: list[str] = []

    class SignalAtSecondBatch(keras.callbacks.EarlyStopping):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(f"batch {batch}")
            if batch == 1:
                sigterm_and_wait(requested)  # the handler runs in here, and must not raise
                seen.append("handled, not raised")

    monkeypatch.setattr(keras.callbacks, "EarlyStopping", SignalAtSecondBatch)
    recipe = finetune.Recipe(cut="block7a", input_scale=1.0, max_epochs=2, copies_per_source=8, batch_size=4)
    rng = np.random.default_rng(0)
    activations = rng.normal(size=(32, 7, 7, 192)).astype(np.float16)
    labels, groups = np.arange(32) % 2, np.arange(32) // 4
    with sigterm_cancels() as requested, pytest.raises(Cancelled):
        finetune.fit_member(activations, labels, groups, np.arange(24), np.arange(24, 32), recipe, log=lambda m: None)
    assert seen == ["batch 0", "batch 1", "handled, not raised"]  # batch 1 finished; batch 2 never began


def _noise_png() -> bytes:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (300, 300), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_cli_predict_json_interval_and_saved_inputs(ensemble_dir, tmp_path, sample_png, capsys):
    from PIL import Image

    from mammo_core.cli import main

    (tmp_path / "a.png").write_bytes(sample_png)
    (tmp_path / "black.png").write_bytes(_png(np.zeros((300, 300), np.uint8)))
    inputs = tmp_path / "inputs"
    code = main(["predict", str(tmp_path / "a.png"), str(tmp_path / "black.png"), "--model", str(ensemble_dir),
                 "--json", "--save-inputs", str(inputs)])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(line["probability_interval"]) for line in lines] == [2, 2]
    black = next(line for line in lines if line["path"].endswith("black.png"))
    assert black["in_distribution"] is False and any("uniform" in w for w in black["warnings"])
    saved = Image.open(inputs / "a_input.png")
    assert saved.size == (224, 224)


def test_cli_recipe_overrides_are_checked(capsys):
    from mammo_core.cli import _recipe_overrides

    assert _recipe_overrides(["learning_rate=3e-4", "cut=block7a", "max_epochs=4"]) == {
        "learning_rate": 3e-4, "cut": "block7a", "max_epochs": 4}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _recipe_overrides(["nonsense=1"])
    with pytest.raises(ValueError, match="not a valid int"):
        _recipe_overrides(["max_epochs=many"])


def _png(pixels: np.ndarray) -> bytes:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_cli_evaluate_reads_out_of_fold_predictions_and_refuses_rescoring(ensemble_dir, tiny_dataset, capsys):
    from mammo_core.cli import main

    assert main(["evaluate", "--model", str(ensemble_dir)]) == 0
    assert "out-of-fold" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(ensemble_dir), "--data", str(tiny_dataset)]) == 1
    assert "no held-out split" in capsys.readouterr().err


SHIPPED = "efficientnet-lite0-ft-x2-refit-ensemble"  # the default (weights/ACTIVE)


@pytest.fixture(scope="module")
def shipped():
    from mammo_core.config import REPO_ROOT

    path = REPO_ROOT / "weights" / SHIPPED
    if not (path / "model.keras").is_file():
        pytest.skip(f"{SHIPPED} is not in weights/")
    return Predictor.load(path)


def test_shipped_ensemble_card_is_complete(shipped):
    card = shipped.card
    assert card["ensemble"]["members"] == 5 and len(card["ensemble"]["temperatures"]) == 5
    for key in ("cross_validation", "cross_validation_patient"):
        pooled = card[key]["pooled"]
        assert 0.5 < pooled["auc"] < 1 and pooled["auc_ci"][0] < pooled["auc"] < pooled["auc_ci"][1]
    assert card["split"]["protocol"] == "cross-validation" and card["input_pipeline"] == "breast-crop-v1"
    assert card["dataset"]["path"] == "$MAMMO_DATA_DIR"
    assert card["training"]["recipe"]["input_scale"] == 2.0 and card["storage"]["measured"]["images"] == 7632
    assert card["training"]["recipe"]["refit_parts"] == 2 and "nested refit" in card["cross_validation"]["validation"]
    assert finetune.Recipe.from_card(card["training"]["recipe"]) == finetune.Recipe()  # Retrain reproduces it
    from mammo_core.config import REPO_ROOT

    assert (REPO_ROOT / "weights" / "ACTIVE").read_text().strip() == SHIPPED


def test_shipped_ensemble_flags_pictures_that_are_not_mammograms(shipped):
    """Natural photographs, a chest-radiograph-like picture and a text screenshot are flagged; a
    synthetic breast on black is scored with a members' range."""
    import skimage.data

    from .factories import png_bytes, synthetic_mammogram

    others = {"camera": skimage.data.camera(), "astronaut": (skimage.data.astronaut().mean(axis=2)).astype(np.uint8),
              "coffee": (skimage.data.coffee().mean(axis=2)).astype(np.uint8), "page": skimage.data.page(),
              "noise": np.random.default_rng(0).integers(0, 255, (400, 400), dtype=np.uint8)}
    preds = list(shipped.score_many([(png_bytes(a), n) for n, a in others.items()], with_cam=False))
    flagged = [p.name for p in preds if not p.in_distribution]
    assert len(flagged) >= 4, f"only {flagged} flagged"
    breast = shipped.score_one(png_bytes(synthetic_mammogram(3, malignant=True, size=400)), name="b", with_cam=True)
    low, high = breast.probability_interval
    assert low <= breast.probability <= high and breast.heatmap.shape == (224, 224)


def test_saved_ensemble_carries_no_optimizer_state(ensemble_dir):
    """The members are trained compiled; the saved model must hold only weights (an optimizer's slots would
    triple the file)."""
    import io
    import zipfile

    import h5py

    with zipfile.ZipFile(ensemble_dir / "model.keras") as archive:
        weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
        names: list[str] = []
        weights.visit(names.append)
    assert not [n for n in names if "optimizer" in n]


def test_full_fine_tuning_is_refused_as_an_ensemble_before_training(tiny_dataset, tmp_path, capsys):
    """cut=stem has no shared trunk for Grad-CAM and the OOD check: the CLI says so at once, writes nothing."""
    from mammo_core.cli import main

    root = tmp_path / "weights"
    root.mkdir()
    code = main(["--weights", str(root), "train", "--arch", "efficientnet-lite0-ft", "--data", str(tiny_dataset),
                 "--name", "full-ft", "--recipe", "cut=stem"])
    err = capsys.readouterr().err
    assert code == 1
    assert "full fine-tuning" in err and "Traceback" not in err
    from mammo_core.store.run_safety import LOCK_FILE

    assert [p.name for p in root.iterdir() if p.name != LOCK_FILE] == []  # no model folder, no staging left
