"""Test-time augmentation of the fine-tuned ensemble (issue 12): the member logits averaged over the 8 flips and
90° rotations, in the same compiled call; the plain path unchanged; Grad-CAM and the out-of-distribution distance
those of the plain view; `predict --tta`; bad names refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit

from mammo_core.inference.ensemble import DIHEDRAL8, TTA_MODES, EnsembleScorer, dihedral_views
from mammo_core.inference.predict import Predictor

from .test_app import app_env  # noqa: F401  (the app pointed at tmp folders, local mode)
from .test_ensemble import ensemble_dir  # noqa: F401  (a tiny trained ensemble in a model directory)
from .test_scoring_speed import ens, images  # noqa: F401  (an untrained 2-member ensemble; 4 synthetic inputs)

#: experiments/tta_check.py's views, written independently of `DIHEDRAL8` (numpy on (N, H, W) arrays)
REFERENCE_VIEWS = {
    "identity": lambda x: x,
    "vflip": lambda x: x[:, ::-1, :],
    "hflip": lambda x: x[:, :, ::-1],
    "hvflip": lambda x: x[:, ::-1, ::-1],
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "transpose": lambda x: np.swapaxes(x, 1, 2),
    "antitranspose": lambda x: np.rot90(np.swapaxes(x, 1, 2), 2, axes=(1, 2)),
}


def _logits(model, images: np.ndarray) -> np.ndarray:
    """Member logits (N, k) of the ensemble model itself (no scorer), for uint8 (N, 224, 224) inputs."""
    logits, _ = model.predict(np.ascontiguousarray(images).astype(np.float32)[..., None] / 255.0, verbose=0)
    return np.asarray(logits, dtype=np.float64)


def _symmetric_image() -> np.ndarray:
    """A 224x224 uint8 image unchanged by every flip and 90° rotation (it depends on the distance to the centre)."""
    r = np.arange(224)
    d2 = (2 * r[:, None] - 223) ** 2 + (2 * r[None, :] - 223) ** 2
    return (255 * np.exp(-d2 / (2 * 140.0 ** 2))).astype(np.uint8)


def test_views_are_those_of_the_inner_validation(images):
    assert list(DIHEDRAL8) == list(REFERENCE_VIEWS)
    stacked = dihedral_views(images[..., None]).numpy()[..., 0]
    n = len(images)
    for i, view in enumerate(REFERENCE_VIEWS.values()):
        np.testing.assert_array_equal(stacked[i * n:(i + 1) * n], view(images))
    assert len({stacked[i * n].tobytes() for i in range(8)}) == 8  # 8 distinct views of an asymmetric image


@pytest.mark.parametrize("frozen", [False, True])
def test_tta_probability_is_the_logit_mean_over_the_8_views(ens, images, frozen):
    model, card = ens
    temps = np.asarray(card["ensemble"]["temperatures"])
    mean_logits = np.mean([_logits(model, view(images)) for view in REFERENCE_VIEWS.values()], axis=0)
    expected = expit(mean_logits / temps)
    plain = EnsembleScorer(model, card, precision="float32", frozen=frozen)
    tta = EnsembleScorer(model, card, precision="float32", frozen=frozen, tta="dihedral8")
    for with_cam in (False, True):
        probs, ood, cams = tta(images, with_cam=with_cam)
        np.testing.assert_allclose(probs, expected, atol=1e-5)
        # the distance and the map are those of the plain view
        plain_probs, plain_ood, plain_cams = plain(images, with_cam=with_cam)
        np.testing.assert_allclose(ood, plain_ood, rtol=1e-4)
        if with_cam:
            assert cams.shape == plain_cams.shape == (len(images), 224, 224)
            assert np.abs(cams - plain_cams).max() < 1e-3
        # the check can fail: the augmentation does move these probabilities
        assert np.abs(probs - plain_probs).max() > 1e-4


def test_tta_inputs_larger_than_one_call_are_split_without_changing_results(ens, images):
    from mammo_core.inference.ensemble import TTA_IMAGES_PER_CALL

    model, card = ens
    scorer = EnsembleScorer(model, card, precision="float32", tta="dihedral8")
    many = np.concatenate([images] * 3)
    assert len(many) > TTA_IMAGES_PER_CALL
    for with_cam in (False, True):
        small, big = scorer(images, with_cam=with_cam), scorer(many, with_cam=with_cam)
        np.testing.assert_allclose(big[0], np.concatenate([small[0]] * 3), atol=1e-5)
        np.testing.assert_allclose(big[1], np.concatenate([small[1]] * 3), rtol=1e-4)
        if with_cam:
            assert big[2].shape == (len(many), 224, 224)
            assert np.abs(big[2] - np.concatenate([small[2]] * 3)).max() < 1e-3


def test_an_image_unchanged_by_every_view_scores_the_same_with_and_without_tta(ens):
    model, card = ens
    image = _symmetric_image()[None]
    assert all(np.array_equal(view(image), image) for view in REFERENCE_VIEWS.values())
    plain, _, _ = EnsembleScorer(model, card, precision="float32")(image, with_cam=False)
    tta, _, _ = EnsembleScorer(model, card, precision="float32", tta="dihedral8")(image, with_cam=False)
    np.testing.assert_allclose(tta, plain, atol=1e-5)


def test_no_tta_is_the_default_and_scores_the_plain_view(ens, images):
    model, card = ens
    default = EnsembleScorer(model, card, precision="float32")
    none = EnsembleScorer(model, card, precision="float32", tta="none")
    assert default.tta == none.tta == "none" == TTA_MODES[0]
    for with_cam in (False, True):
        a, b = default(images, with_cam=with_cam), none(images, with_cam=with_cam)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    expected = expit(_logits(model, images) / np.asarray(card["ensemble"]["temperatures"]))
    np.testing.assert_allclose(none(images, with_cam=False)[0], expected, atol=1e-5)
    # the plain call builds no views; the augmented one does
    reversals = [sum(op.type == "ReverseV2" for op in scorer.function(False).graph.get_operations())
                 for scorer in (none, EnsembleScorer(model, card, precision="float32", tta="dihedral8"))]
    assert reversals[0] == 0 and reversals[1] > 0
    assert Predictor(model, {**card, "name": "tiny-ens"}).tta == "none"


def test_predictor_passes_tta_through(ens, images):
    model, card = ens
    card = {**card, "name": "tiny-ens", "input_pipeline": "breast-crop-v1"}
    plain = Predictor(model, card).score_batch(images, with_cam=True)
    tta = Predictor(model, card, tta="dihedral8").score_batch(images, with_cam=True)
    members, _, _ = EnsembleScorer(model, card, tta="dihedral8")(images, with_cam=False)
    np.testing.assert_allclose(tta["probability"], members.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(tta["interval"], np.stack([members.min(1), members.max(1)], axis=1), atol=1e-6)
    assert np.abs(tta["heatmap"] - plain["heatmap"]).max() < 1e-3


def test_bad_tta_names_and_single_models_are_refused(ens):
    import keras

    model, card = ens
    with pytest.raises(ValueError, match="none, dihedral8, got 'flips'"):
        EnsembleScorer(model, card, tta="flips")
    with pytest.raises(ValueError, match="got 'rot90'"):
        Predictor(model, {**card, "name": "tiny-ens"}, tta="rot90")
    with pytest.raises(ValueError, match="got 'x8'"):
        Predictor.load("no-such-model", tta="x8")  # checked before the model is looked for
    single = keras.Sequential([keras.Input((224, 224, 1)), keras.layers.Conv2D(2, 3),
                               keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, activation="sigmoid")])
    with pytest.raises(ValueError, match="fine-tuned ensemble only.*tiny-single is a single model"):
        Predictor(single, {"name": "tiny-single"}, tta="dihedral8")
    assert Predictor(single, {"name": "tiny-single"}).tta == "none"


def test_cli_predict_tta_json(ensemble_dir, tmp_path, sample_png, capsys):  # noqa: F811
    from mammo_core.cli import main

    image = tmp_path / "a.png"
    image.write_bytes(sample_png)
    assert main(["predict", str(image), "--model", str(ensemble_dir), "--json", "--tta"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["tta"] == "dihedral8" and 0 <= row["probability"] <= 1 and len(row["probability_interval"]) == 2
    expected = Predictor.load(ensemble_dir, tta="dihedral8").score_one(sample_png, with_cam=False)
    assert abs(row["probability"] - expected.probability) < 1e-5
    assert main(["predict", str(image), "--model", str(ensemble_dir), "--json"]) == 0
    assert "tta" not in json.loads(capsys.readouterr().out.strip())  # the default rows are as before
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "8 views (flips and 90° rotations), about 8x slower" in " ".join(capsys.readouterr().out.split())
    assert main(["predict", str(image), "--model", str(ensemble_dir), "--tta", "--engine", "ray"]) == 1
    assert "--tta needs the local engine" in capsys.readouterr().err


def test_bench_reports_tta_beside_the_plain_view():
    from bench.__main__ import PARTS, report

    assert "tta" in PARTS
    arm = lambda ms, per_s: {"latency_ms_best": ms, "folder_images_per_s_best": per_s, "first_calls_s": 2.0}  # noqa: E731
    results = {"tta": {"arms": {"none": arm(30.0, 80.0), "dihedral8": arm(120.0, 10.0)}, "rounds": 2, "n_latency": 20,
                       "n_folder": 256, "max_probability_change": 0.1}}
    text = report(results, "python -m bench --only tta", "2 cores", "ens")
    assert "| plain view (default) | 30.0 | 80.0 | 2.0 |" in text
    assert "| 8 views (`--tta`) | 120.0 | 10.0 | 2.0 |" in text
    assert "| cost of the 8 views | 4.0x | 8.0x slower | |" in text


def test_review_offers_the_8_views_for_an_ensemble(app_env, ensemble_dir, sample_png, tmp_path):  # noqa: F811
    """Review's toggle scores the ensemble over its 8 views (the same numbers as `predict --tta`), keeps
    the two settings' worklists apart and names the setting in the worklist and the audit log."""
    from mammo_core.store import registry
    from mammo_core.store.audit import AuditLog, default_audit_path

    from .test_app import metric, no_exception, start

    app_env(ensemble_dir.parent)
    registry.set_active_model(ensemble_dir.name, ensemble_dir.parent)
    at = start("review")
    no_exception(at)
    at.file_uploader[0].set_value([("scan.png", sample_png, "image/png")]).run()
    plain = float(metric(at, "Probability of malignancy"))
    at.toggle(key="review_tta").set_value(True).run()
    no_exception(at)
    assert any("8 views switched the other way" in c.value for c in at.caption)
    at.file_uploader[0].set_value([("scan.png", sample_png, "image/png")]).run()
    views = float(metric(at, "Probability of malignancy"))
    expected = Predictor.load(ensemble_dir, tta="dihedral8").score_one(sample_png, with_cam=False).probability
    assert views == pytest.approx(expected, abs=1e-3)  # the metric shows 3 decimals
    assert at.dataframe[0].value["model"].tolist() == [f"{ensemble_dir.name} (8 views)"]
    rows = AuditLog(default_audit_path()).recent()
    assert sorted(r["model_name"] for r in rows) == sorted([ensemble_dir.name, f"{ensemble_dir.name} (8 views)"])
    at.toggle(key="review_tta").set_value(False).run()
    assert float(metric(at, "Probability of malignancy")) == plain  # the plain worklist is still there


def test_the_8_view_figures_come_from_the_models_own_card():
    """The toggle quotes the card's out-of-fold measurement of the 8 views (written by
    experiments/tta_oof.py --into-card), and says so when a model has none."""
    from appkit import cards

    assert cards.views_text({"name": "m"}) is None
    block = {"views": 8, "auc_plain": 0.7934, "auc_views": 0.8086, "difference": 0.0152,
             "difference_ci": [0.0095, 0.0217]}
    assert cards.views_text({"test_time_augmentation": block}) == (
        "AUC 0.809 against 0.793 plain (+0.015, 95 % interval +0.009 to +0.022), out of fold")
    no_ci = {**block, "difference_ci": None}
    assert cards.views_text({"test_time_augmentation": no_ci}) == "AUC 0.809 against 0.793 plain (+0.015), out of fold"
    assert cards.views_text({"test_time_augmentation": {"auc_plain": float("nan"), "auc_views": 0.8}}) is None


def test_review_toggle_help_quotes_the_chosen_models_figures(app_env, ensemble_dir):  # noqa: F811
    from mammo_core.store import registry
    from mammo_core.store.card import edit_card

    from .test_app import no_exception, start

    app_env(ensemble_dir.parent)
    registry.set_active_model(ensemble_dir.name, ensemble_dir.parent)
    at = start("review")
    no_exception(at)
    assert "Not measured for this model." in at.toggle(key="review_tta").help
    edit_card(ensemble_dir, lambda card: card.update(test_time_augmentation={
        "views": 8, "auc_plain": 0.70, "auc_views": 0.72, "difference": 0.02, "difference_ci": [0.01, 0.03]}))
    try:
        at = start("review")
        no_exception(at)
        assert "For this model: AUC 0.720 against 0.700 plain (+0.020, 95 % interval +0.010 to +0.030)" in (
            at.toggle(key="review_tta").help)
    finally:
        edit_card(ensemble_dir, lambda card: card.pop("test_time_augmentation"))
