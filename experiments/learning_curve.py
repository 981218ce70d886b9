"""Learning curve of recipe I: out-of-fold AUC when each fold trains on a fraction of its training patients.

    MAMMO_DATA_DIR=../shared/data/augmented-inbreast python experiments/learning_curve.py [--group-by patient|source]
        [--fractions 0.25,0.5,0.75,1] [--repeats 2]

Issue 12 asks for pooled out-of-fold AUC >= 0.90 by source image and >= 0.80 by patient; seven rounds of recipes
all land at 0.73-0.79 / 0.57-0.66. This measures whether the number of training groups is what holds the figure
back: the same folds, the same test folds and the same validation parts (so the epoch choice and the temperature
are made on as many groups at every fraction), and only the fold's *training part* thinned to a fraction of its
groups (patients with --group-by patient, source images with source), stratified by label (a patient counts as
malignant when any of its images is), with a seed per (fraction, repeat, fold). Fraction 1 is recipe I's run
exactly (same seeds), so it reproduces I's card figure. Nothing is selected from these runs: no recipe, no
fraction; it is a measurement, declared here before it ran. Rows go to experiments/learning_curve.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd

from mammo_core.data.datasets import patient_map_for, scan_dataset
from mammo_core.training.cv import CVConfig, run_folds
from mammo_core.training.cv_trainers import make_trainer
from mammo_core.training.finetune import Recipe

OUT = Path(__file__).with_name("learning_curve.jsonl")
#: recipe I (docs/EXPERIMENTS.md, fourth round): the recipe of every member whose figures are compared here
RECIPE_I = Recipe(learning_rate=3e-4, input_scale=2.0, refit_parts=0)


def thin(train: pd.DataFrame, unit: str, fraction: float, seed: int) -> pd.DataFrame:
    """Keep `fraction` of the training part's groups (`unit`: "patient" or "group"), stratified by label."""
    if fraction >= 1:
        return train
    by_group = train.groupby(unit)["label"].max()
    rng = np.random.default_rng(seed)
    kept = []
    for _, members in by_group.groupby(by_group):
        names = members.index.to_numpy()
        kept.extend(rng.permutation(names)[:max(1, math.ceil(fraction * len(names)))])
    return train[train[unit].isin(kept)]


class Thinned:
    """A per-fold trainer that trains on a thinned training part; validation part and test fold untouched."""

    refit_parts = 0
    members_per_fold = 1

    def __init__(self, trainer, unit: str, fraction: float, repeat: int) -> None:
        self.trainer, self.unit, self.fraction, self.repeat = trainer, unit, fraction, repeat
        self.kept: list[tuple[int, int]] = []

    def __call__(self, train, val, test, seed):
        train = thin(train, self.unit, self.fraction, seed=10_000 * self.repeat + 100 * round(100 * self.fraction) + seed)
        self.kept.append((int(train[self.unit].nunique()), int(train["group"].nunique())))
        return self.trainer(train, val, test, seed=seed)

    def budget(self):
        return self.trainer.budget()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-by", default="patient", choices=("patient", "source"))
    ap.add_argument("--fractions", default="0.25,0.5,0.75,1")
    ap.add_argument("--repeats", type=int, default=2, help="thinnings per fraction below 1 (fraction 1 runs once)")
    args = ap.parse_args()
    data = os.environ.get("MAMMO_DATA_DIR", "../shared/data/augmented-inbreast")
    config = CVConfig(data_dir=data, architecture="efficientnet-lite0-ft", k=5, group_by=args.group_by,
                      patient_map=patient_map_for(Path(data), args.group_by, None), preprocessing="breast-crop-v1", recipe=RECIPE_I)
    config.validate()
    frame = scan_dataset(config.data_dir, patient_map=config.patient_map).reset_index(drop=True)
    trainer = make_trainer(frame, config, print)
    unit = "patient" if args.group_by == "patient" else "group"
    for fraction in sorted(float(f) for f in args.fractions.split(",")):
        for repeat in range(1 if fraction >= 1 else args.repeats):
            t0 = time.time()
            thinned = Thinned(trainer, unit, fraction, repeat)
            res, oof = run_folds(config, frame, thinned, log=print)
            pooled = res["pooled"]
            row = {"group_by": args.group_by, "fraction": fraction, "repeat": repeat,
                   "train_patients_per_fold": [k[0] for k in thinned.kept],
                   "train_source_images_per_fold": [k[1] for k in thinned.kept],
                   "auc": round(pooled["auc"], 4), "auc_ci": [round(x, 4) for x in pooled["auc_ci"]],
                   "auc_uncalibrated": round(pooled["auc_uncalibrated"], 4),
                   "fold_auc": [round(r["auc"], 4) for r in res["folds"]],
                   "best_epochs": [r.get("best_epoch") for r in res["folds"]],
                   "minutes": round((time.time() - t0) / 60, 1), "recipe": res["training"]["recipe"]}
            print("RESULT", json.dumps(row), flush=True)
            with OUT.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            Path("cv-results").mkdir(exist_ok=True)
            oof.to_csv(Path("cv-results") / f"learning-curve-{args.group_by}-{fraction:g}-{repeat}.csv", index=False)
    trainer.members.clear()


if __name__ == "__main__":
    main()
