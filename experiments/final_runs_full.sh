#!/usr/bin/env bash
# Third round (2026-11-30 evening): H (full fine-tuning, lr 3e-4, 32 copies) had the highest mean validation AUC
# in experiments/selection.jsonl (0.843; rule fixed before G and H ran: the highest mean validation AUC wins), so
# only now are its test folds scored, on the same folds as every other row of docs/EXPERIMENTS.md. `train` refuses
# cut=stem as a shipped ensemble (no shared trunk for Grad-CAM and the OOD check), so these are CV runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAMMO_DATA_DIR=${MAMMO_DATA_DIR:-../shared/data/augmented-inbreast}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}  # the experiments import mammo_core from this checkout
PY=${PY:-.venv/bin/python}
recipe="--recipe cut=stem --recipe learning_rate=0.0003 --recipe copies_per_source=32 --recipe input_scale=1.0 --recipe refit_parts=0"
# by source image: the same run as `cv --group-by source`, keeping the five members for a later ensemble
$PY experiments/final_full_source.py cv-results/efficientnet-lite0-ft-full-source
$PY -m mammo_core cv --arch efficientnet-lite0-ft --group-by patient --preprocessing breast-crop-v1 $recipe \
  --out cv-results/efficientnet-lite0-ft-full-patient
echo FINAL-FULL-DONE
