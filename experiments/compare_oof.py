"""Paired comparison of two recipes' out-of-fold predictions on the same folds (same images, same groups).

Usage: python experiments/compare_oof.py A.csv B.csv [--unit source|patient] [--patients PATIENTS.csv]
A and B are out-of-fold tables (a model directory's test_predictions.csv or a cv run's oof_predictions.csv)
with columns path, group, label, probability. Rows are matched by the image's path below the dataset folder.
Prints each AUC with its 95 % cluster-bootstrap interval and the paired difference AUC(B) - AUC(A) with its
interval, resampling source images or patients (mammo_core.evaluation.bootstrap).
"""
from __future__ import annotations

import argparse
import json
import os

import pandas as pd

from mammo_core.data.datasets import load_patient_map
from mammo_core.evaluation.bootstrap import cluster_bootstrap, paired_auc_difference
from mammo_core.evaluation.metrics import auc


def _relative(path: str) -> str:
    parts = os.path.normpath(path).split(os.sep)
    return os.sep.join(parts[-3:])  # split/class/file: the same image whatever the dataset's folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--unit", choices=("source", "patient"), default="source")
    parser.add_argument("--patients", default=os.path.join(os.environ.get("MAMMO_DATA_DIR", "../shared/data/augmented-inbreast"), "patients.csv"))
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()
    a, b = (pd.read_csv(p).assign(key=lambda t: t["path"].map(_relative)).set_index("key") for p in (args.a, args.b))
    both = a.join(b[["probability"]].rename(columns={"probability": "probability_b"}), how="inner")
    if len(both) != len(a) or len(both) != len(b):
        raise SystemExit(f"the tables do not hold the same images ({len(a)}, {len(b)}, {len(both)} in common)")
    groups = both["group"].astype(str)
    if args.unit == "patient":
        groups = groups.map(load_patient_map(args.patients))
    y = both["label"].to_numpy()
    out = {"images": len(both), "unit": args.unit, "groups": int(groups.nunique())}
    for arm, column in (("a", "probability"), ("b", "probability_b")):
        out[arm] = {"table": getattr(args, arm), "auc": auc(y, both[column]),
                    "auc_ci": cluster_bootstrap(y, both[column], groups, n_boot=args.n_boot)["auc"]}
    out["difference_b_minus_a"] = out["b"]["auc"] - out["a"]["auc"]
    out["difference_ci"] = paired_auc_difference(y, both["probability"], both["probability_b"], groups, n_boot=args.n_boot)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
