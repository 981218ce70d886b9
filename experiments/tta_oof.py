"""Out-of-fold AUC of the shipped ensemble with and without test-time augmentation (issue 12).

Every image of the model's test_predictions.csv is scored by the ensemble scorer on the plain view and with
`tta="dihedral8"` (member logits averaged over the 8 flips and 90° rotations, then each member's temperature),
and each image keeps the probability of the member whose index is its `fold` (the member that never trained on
its source image), as the card's cross-validated metrics do. Reported for both: the AUC pooled over images, with
95 % cluster-bootstrap intervals resampling source images (the card's "5-fold CV grouped by source image") and
resampling patients (the dataset's patients.csv), and the paired difference (8 views - plain) with the same
resampling. The members were trained on folds grouped by source image, not by patient: the patient intervals
widen for images of one patient not being independent, but they are not the card's patient-grouped CV (a
different set of models). Images are decoded and scored 64 at a time.

    MAMMO_DATA_DIR=... python experiments/tta_oof.py                 # all rows -> experiments/tta_oof.json
    MAMMO_DATA_DIR=... python experiments/tta_oof.py --limit 64      # a random 64 rows, printed only (a check)
    python experiments/tta_oof.py --model weights/NAME --card-from RESULT.json   # the figures into NAME's card

With `--into-card` (after a full run) or `--card-from` (a saved full run's JSON, same model file), the
model card gains a `test_time_augmentation` block, which the app's 8-view toggle quotes for that model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mammo_core.data.datasets import default_patient_map, load_patient_map  # noqa: E402
from mammo_core.data.pipeline import load_images  # noqa: E402
from mammo_core.evaluation.bootstrap import cluster_bootstrap, paired_auc_difference, point_metrics  # noqa: E402
from mammo_core.evaluation.metrics import auc  # noqa: E402
from mammo_core.inference.ensemble import DIHEDRAL8, EnsembleScorer, out_of_fold  # noqa: E402
from mammo_core.store.card import edit_card  # noqa: E402
from mammo_core.store.registry import load_model  # noqa: E402

MODEL = Path("weights/efficientnet-lite0-ft-ensemble")
OUT = Path("experiments/tta_oof.json")
CHUNK = 64
ARMS = ("none", "dihedral8")


def score_members(model, card, paths: list[str], log) -> dict[str, np.ndarray]:
    """{tta: (N, k) calibrated member probabilities}, decoding and scoring `CHUNK` images at a time."""
    scorers = {tta: EnsembleScorer(model, card, tta=tta) for tta in ARMS}
    out = {tta: [] for tta in ARMS}
    t0 = time.time()
    for start in range(0, len(paths), CHUNK):
        images = load_images(paths[start:start + CHUNK], preprocessing=card["input_pipeline"])
        for tta, scorer in scorers.items():
            out[tta].append(scorer(images, with_cam=False)[0])
        done = min(start + CHUNK, len(paths))
        if done == len(paths) or (start // CHUNK) % 10 == 0:
            log(f"{done}/{len(paths)} images, {time.time() - t0:.0f} s")
    return {tta: np.concatenate(parts) for tta, parts in out.items()}


def card_block(result: dict, command: str) -> dict:
    """The card's `test_time_augmentation` block from a full run's result."""
    diff = result["auc_difference"]
    return {"views": len(result["views"]), "auc_plain": result["none"]["auc"], "auc_views": result["dihedral8"]["auc"],
            "difference": diff["dihedral8_minus_none"], "difference_ci": diff["ci_source_images"],
            "n_images": result["n_images"], "n_source_images": result["n_source_images"],
            "measured": "out of fold: each image scored by the member that never trained on its source image; "
                        "95 % interval of the paired difference, source images resampled",
            "command": command}


def write_into_card(model_dir: Path, result: dict, command: str) -> None:
    """Put a full run's figures into the card of `model_dir`, refusing a run of another model file."""
    if result.get("limit") is not None:
        raise SystemExit("a --limit run is a check, not a measurement: not written into the card")
    def change(card: dict) -> None:
        if card.get("model_sha256") != result.get("model_sha256"):
            raise SystemExit(f"{model_dir}: the results are of another model file; not written")
        card["test_time_augmentation"] = card_block(result, command)
    edit_card(model_dir, change)
    print(f"wrote the test_time_augmentation block into {model_dir}/card.json", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL, help=f"ensemble model directory (default {MODEL})")
    parser.add_argument("--limit", type=int, default=None, help="score only this many rows, drawn at random (a check)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results JSON (default {OUT} for a full run; a --limit run only prints)")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--into-card", action="store_true", help="after a full run, write its figures into the card")
    parser.add_argument("--card-from", type=Path, default=None,
                        help="write a saved full run's figures (its JSON) into the card, without scoring")
    args = parser.parse_args(argv)
    if args.card_from is not None:
        write_into_card(args.model, json.loads(args.card_from.read_text()),
                        f"python experiments/tta_oof.py --model {args.model} --out {args.card_from}")
        return 0
    data = Path(os.environ.get("MAMMO_DATA_DIR") or parser.error("set MAMMO_DATA_DIR to the dataset folder"))
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    t0 = time.time()
    model, card = load_model(args.model)
    table = pd.read_csv(args.model / "test_predictions.csv", dtype={"group": str, "patient": str})
    if args.limit:
        rows = np.sort(np.random.default_rng(0).choice(len(table), size=min(args.limit, len(table)), replace=False))
        table = table.iloc[rows].reset_index(drop=True)
    patient_map = default_patient_map(data)
    patients = (table["group"].map(load_patient_map(patient_map)) if patient_map else table["patient"]).astype(str)
    members = score_members(model, card, [str(data / p) for p in table["path"]], log)
    scored_s = time.time() - t0

    y, groups = table["label"].to_numpy(), table["group"].to_numpy()
    bag = int((card.get("ensemble") or {}).get("members_per_fold", 1))
    oof = {tta: out_of_fold(members[tta], table["fold"].to_numpy(), bag) for tta in ARMS}
    result = {
        "model": card.get("name") or args.model.name, "model_sha256": card.get("model_sha256"),
        "data": "$MAMMO_DATA_DIR", "limit": args.limit, "views": list(DIHEDRAL8),
        "n_images": int(len(table)), "n_source_images": int(table["group"].nunique()),
        "n_patients": int(patients.nunique()), "patient_map": "patients.csv" if patient_map else None,
        "note": ("Out-of-fold: each image scored by the member that never trained on its source image. AUC pooled "
                 "over images; 95 % percentile cluster-bootstrap intervals resampling source images (the card's "
                 "CV grouped by source image) and patients (same source-grouped members: not the card's "
                 "patient-grouped CV). 'dihedral8' = member logits averaged over the 8 flips and 90° rotations."),
        "max_abs_plain_vs_csv": float(np.max(np.abs(oof["none"] - table["probability"].to_numpy()))),
    }
    for tta in ARMS:
        row = point_metrics(y, oof[tta])
        for unit, g in (("source_images", groups), ("patients", patients.to_numpy())):
            row[f"ci_{unit}"] = cluster_bootstrap(y, oof[tta], g, n_boot=args.n_boot)
        result[tta] = row
    result["auc_difference"] = {
        "dihedral8_minus_none": result["dihedral8"]["auc"] - result["none"]["auc"],
        "ci_source_images": paired_auc_difference(y, oof["none"], oof["dihedral8"], groups, n_boot=args.n_boot),
        "ci_patients": paired_auc_difference(y, oof["none"], oof["dihedral8"], patients.to_numpy(), n_boot=args.n_boot),
    }
    result["seconds"] = {"scoring": round(scored_s, 1), "total": round(time.time() - t0, 1)}
    text = json.dumps(result, indent=1)
    print(text)
    out = args.out or (None if args.limit else OUT)
    if out is not None:
        out.write_text(text + "\n")
        log(f"wrote {out}")
    if args.into_card:
        write_into_card(args.model, result, f"python experiments/tta_oof.py --model {args.model}"
                        + (f" --out {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
