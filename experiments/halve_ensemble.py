"""Store the shipped ensemble's kernels in float16 (model.keras 58 MB -> 30 MB) and measure what it changes.

Scores every image of the dataset's out-of-fold table with the float32 file and with the float16-stored
copy (same scorer, no Grad-CAM), each image by the member that never trained on its group (as in the card's
out-of-fold metrics) and by the whole ensemble, and reports the largest probability changes and both AUCs.
With --write it replaces model.keras, the card's sha256 and `storage`, and weights/MANIFEST.json.
Usage: MAMMO_DATA_DIR=... python experiments/halve_ensemble.py weights/efficientnet-lite0-ft-ensemble [--write]
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mammo_core.data.pipeline import load_images  # noqa: E402
from mammo_core.evaluation.metrics import auc  # noqa: E402
from mammo_core.inference.ensemble import EnsembleScorer  # noqa: E402
from mammo_core.store.card import edit_card  # noqa: E402
from mammo_core.store.compact import STORAGE_NOTE, compact_keras_file  # noqa: E402
from mammo_core.store.files import atomic_write_text, sha256_file  # noqa: E402
from mammo_core.store.registry import MODEL_FILE, load_model  # noqa: E402


def score(model, card, images):
    scorer = EnsembleScorer(model, card)
    out = [scorer(images[i:i + 64], with_cam=False)[0] for i in range(0, len(images), 64)]
    return np.concatenate(out)


def main(model_dir: Path, write: bool) -> int:
    data = Path(os.environ["MAMMO_DATA_DIR"])
    model32, card = load_model(model_dir)
    table = pd.read_csv(model_dir / "test_predictions.csv")
    images = load_images([str(data / p) for p in table["path"]], preprocessing=card["input_pipeline"])
    with tempfile.TemporaryDirectory() as tmp:
        half = Path(tmp) / MODEL_FILE
        counts = compact_keras_file(model_dir / MODEL_FILE, half)
        import keras

        model16 = keras.saving.load_model(half, compile=False, safe_mode=True)
        p32, p16 = score(model32, card, images), score(model16, card, images)
        rows = np.arange(len(table))
        folds = table["fold"].to_numpy()
        y = table["label"].to_numpy()
        oof32, oof16 = p32[rows, folds], p16[rows, folds]
        result = {
            "images": len(table), "parameters_by_stored_dtype": counts,
            "bytes_float32": (model_dir / MODEL_FILE).stat().st_size, "bytes_float16": half.stat().st_size,
            "max_abs_change_member_probability": float(np.max(np.abs(p16 - p32))),
            "max_abs_change_ensemble_probability": float(np.max(np.abs(p16.mean(1) - p32.mean(1)))),
            "p99_abs_change_ensemble_probability": float(np.quantile(np.abs(p16.mean(1) - p32.mean(1)), 0.99)),
            "mean_abs_change_ensemble_probability": float(np.mean(np.abs(p16.mean(1) - p32.mean(1)))),
            "decisions_changed_at_0.5": int(np.sum((p16.mean(1) >= 0.5) != (p32.mean(1) >= 0.5))),
            "oof_auc_float32_rescored": auc(y, oof32), "oof_auc_float16": auc(y, oof16),
            "oof_auc_in_card": card["metrics"]["test"]["auc"],
            "max_abs_oof_rescored_vs_csv": float(np.max(np.abs(oof32 - table["probability"].to_numpy()))),
        }
        print(json.dumps(result, indent=1))
        if write:
            shutil.copyfile(half, model_dir / MODEL_FILE)
            sha = sha256_file(model_dir / MODEL_FILE)

            def change(c):
                c["model_sha256"] = sha
                c["storage"] = {"weights": STORAGE_NOTE, "measured": {k: result[k] for k in (
                    "images", "max_abs_change_member_probability", "max_abs_change_ensemble_probability",
                    "p99_abs_change_ensemble_probability", "mean_abs_change_ensemble_probability",
                    "decisions_changed_at_0.5",
                    "oof_auc_float32_rescored", "oof_auc_float16")},
                    "command": "python experiments/halve_ensemble.py " + str(model_dir) + " --write"}
            edit_card(model_dir, change)
            manifest_path = model_dir.parent / "MANIFEST.json"
            manifest = json.loads(manifest_path.read_text())
            manifest["models"][model_dir.name]["model_sha256"] = sha
            atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
            print("wrote", model_dir / MODEL_FILE, sha)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), "--write" in sys.argv[2:]))
