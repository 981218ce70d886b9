#!/usr/bin/env bash
# Round 5 (session of 2026-12-01, morning): recipe J (I's recipe with the model input resized x3 inside the
# trunk). The rule declared in experiments/select_recipe.py before J ran: it replaces I as the recipe of record
# only if its mean validation AUC beats I's 0.826; then its test folds are scored here, once:
# 1. the ensemble: 5-fold CV grouped by source image, members shipped; 2. the same recipe grouped by patient.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAMMO_DATA_DIR=${MAMMO_DATA_DIR:-../shared/data/augmented-inbreast}
PY=${PY:-.venv/bin/python}
recipe="--recipe learning_rate=0.0003 --recipe input_scale=3.0 --recipe refit_parts=0"
name=efficientnet-lite0-ft-x3-ensemble
$PY -m mammo_core train --arch efficientnet-lite0-ft --name $name --group-by source --preprocessing breast-crop-v1 $recipe
$PY -m mammo_core cv --arch efficientnet-lite0-ft --group-by patient --preprocessing breast-crop-v1 $recipe --out cv-results/$name-patient --into-card $name
echo FINAL-DONE
