#!/usr/bin/env bash
# The runs behind docs/EXPERIMENTS.md, in order, after experiments/select_recipe.py:
# 1. the chosen recipe = highest mean validation AUC in experiments/selection.jsonl (test folds never scored there);
# 2. frozen efficientnet-lite0-mid CV with the new preprocessing (before/after on the same folds);
# 3. the ensemble: 5-fold CV grouped by source image, members shipped; 4. the same recipe grouped by patient.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAMMO_DATA_DIR=${MAMMO_DATA_DIR:-../shared/data/augmented-inbreast}
PY=.venv/bin/python
best=$($PY - <<'PY'
import json
rows=[json.loads(l) for l in open("experiments/selection.jsonl")]
best=max(rows, key=lambda r: r["mean_validation_auc"])
# every field named: Recipe()'s defaults have changed since (rows from before input_scale ran at 1)
from mammo_core.training.finetune import Recipe, recipe_dict
args=[f"--recipe {k}={v}" for k,v in recipe_dict(Recipe.from_card(best["recipe"])).items()]
print(best["name"], best["preprocessing"], " ".join(args))
PY
)
read -r name prep recipe <<<"$best"
echo "chosen: $name ($prep) $recipe"
for g in source patient; do
  $PY -m mammo_core cv --arch efficientnet-lite0-mid --group-by $g --preprocessing $prep --out cv-results/efficientnet-lite0-mid-$g-$prep
done
$PY -m mammo_core train --arch efficientnet-lite0-ft --name efficientnet-lite0-ft-ensemble --group-by source --preprocessing $prep $recipe
$PY -m mammo_core cv --arch efficientnet-lite0-ft --group-by patient --preprocessing $prep $recipe --out cv-results/efficientnet-lite0-ft-patient --into-card efficientnet-lite0-ft-ensemble
echo FINAL-DONE
