#!/usr/bin/env bash
# Round 4 (session of 2026-12-01): recipe I (B's recipe with the model input resized x2 inside the trunk) beat the
# shipped recipe D on the validation parts (0.826 against 0.802), which the rule declared in
# experiments/select_recipe.py makes the new shipped recipe. Its test folds are scored here, once:
# 1. the ensemble: 5-fold CV grouped by source image, members shipped; 2. the same recipe grouped by patient.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAMMO_DATA_DIR=${MAMMO_DATA_DIR:-../shared/data/augmented-inbreast}
PY=${PY:-.venv/bin/python}
recipe="--recipe learning_rate=0.0003 --recipe input_scale=2.0 --recipe refit_parts=0"  # every field that Recipe()'s defaults have changed since
name=efficientnet-lite0-ft-x2-ensemble
$PY -m mammo_core train --arch efficientnet-lite0-ft --name $name --group-by source --preprocessing breast-crop-v1 $recipe
$PY -m mammo_core cv --arch efficientnet-lite0-ft --group-by patient --preprocessing breast-crop-v1 $recipe --out cv-results/$name-patient --into-card $name
echo FINAL-DONE
