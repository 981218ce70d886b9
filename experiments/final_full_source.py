"""H's test folds grouped by source image, as `python -m mammo_core cv` runs them (same config, same folds), and
the five fold members kept as .keras files beside the results, so that an ensemble can later be assembled from
exactly these members without training again (`train` does not yet ship full fine-tuning).

    python experiments/final_full_source.py [OUT]   (default cv-results/efficientnet-lite0-ft-full-source)
"""
import os
import sys
from pathlib import Path

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
from mammo_core.data.datasets import scan_dataset
from mammo_core.training.cv import CVConfig, run_folds, write_results
from mammo_core.training.cv_trainers import FineTuneTrainer
from mammo_core.training.finetune import Recipe

DATA = os.environ.get("MAMMO_DATA_DIR", "../shared/data/augmented-inbreast")
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "cv-results/efficientnet-lite0-ft-full-source")
H = Recipe(cut="stem", learning_rate=3e-4, copies_per_source=32, input_scale=1.0, refit_parts=0)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


config = CVConfig(data_dir=DATA, architecture="efficientnet-lite0-ft", k=5, group_by="source",
                  preprocessing="breast-crop-v1", recipe=H)
config.validate()
frame = scan_dataset(config.data_dir, patient_map=config.patient_map).reset_index(drop=True)
trainer = FineTuneTrainer(frame, config, log)
results, oof = run_folds(config, frame, trainer, log=log)
json_path, csv_path = write_results(results, oof, OUT)
for i, member in enumerate(trainer.members):
    member.save(OUT / f"member_{i}.keras")
pooled = results["pooled"]
print(f"pooled AUC {pooled['auc']:.3f} [{pooled['auc_ci'][0]:.3f}, {pooled['auc_ci'][1]:.3f}]; {json_path}")
