"""Train the fine-tuned ensemble (`efficientnet-lite0-ft`) into a model directory.

Training is grouped k-fold cross-validation with `finetune.fit_member` (via `training.cv.run_folds`): each fold's
member is trained on the other folds (minus a validation part that picks its epoch and temperature; or, with a
nested refit, on all of them, for an epoch count and with a temperature that inner models found) and
scored on its own fold, so the out-of-fold predictions are honest estimates of the recipe, and the k
members together are the shipped model (scored by `inference.ensemble.EnsembleScorer`). An
out-of-distribution check is fitted on the members' shared trunk features.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from mammo_core.config import DEFAULT_THRESHOLD
from mammo_core.data.datasets import portable_paths, scan_dataset
from mammo_core.evaluation.calibration import UNCALIBRATED_COLUMN, brier, operating_points
from mammo_core.evaluation.metrics import compute_metrics
from mammo_core.store.card import card_head
from mammo_core.store.compact import STORAGE_NOTE, save_compact
from mammo_core.store.files import sha256_file

#: Fraction of the held-out fold's images that the out-of-distribution threshold lets through.
OOD_PASS_RATE = 0.99
OOF_TEXT = "out-of-fold predictions (each image scored by the member that never trained on its group)"
INTERVAL_TEXT = ("range of the ensemble members' calibrated probabilities (each member trained on different "
                 "source images): how much the members disagree, not a confidence interval")


def train_ensemble_into(config: Any, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Cross-validate the fine-tuning recipe and write the ensemble of its fold members into `out`
    (model.keras, test_predictions.csv = out-of-fold predictions, history.csv); returns the card."""
    from mammo_core.store.registry import HISTORY_FILE, MODEL_FILE, PREDICTIONS_FILE
    from mammo_core.training import finetune
    from mammo_core.training.cv import CVConfig, run_folds
    from mammo_core.training.cv_trainers import FineTuneTrainer

    data_root = Path(config.data_dir)
    frame = scan_dataset(data_root, patient_map=config.patient_map).reset_index(drop=True)
    recipe = finetune.Recipe(**{**finetune.recipe_dict(finetune.Recipe()), **(config.recipe or {})})
    if recipe.cut == "stem":
        # Checked before any training: the ensemble's Grad-CAM and out-of-distribution check both read the
        # shared trunk's output, and full fine-tuning has no shared trunk (its trunk is the image itself).
        raise ValueError(f"cut={recipe.cut} (full fine-tuning) can be cross-validated (python -m mammo_core cv) but "
                         "not yet shipped as an ensemble: choose cut=block5a, block6a or block7a")
    cv_config = CVConfig(data_dir=str(data_root), architecture=config.architecture, k=config.folds,
                         group_by=config.group_by, patient_map=config.patient_map, seed=config.seed,
                         preprocessing=config.input_pipeline, recipe=recipe)
    cv_config.validate()
    trainer = FineTuneTrainer(frame, cv_config, log)
    results, oof = run_folds(cv_config, frame, trainer, log=log)
    ood = _fit_ood(trainer, oof["fold"].to_numpy() == 0)

    model = finetune.build_ensemble(trainer.members, recipe.cut, ood["whiten"], recipe.input_scale, recipe.backbone)
    save_compact(model, out / MODEL_FILE)  # kernels in float16: half the file (store.compact)
    table = _oof_table(oof, data_root)
    table.to_csv(out / PREDICTIONS_FILE, index=False)
    pd.DataFrame(results["folds"]).to_csv(out / HISTORY_FILE, index=False)
    card = _card(config, model, frame, recipe, trainer, results, table, ood)
    card = portable_paths(card, data_root)
    card["model_sha256"] = sha256_file(out / MODEL_FILE)
    m = card["metrics"]["test"]
    log(f"out-of-fold: AUC {m['auc']:.4f}, accuracy {m['accuracy']:.4f}; OOD threshold {ood['threshold']:.1f}")
    return card


def _fit_ood(trainer: Any, held_out: np.ndarray) -> dict[str, Any]:
    """Out-of-distribution check: a Gaussian of the pooled trunk features of the folds other than the
    held-out one, and the distance threshold that `OOD_PASS_RATE` of the held-out images pass."""
    from mammo_core.training import finetune

    pooled = finetune.pooled_activations(trainer.activations)
    whiten = finetune.fit_ood(pooled[~held_out])
    distances = np.sum(np.square(pooled[held_out] @ whiten[0] + whiten[1]), axis=1)
    return {"whiten": whiten, "threshold": float(np.quantile(distances, OOD_PASS_RATE)),
            "channels": int(pooled.shape[1]), "held_out": held_out}


def _oof_table(oof: pd.DataFrame, data_root: Path) -> pd.DataFrame:
    """The out-of-fold predictions as the model directory's test_predictions.csv (paths relative to the dataset)."""
    return pd.DataFrame({"path": [os.path.relpath(p, data_root) for p in oof["path"]], "group": oof["group"],
                         "patient": oof["patient"], "label": oof["label"], "fold": oof["fold"],
                         "probability": oof["probability"],
                         UNCALIBRATED_COLUMN: oof["probability_uncalibrated"]})


def _card(config: Any, model: Any, frame: pd.DataFrame, recipe: Any, trainer: Any, results: dict[str, Any],
          table: pd.DataFrame, ood: dict[str, Any]) -> dict[str, Any]:
    """The ensemble's model card (without `model_sha256`): cross-validation, ensemble, OOD and calibration facts."""
    from mammo_core.training import finetune

    # in member order: fold by fold, a bagged fold's members in seed order (`training.cv.run_folds`)
    temperatures = [float(t) for row in results["folds"] for t in row.get("temperatures", [row.get("temperature")])]
    bag = recipe.members_per_fold
    held_out = ood["held_out"]
    metrics = compute_metrics(table["label"], table["probability"], threshold=DEFAULT_THRESHOLD)
    points = operating_points(table["label"], table["probability"])
    for point in points:
        point["computed_on"] = OOF_TEXT
    unit = "source image" if config.group_by == "source" else "patient"
    return {
        **card_head(config, model, frame),
        "split": {"protocol": "cross-validation", "group_by": config.group_by, "seed": config.seed, "k": config.folds},
        "training": {**results["training"], "seed": config.seed},
        "ensemble": {"members": len(trainer.members), "members_per_fold": bag, "temperatures": temperatures,
                     "probability": "mean of the members' temperature-calibrated probabilities",
                     "interval": INTERVAL_TEXT + (f"; here {bag} members per fold, so members of one fold share its "
                                                  "training source images and differ in their seed" if bag > 1 else ""), "gradcam": "Grad-CAM of the mean of the members' logits, on the "
                     f"shared trunk output ({'x'.join(str(d) for d in trainer.activations.shape[1:3])})"},
        "ood": {"feature": f"global average of the trunk output ({finetune.trunk_layer(recipe.cut, recipe.backbone)}, "
                           f"{ood['channels']} channels)",
                "distance": "squared Mahalanobis distance, Ledoit-Wolf covariance (model output 'ood_whiten')",
                "fitted_on": f"{int((~held_out).sum())} images of folds 1-{config.folds - 1}",
                "threshold": ood["threshold"],
                "threshold_rule": f"{OOD_PASS_RATE:.0%} of the {int(held_out.sum())} images of held-out fold 0 pass"},
        "cam_layer": finetune.TRUNK_NAME,
        "storage": {"weights": STORAGE_NOTE},
        "threshold": DEFAULT_THRESHOLD,
        "calibration": {"method": "temperature per member", "temperatures": temperatures,
                        "computed_on": ("each member's validation part (25 % of its training folds' groups)"
                                        if not recipe.refit_parts else
                                        f"the pooled validation parts of each member's {recipe.refit_parts} inner "
                                        "model(s) (nested refit: the member itself trained on all its training folds)"),
                        "formula": "p_i = sigmoid(logit_i / temperature_i); p = mean(p_i)",
                        "brier_oof_before": brier(table["label"], table[UNCALIBRATED_COLUMN]),
                        "brier_oof_after": brier(table["label"], table["probability"])},
        "operating_points": points,
        "evaluation": {"note": (f"Out-of-fold: every image was scored by the ensemble member that never saw its "
                                f"{unit}; the shipped ensemble averages all members, so these numbers describe "
                                f"the recipe, one member at a time." if bag == 1 else
                                f"Out-of-fold: every image was scored by the {bag} ensemble members (one fold's, "
                                f"differing in their seed) that never saw its {unit}, their calibrated "
                                f"probabilities averaged; the shipped ensemble averages all "
                                f"{len(trainer.members)} members, so these numbers describe the recipe, "
                                f"{bag} members at a time.")},
        "metrics": {"test": metrics},
        "cross_validation" if config.group_by == "source" else "cross_validation_patient":
            {k: v for k, v in results.items() if k != "config"},
        "config": {k: v for k, v in vars(config).items()},
    }
