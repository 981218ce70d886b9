"""Measure what the float16-stored kernels of a freshly trained ensemble change, and record it in its card.

`train` saves an ensemble with its kernels stored in float16 (store.compact) and writes the out-of-fold table
from the float32 members it trained. This scores every image of that table with the saved file, each by the
member(s) that never trained on its group, and compares with the table (`python experiments/halve_ensemble.py`
did the same for the first ensemble, which was saved in float32 first). With --write the figures go to the
card's `storage.measured` (the real-data test bounds its rescoring check with them).
Usage: MAMMO_DATA_DIR=... python experiments/rescore_oof.py weights/<ensemble> [--write]
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mammo_core.data.pipeline import load_images  # noqa: E402
from mammo_core.evaluation.metrics import auc  # noqa: E402
from mammo_core.inference.ensemble import EnsembleScorer, out_of_fold  # noqa: E402
from mammo_core.store.card import edit_card  # noqa: E402
from mammo_core.store.compact import STORAGE_NOTE  # noqa: E402
from mammo_core.store.registry import load_model  # noqa: E402


def main(model_dir: Path, write: bool) -> int:
    data = Path(os.environ["MAMMO_DATA_DIR"])
    model, card = load_model(model_dir)
    table = pd.read_csv(model_dir / "test_predictions.csv")
    scorer = EnsembleScorer(model, card)
    members = []
    for start in range(0, len(table), 512):
        images = load_images([str(data / p) for p in table["path"][start:start + 512]],
                             preprocessing=card["input_pipeline"])
        members += [scorer(images[i:i + 64], with_cam=False)[0] for i in range(0, len(images), 64)]
    members = np.concatenate(members)
    bag = int((card.get("ensemble") or {}).get("members_per_fold", 1))
    oof = out_of_fold(members, table["fold"].to_numpy(), bag)
    change = np.abs(oof - table["probability"].to_numpy())
    y = table["label"].to_numpy()
    result = {"images": len(table), "compared_with": "the float32 members' out-of-fold probabilities in "
              "test_predictions.csv, each image by the member of its fold" + (
              f" (the mean of its {bag} members)" if bag > 1 else ""),
              "max_abs_change_member_probability": float(change.max()),
              "p99_abs_change_member_probability": float(np.quantile(change, 0.99)),
              "mean_abs_change_member_probability": float(change.mean()),
              "decisions_changed_at_0.5": int(np.sum((oof >= 0.5) != (table["probability"].to_numpy() >= 0.5))),
              "oof_auc_float32": auc(y, table["probability"]), "oof_auc_float16": auc(y, oof)}
    print(json.dumps(result, indent=1))
    if write:
        def update(c):
            c["storage"] = {"weights": STORAGE_NOTE, "measured": result,
                            "command": f"python experiments/rescore_oof.py {model_dir} --write"}
        edit_card(model_dir, update)
        print("stored in", model_dir / "card.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), "--write" in sys.argv[2:]))
