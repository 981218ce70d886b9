#!/usr/bin/env bash
# Round 6 (session of 2026-12-01, second): recipe K = I's recipe with a nested refit (`Recipe.refit_parts=2`).
# Per fold, two inner models (early-stopped on inner folds 0 and 1 of the training side: exactly I's two recorded
# selection parts, same splits and seeds) give the epoch count (median of their best epochs, rounded up) and,
# pooled, the validation logits for the temperature; the member is then trained on the WHOLE training side
# (a third more source images than I's members) for that many epochs.
# No validation figure can rank K against I (its member has no held-out part; its inner models are I's), so the
# rule was fixed here before anything ran: K replaces I as the default unless its paired out-of-fold difference to
# I grouped by source image (experiments/compare_oof.py) has a 95 % CI entirely below zero. Its speed is I's (same
# network, same five members). The test folds are scored once, here:
# 1. the ensemble: 5-fold CV grouped by source image, members shipped; 2. the same recipe grouped by patient;
# 3. the paired comparisons with I on the same folds.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAMMO_DATA_DIR=${MAMMO_DATA_DIR:-../shared/data/augmented-inbreast}
PY=${PY:-.venv/bin/python}
recipe="--recipe learning_rate=0.0003 --recipe input_scale=2.0 --recipe refit_parts=2"  # I's fields named; refit added
name=efficientnet-lite0-ft-x2-refit-ensemble
$PY -m mammo_core train --arch efficientnet-lite0-ft --name $name --group-by source --preprocessing breast-crop-v1 $recipe
$PY experiments/compare_oof.py weights/$name/test_predictions.csv weights/efficientnet-lite0-ft-x2-ensemble/test_predictions.csv
$PY -m mammo_core cv --arch efficientnet-lite0-ft --group-by patient --preprocessing breast-crop-v1 $recipe --out cv-results/$name-patient --into-card $name
$PY experiments/compare_oof.py cv-results/$name-patient/oof_predictions.csv cv-results/efficientnet-lite0-ft-x2-ensemble-patient/oof_predictions.csv --unit patient
echo FINAL-DONE
