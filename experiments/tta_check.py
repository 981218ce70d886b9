"""Does test-time augmentation help? (python experiments/tta_check.py) Recipe D (the shipped recipe) is fitted
per fold exactly as in `select_recipe.py` (inner folds only, test folds never scored); each member's
validation copies are then scored on the flipped and rotated inputs too, and the mean validation AUC of the
member logits averaged over each set of views is compared with the plain view. Results go to
experiments/tta.jsonl. The epoch kept per member was chosen on the plain view of the same validation rows,
so the plain view is favoured slightly."""
import json
import os
import time

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
from scipy.special import expit

from mammo_core.data.datasets import scan_dataset
from mammo_core.data.pipeline import load_images
from mammo_core.evaluation.metrics import auc as auc_score
from mammo_core.training import finetune
from mammo_core.training.cv import CVConfig, run_folds
from mammo_core.training.cv_trainers import FineTuneTrainer
from mammo_core.training.finetune import Recipe

DATA = os.environ.get("MAMMO_DATA_DIR", "../shared/data/augmented-inbreast")
PREP = "breast-crop-v1"
RECIPE = Recipe(learning_rate=3e-4, copies_per_source=32, input_scale=1.0, refit_parts=0)  # D, frozen on 2026-11-30 before this check
VIEWS = {  # name -> function on (N, H, W) arrays; the chest wall stays left unless the view flips it
    "plain": lambda x: x,
    "vflip": lambda x: x[:, ::-1, :],
    "hflip": lambda x: x[:, :, ::-1],
    "hvflip": lambda x: x[:, ::-1, ::-1],
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "transpose": lambda x: np.swapaxes(x, 1, 2),
    "antitranspose": lambda x: np.rot90(np.swapaxes(x, 1, 2), 2, axes=(1, 2)),
}
SETS = {"plain": ["plain"], "plain+vflip": ["plain", "vflip"], "4 flips": ["plain", "vflip", "hflip", "hvflip"],
        "8 dihedral": list(VIEWS)}
rows_out = []


class TTATrainer(FineTuneTrainer):
    def __init__(self, frame, config, log):
        super().__init__(frame, config, log)
        self.trunk = finetune.trunk_function(finetune.build_parts(self.recipe.cut)[0])

    def __call__(self, train, val, test, seed):
        out = super().__call__(train, val, test, seed)
        member = self.members[-1]
        vf = out["val_frame"]
        images = load_images(vf["path"].tolist(), preprocessing=PREP)
        logits = {}
        for name, view in VIEWS.items():
            x = np.ascontiguousarray(view(images)).astype(np.float32)[..., None] / 255.0
            acts = np.concatenate([self.trunk(x[i:i + 64]).numpy() for i in range(0, len(x), 64)])
            logits[name] = finetune.predict_logits(member, acts.astype(np.float16).astype(np.float32))
        y = vf["label"].to_numpy()
        row = {"fold": len(self.members) - 1, "n_val": int(len(y)),
               **{k: round(auc_score(y, expit(np.mean([logits[v] for v in vs], axis=0).astype(np.float64))), 4)
                  for k, vs in SETS.items()},
               **{f"view {k}": round(auc_score(y, expit(v.astype(np.float64))), 4) for k, v in logits.items()}}
        print("FOLD", json.dumps(row), flush=True)
        rows_out.append(row)
        return out


t0 = time.time()
config = CVConfig(data_dir=DATA, architecture="efficientnet-lite0-ft", k=5, group_by="source",
                  preprocessing=PREP, recipe=RECIPE, inner_only=True)
config.validate()
frame = scan_dataset(config.data_dir, patient_map=config.patient_map).reset_index(drop=True)
run_folds(config, frame, TTATrainer(frame, config, print))
summary = {"recipe": "D", "mean_validation_auc": {k: round(float(np.mean([r[k] for r in rows_out])), 4) for k in SETS},
           "per_view": {k: round(float(np.mean([r[f"view {k}"] for r in rows_out])), 4) for k in VIEWS},
           "folds": rows_out, "minutes": round((time.time() - t0) / 60, 1)}
print("RESULT", json.dumps(summary), flush=True)
with open("experiments/tta.jsonl", "a") as fh:
    fh.write(json.dumps(summary) + "\n")
