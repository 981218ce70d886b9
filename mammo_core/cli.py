"""Command line: `python -m mammo_core {train,evaluate,predict,models,cv,calibrate,breast-level,pacs}`.

The CLI calls the same functions as the app. Expected failures (bad image, bad dataset, bad model
directory, bad option) print one clear line on stderr and exit non-zero, never a traceback.
Exit status: 0 success; 1 failure; 2 `predict` rejected at least one input (or bad usage);
130 cancelled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from mammo_core.config import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_SEED, DEFAULT_THRESHOLD, data_dir
from mammo_core.errors import MammoError
from mammo_core.models.fast_training import PRECISIONS

PRECISION_HELP = ("paper-cnn's training arithmetic: auto = bfloat16 convolutions on a CPU with native bfloat16 "
                  "(same network, about 2x faster), else float32; other architectures always train in float32")

EXIT_OK, EXIT_FAIL, EXIT_REJECTED, EXIT_CANCELLED = 0, 1, 2, 130


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from mammo_core.store.run_safety import Cancelled
    from mammo_core.training.train import TrainConfig, train

    dataset = args.data or data_dir()
    if dataset is None:
        _err("no dataset: pass --data DIR or set MAMMO_DATA_DIR.")
        return EXIT_FAIL
    patient_map = _patient_map_for(Path(dataset), args.group_by, args.patient_map)
    config = TrainConfig(
        data_dir=str(dataset), name=args.name, architecture=args.arch, protocol=args.protocol,
        group_by=args.group_by, patient_map=patient_map, epochs=args.epochs, batch_size=args.batch_size,
        seed=args.seed, channels=args.channels, learning_rate=args.learning_rate, precision=args.precision,
        max_steps_per_epoch=args.max_steps, preprocessing=args.preprocessing, folds=args.folds,
        recipe=_recipe_overrides(args.recipe), strategy=args.strategy,
    )
    try:
        model_dir = train(config, root=args.weights, progress_path=args.progress_file,
                          log=(lambda m: print(m, file=sys.stderr)))
    except Cancelled:
        _err("training cancelled; no model was written.")
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        _err("training interrupted; no model was written.")
        return EXIT_CANCELLED
    from mammo_core.training.distribute import is_chief

    if args.calibrate and is_chief(args.strategy):  # other multi-worker tasks keep no model
        from mammo_core.training.calibrate import calibrate_model_dir

        cal = calibrate_model_dir(model_dir)["calibration"]
        print(f"calibrated: temperature {cal['temperature']:.4f} (fitted on the validation split)", file=sys.stderr)
    return EXIT_OK


def _recipe_overrides(pairs: Sequence[str] | None) -> dict | None:
    """KEY=VALUE pairs for `finetune.Recipe`, typed like its fields; ValueError names a bad pair."""
    if not pairs:
        return None
    from dataclasses import fields

    from mammo_core.training.finetune import Recipe

    types = {f.name: type(getattr(Recipe(), f.name)) for f in fields(Recipe)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--recipe {pair!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        try:
            out[key] = types[key](value)
        except ValueError:
            raise ValueError(f"--recipe {pair!r}: {value!r} is not a valid {types[key].__name__}") from None
    return out


def _patient_map_for(dataset: Path, group_by: str, given: str | None) -> str | None:
    from mammo_core.data.datasets import patient_map_for

    return patient_map_for(dataset, group_by, given)


def cmd_cv(args: argparse.Namespace) -> int:
    from mammo_core.store.registry import resolve_model_dir
    from mammo_core.training.cv import CVConfig, run_cv, store_in_card, write_results

    card_dir = resolve_model_dir(args.into_card, root=args.weights) if args.into_card else None
    if args.from_results:
        try:
            results = json.loads(Path(args.from_results).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            _err(f"{args.from_results}: cannot read CV results ({exc}).")
            return EXIT_FAIL
    else:
        dataset = args.data or data_dir()
        if dataset is None:
            _err("no dataset: pass --data DIR or set MAMMO_DATA_DIR.")
            return EXIT_FAIL
        config = CVConfig(
            data_dir=str(dataset), architecture=args.arch, k=args.k, group_by=args.group_by,
            patient_map=_patient_map_for(Path(dataset), args.group_by, args.patient_map), seed=args.seed,
            epochs=args.epochs, batch_size=args.batch_size, copies_per_source=args.copies_per_source,
            val_copies_per_source=args.val_copies_per_source, n_boot=args.n_boot, precision=args.precision,
            preprocessing=args.preprocessing, inner_only=args.inner_only, inner_parts=args.inner_parts,
            strategy=args.strategy,
        )
        if args.recipe:
            from mammo_core.training.finetune import Recipe

            config.recipe = Recipe(**_recipe_overrides(args.recipe))
        results, oof = run_cv(config, log=lambda m: print(m, file=sys.stderr, flush=True))
        from mammo_core.training.distribute import is_chief

        if not is_chief(args.strategy):  # multi-worker: the chief writes and prints the results
            return EXIT_OK
        out = args.out or Path("cv-results") / f"{args.arch}-{args.group_by}-k{args.k}-seed{args.seed}"
        json_path, csv_path = write_results(results, oof, out)
        print(f"results: {json_path}\nout-of-fold predictions: {csv_path}", file=sys.stderr)
    if args.json:
        print(json.dumps(results))
    elif "pooled" not in results:  # --inner-only: validation parts only
        per_fold = ", ".join(f"{r['val_auc']:.3f}" for r in results["folds"] if not r.get("part"))
        print(f"{results['architecture']}: {results['protocol']}: mean validation AUC "
              f"{results['mean_validation_auc']:.3f} (folds: {per_fold})"
              + ("".join(f"; inner part {p}: {m:.3f}" for p, m in enumerate(results["mean_validation_auc_by_part"]))
                 if len(results.get("mean_validation_auc_by_part", [])) > 1 else ""))
    else:
        _print_cv(results)
    if card_dir is not None:
        store_in_card(card_dir, results, allow_other_architecture=args.allow_other_architecture)
        print(f"stored in {card_dir / 'card.json'}", file=sys.stderr)
    return EXIT_OK


def cmd_breast_level(args: argparse.Namespace) -> int:
    from mammo_core.data.datasets import default_patient_map
    from mammo_core.evaluation import breast_level
    from mammo_core.store.card import read_card
    from mammo_core.store.registry import resolve_model_dir

    model_dir = resolve_model_dir(args.model, root=args.weights)
    patients_path = args.patient_map
    if patients_path is None:
        dataset = args.data or data_dir()
        found = default_patient_map(dataset) if dataset is not None else None
        if found is None:
            _err("no patient map: pass --patient-map FILE, or --data DIR / MAMMO_DATA_DIR with a patients.csv.")
            return EXIT_FAIL
        patients_path = found
    oof = breast_level.read_oof(args.oof)
    card = read_card(model_dir)
    if breast_level.copy_auc_matches(oof, card.get("cross_validation_patient")) is False and not args.allow_mismatch:
        _err(f"{args.oof}: its per-copy AUC differs from the pooled AUC in {model_dir.name}'s cross_validation_patient; "
             "it is not this model's out-of-fold table (--allow-mismatch to store it anyway).")
        return EXIT_FAIL
    block = breast_level.measure(oof, breast_level.read_patients(patients_path), n_boot=args.n_boot,
                                 seed=args.seed, threshold=args.threshold)
    block["oof"] = Path(args.oof).as_posix()
    if args.json:
        print(json.dumps(block))
    else:
        print("\n".join([f"{model_dir.name}: breast- and exam-level, {block['protocol']}"] + breast_level.summary_lines(block)))
    if args.into_card:
        breast_level.store_in_card(model_dir, block)
        print(f"stored in {model_dir / 'card.json'} ({breast_level.CARD_KEY})", file=sys.stderr)
    return EXIT_OK


def _print_cv(results: dict) -> None:
    print(f"{results['architecture']}: {results['protocol']} (seed {results['seed']})")
    print(f"{'fold':>6}{'AUC':>8}{'acc':>8}{'sens':>8}{'spec':>8}{'images':>8}{'groups':>8}{'val AUC':>9}")
    for r in results["folds"]:
        print(f"{r['fold']:>6}{r['auc']:8.3f}{r['accuracy']:8.3f}{r['sensitivity']:8.3f}{r['specificity']:8.3f}"
              f"{r['n_images']:8d}{r['n_groups']:8d}{r.get('val_auc') or float('nan'):9.3f}")
    p = results["pooled"]
    cells = "  ".join(f"{m} {p[m]:.3f} [{p[m + '_ci'][0]:.3f}, {p[m + '_ci'][1]:.3f}]"
                      for m in ("auc", "accuracy", "sensitivity", "specificity"))
    print(f"pooled: {cells}")
    t = results.get("training", {})
    print(f"minutes per fold: {t.get('minutes_per_fold')}; training images/s: {t.get('train_images_per_second')}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from mammo_core.store.registry import resolve_model_dir
    from mammo_core.training.calibrate import calibrate_model_dir

    model_dir = resolve_model_dir(args.model, root=args.weights)
    card = calibrate_model_dir(model_dir)
    cal = card["calibration"]
    if args.json:
        print(json.dumps({"model": model_dir.name, "calibration": cal, "operating_points": card["operating_points"]}))
        return EXIT_OK
    print(f"model {model_dir.name}: temperature {cal['temperature']:.4f} (fitted on the {cal['computed_on']})")
    print(f"Brier validation {cal['brier_val_before']:.4f} -> {cal['brier_val_after']:.4f}; "
          f"test {cal['brier_test_before']:.4f} -> {cal['brier_test_after']:.4f}")
    for op in card["operating_points"]:
        print(f"{op['name']:22} threshold {op['threshold']:.4f}  validation sens {op['sensitivity']:.3f} "
              f"spec {op['specificity']:.3f}  test sens {op['test_sensitivity']:.3f} spec {op['test_specificity']:.3f}")
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from mammo_core.store.registry import active_model_name, list_models

    active = active_model_name(args.weights)
    entries = list_models(args.weights)
    if args.json:
        for e in entries:
            test = e.card.get("metrics", {}).get("test", {})
            print(json.dumps({"name": e.name, "active": e.name == active, "architecture": e.card.get("architecture"),
                              "protocol": e.card.get("split", {}).get("protocol"), "created": e.created,
                              "test_auc": test.get("auc"), "test_accuracy": test.get("accuracy"), "problem": e.problem}))
        return EXIT_OK
    if not entries:
        print("no models found")
        return EXIT_OK
    # columns as wide as their longest entry, so long names and split protocols stay aligned
    w_name = max(len("name"), *(len(e.name) for e in entries))
    w_arch = max(len("architecture"), *(len(str(e.card.get("architecture", "?"))) for e in entries))
    w_split = max(len("split"), *(len(str(e.card.get("split", {}).get("protocol", "?"))) for e in entries))
    print(f"{'':2}{'name':{w_name}} {'architecture':{w_arch}} {'split':{w_split}} {'test AUC':>8} {'test acc':>8}  created")
    for e in entries:
        test = e.card.get("metrics", {}).get("test", {})
        mark = "* " if e.name == active else "  "
        if e.problem:
            print(f"{mark}{e.name:{w_name}} problem: {e.problem}")
            continue
        print(f"{mark}{e.name:{w_name}} {str(e.card.get('architecture', '?')):{w_arch}} "
              f"{str(e.card.get('split', {}).get('protocol', '?')):{w_split}} "
              f"{test.get('auc', float('nan')):8.3f} {test.get('accuracy', float('nan')):8.3f}  {e.created}")
    print("(* = active model, used by the app and by predict without --model)")
    return EXIT_OK


def _format_metrics(m: dict) -> str:
    lines = [f"n={m['n']}  threshold={m['threshold']:.3f}  accuracy={m['accuracy']:.4f}  loss={m['loss']:.4f}  "
             f"AUC={m['auc']:.4f}  sensitivity={m['sensitivity']:.4f}  specificity={m['specificity']:.4f}",
             f"{'':14}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    rows = [*m["per_class"].items(), ("macro avg", m["macro_avg"]), ("weighted avg", m["weighted_avg"])]
    for name, r in rows:
        lines.append(f"{name:14}{r['precision']:10.2f}{r['recall']:10.2f}{r['f1']:10.2f}{r['support']:10d}")
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    lines.append(f"confusion matrix (rows true, cols predicted; benign, malignant): [[{tn}, {fp}], [{fn}, {tp}]]")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import pandas as pd

    from mammo_core.evaluation.metrics import compute_metrics
    from mammo_core.store.card import read_card
    from mammo_core.store.registry import PREDICTIONS_FILE, resolve_model_dir

    model_dir = resolve_model_dir(args.model, root=args.weights)
    card = read_card(model_dir)
    threshold = card.get("threshold", 0.5) if args.threshold is None else args.threshold
    cross_validated = card.get("split", {}).get("protocol") == "cross-validation"
    if args.data is None:
        table = pd.read_csv(model_dir / PREDICTIONS_FILE)
        source = (f"{model_dir / PREDICTIONS_FILE} (out-of-fold predictions of the cross-validation)" if cross_validated
                  else f"{model_dir / PREDICTIONS_FILE} (the test split recorded at training)")
    elif cross_validated:
        _err(f"{model_dir.name} was trained by cross-validation on the whole dataset: it has no held-out split "
             "to re-score. Drop --data to see its out-of-fold metrics.")
        return EXIT_FAIL
    else:
        table = _rescore_split(model_dir, card, Path(args.data), args.split)
        source = f"{args.split} split of {args.data}, protocol {card['split']['protocol']}, re-scored now"
    metrics = compute_metrics(table["label"], table["probability"], threshold=threshold)
    if args.json:
        print(json.dumps({"model": model_dir.name, "source": source, "metrics": metrics}))
    else:
        print(f"model {model_dir.name} ({card.get('architecture')}, split protocol {card.get('split', {}).get('protocol')})")
        print(f"evaluated on {source}")
        print(_format_metrics(metrics))
        note = card.get("evaluation", {}).get("note")
        if note:
            print(f"note: {note}")
    return EXIT_OK


def _rescore_split(model_dir: Path, card: dict, dataset: Path, split: str):
    import pandas as pd

    from mammo_core.data.datasets import scan_dataset
    from mammo_core.data.pipeline import load_images
    from mammo_core.data.splits import assign_split
    from mammo_core.inference.predict import Predictor

    cfg = card.get("config", {})
    frame = scan_dataset(dataset, patient_map=cfg.get("patient_map"))
    frame = assign_split(frame, protocol=card["split"]["protocol"], seed=card["split"]["seed"],
                         group_by=cfg.get("group_by", "source"))
    part = frame[frame["split"] == split].reset_index(drop=True)
    predictor = Predictor.load(model_dir)
    images = load_images(part["path"].tolist(), preprocessing=predictor.preprocessing)
    probs, _ = predictor.score_arrays(images, with_cam=False)
    return pd.DataFrame({"label": part["label"], "probability": probs})


def cmd_predict(args: argparse.Namespace) -> int:
    from mammo_core.data.datasets import expand_inputs
    from mammo_core.inference.predict import score_paths

    paths = expand_inputs(args.paths)
    if not paths:
        _err("no image files found in the given paths.")
        return EXIT_REJECTED
    if args.engine == "ray":
        if args.tta:
            raise ValueError("--tta needs the local engine (--engine local)")
        return _predict_ray(args, paths)
    outdir = Path(args.gradcam) if args.gradcam else None
    predictor, early, started = _load_decoding_ahead(args, paths, keep_images=outdir is not None)
    outputs = _PredictOutputs(args, predictor.name, predictor.model_sha256)
    inputs_dir = Path(args.save_inputs) if args.save_inputs else None
    for folder in (outdir, inputs_dir):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    rejected = 0
    stems: set[str] = set()  # of the files written so far for this run's inputs
    bar, progress = _progress_bar(args, len(paths))
    for pred in score_paths(predictor, paths, with_cam=outdir is not None, keep_images=outdir is not None,
                            batch_size=args.batch_size, progress=progress, started=started):
        if pred.error is not None:
            rejected += 1
        elif outdir is not None or inputs_dir is not None:
            stem = _output_stem(pred.name, stems)
            if outdir is not None:
                _save_overlay(pred, outdir, stem)
            if inputs_dir is not None:
                _save_input(pred, inputs_dir, stem)
        row = pred.to_json(predictor.name)
        if predictor.tta != "none" and pred.error is None:
            row["tta"] = predictor.tta  # rows without the key were scored on the plain view
        outputs.add(row, pred.sha256)
        _print_prediction(pred, row, as_json=args.json)
    if bar is not None:
        bar.close()
    early.shutdown()
    outputs.close()
    return EXIT_REJECTED if rejected else EXIT_OK


def _load_decoding_ahead(args: argparse.Namespace, paths: list[Path], *, keep_images: bool):
    """(Predictor, the executor, the inputs it decodes): the first inputs are decoded in a thread while
    the model loads; dropped when the card's preprocessing changed meanwhile. Shut the executor down after use."""
    from concurrent.futures import ThreadPoolExecutor

    from mammo_core.inference.predict import FREEZE_FROM_IMAGES, Predictor, decode_ahead
    from mammo_core.io.preprocessing import card_preprocessing
    from mammo_core.store.card import read_card
    from mammo_core.store.registry import resolve_model_dir

    early = ThreadPoolExecutor(max_workers=1)  # decodes the first inputs while the model loads
    try:
        early_card = read_card(resolve_model_dir(args.model, root=args.weights))
        started = decode_ahead(early_card, paths, early, keep_images=keep_images,
                               limit=1024 if not keep_images else 2 * args.batch_size)
    except MammoError:  # a bad model directory: Predictor.load says why, as before
        early_card, started = {}, []
    try:
        predictor = Predictor.load(args.model, root=args.weights, tta="dihedral8" if args.tta else "none",
                                   freeze=len(paths) >= FREEZE_FROM_IMAGES)
    except BaseException:
        early.shutdown(wait=False, cancel_futures=True)
        raise
    if started and card_preprocessing(early_card) != predictor.preprocessing:  # the card changed meanwhile
        early.shutdown(wait=True, cancel_futures=True)
        started = []
    return predictor, early, started


def _progress_bar(args: argparse.Namespace, total: int):
    """(tqdm bar or None, progress(n done) callback): a bar only for several inputs on a terminal."""
    bar = None
    if not args.no_progress and total > 1 and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", file=sys.stderr)
    last = [0]

    def progress(n: int) -> None:
        if bar is not None:
            bar.update(n - last[0])
            last[0] = n

    return bar, progress


def _print_prediction(pred, row: dict, *, as_json: bool) -> None:
    """One stdout line per input: the JSON row, or name, probability [interval], label and warnings."""
    if as_json:
        print(json.dumps(row), flush=True)
    elif pred.error is not None:
        print(f"{pred.name}\terror: {pred.error}", flush=True)
    else:
        interval = (f"\t[{pred.probability_interval[0]:.4f}, {pred.probability_interval[1]:.4f}]"
                    if pred.probability_interval else "")
        flags = "".join(f"\twarning: {w}" for w in pred.warnings)
        print(f"{pred.name}\t{pred.probability:.4f}{interval}\t{pred.label}{flags}", flush=True)


class _PredictOutputs:
    """Where predict's rows go besides stdout: `--out` (CSV/Parquet, `results_out`) and `--audit`."""

    def __init__(self, args: argparse.Namespace, model_name: str, model_sha256: str) -> None:
        from mammo_core.inference.results_out import ResultsFile

        self.file = ResultsFile(args.out) if args.out else None
        self.audit = None
        self.model_name, self.model_sha256 = model_name, model_sha256
        if args.audit:
            import getpass

            from mammo_core.store.audit import open_audit_log

            self.audit, self.user = open_audit_log(), getpass.getuser()

    def add(self, row: dict, sha256: str | None) -> None:
        if self.file is not None:
            self.file.add(row)
        if self.audit is not None and "error" not in row:
            self.audit.record(file_sha256=sha256, file_name=row["path"], model_name=self.model_name,
                              model_sha256=self.model_sha256, probability=row["probability"],
                              threshold=row["threshold"], decision=row["label"], user=self.user)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _predict_ray(args: argparse.Namespace, paths: list) -> int:
    """predict --engine ray: the same rows as the local engine, scored on Ray (`ray_engine`)."""
    if args.gradcam or args.save_inputs:
        raise ValueError("--gradcam and --save-inputs need the local engine (--engine local)")
    try:
        from mammo_core.inference.ray_engine import score_paths_ray
    except ImportError:
        _err("--engine ray needs Ray: pip install -r requirements-cluster.txt")
        return EXIT_FAIL
    from mammo_core.store.card import read_card
    from mammo_core.store.registry import resolve_model_dir

    model_dir = resolve_model_dir(args.model, root=args.weights)
    card = read_card(model_dir)
    outputs = _PredictOutputs(args, card.get("name") or model_dir.name, card.get("model_sha256", ""))
    bar = None
    if not args.no_progress and len(paths) > 1 and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="img", file=sys.stderr)
    rejected = 0
    try:
        for row, sha256 in score_paths_ray(paths, model_dir, workers=args.workers, batch_size=args.batch_size,
                                           address=args.ray_address):
            rejected += "error" in row
            outputs.add(row, sha256)
            if args.json:
                print(json.dumps(row), flush=True)
            elif "error" in row:
                print(f"{row['path']}\terror: {row['error']}", flush=True)
            else:
                interval = "".join(f"\t[{low:.4f}, {high:.4f}]" for low, high in [row.get("probability_interval")]
                                   if row.get("probability_interval"))
                flags = "".join(f"\twarning: {w}" for w in row["warnings"])
                print(f"{row['path']}\t{row['probability']:.4f}{interval}\t{row['label']}{flags}", flush=True)
            if bar is not None:
                bar.update(1)
    except ConnectionError as exc:  # not a storage error: say which cluster and what to check
        _err(f"cannot join the Ray cluster ({str(exc).splitlines()[0]}); check --ray-address / RAY_ADDRESS and, "
             "with Ray's token authentication, RAY_AUTH_TOKEN.")
        return EXIT_FAIL
    finally:
        if bar is not None:
            bar.close()
        outputs.close()
    return EXIT_REJECTED if rejected else EXIT_OK


def _output_stem(name: str, taken: set[str]) -> str:
    """The stem the files written for input `name` get: its own stem, else (another input of this run had it:
    a.png and a.dcm, or two folders' a.png) the stem and extension, then a number; so no output overwrites another."""
    path = Path(name)
    stem = path.stem
    if stem in taken:
        stem = f"{path.stem}_{path.suffix.lstrip('.')}" if path.suffix else path.stem
        base, n = stem, 2
        while stem in taken:
            stem, n = f"{base}_{n}", n + 1
    taken.add(stem)
    return stem


def _save_png(pixels, target: Path) -> None:
    """Write a PNG whole or not at all (a temporary file, then renamed): never a half-written file."""
    import tempfile

    from PIL import Image

    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(pixels).save(fh, format="PNG")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_overlay(pred, outdir: Path, stem: str) -> None:
    from mammo_core.inference.explain import overlay

    _save_png(overlay(pred.image.pixels, pred.heatmap_on_original()), outdir / f"{stem}_gradcam.png")


def _save_input(pred, outdir: Path, stem: str) -> None:
    """The model's own view of the image (the preprocessed 224x224 input) as a PNG."""
    _save_png(pred.model_input, outdir / f"{stem}_input.png")


RECIPE_HELP = ("efficientnet-lite0-ft: change a field of the fine-tuning recipe (repeatable), e.g. learning_rate=3e-4; "
               "fields: cut, learning_rate, weight_decay, max_epochs, patience, copies_per_source, "
               "val_copies_per_source, dropout, batch_size")
PREPROCESSING_HELP = ("input pipeline (default: the paper's whole-frame resize with --protocol paper, the breast crop "
                      "otherwise)")


STRATEGY_HELP = ("tf.distribute (image-trained architectures): none (default); auto = MirroredStrategy over the local GPUs "
                 "when there are two or more; mirrored = over the local GPUs (or logical CPUs); multi-worker = "
                 "MultiWorkerMirroredStrategy over the machines in TF_CONFIG, only the chief writes (docs/SCALING.md)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m mammo_core`: global options and one subcommand per job."""
    parser = argparse.ArgumentParser(prog="python -m mammo_core",
                                     description="Mammogram benign/malignant CNN: train, evaluate, predict. A research tool, not a diagnostic device.")
    parser.add_argument("--weights", type=Path, default=None, help="models folder (default: the repository's weights/, or $MAMMO_WEIGHTS_DIR)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_cv, _add_breast_level, _add_calibrate, _add_evaluate, _add_predict, _add_models):
        add(sub)

    from mammo_core.pacs.cli import add_pacs_parser

    add_pacs_parser(sub)  # pacs {echo,score,listen}: the PACS round trip (mammo_core/pacs)
    return parser


def _add_train(sub: argparse._SubParsersAction) -> None:
    from mammo_core.data.splits import GROUP_BY, PROTOCOLS
    from mammo_core.io.preprocessing import PREPROCESSINGS
    from mammo_core.models.architectures import ARCHITECTURES
    from mammo_core.training.distribute import STRATEGIES

    p = sub.add_parser("train", help="train a model and write a model directory under weights/")
    p.add_argument("--data", type=Path, default=None, help="dataset folder (default: $MAMMO_DATA_DIR)")
    p.add_argument("--name", required=True, help="name of the new model directory (never overwrites one)")
    p.add_argument("--arch", default="paper-cnn", choices=sorted(ARCHITECTURES), help="architecture (default: paper-cnn)")
    p.add_argument("--protocol", default="grouped", choices=PROTOCOLS, help="paper: the dataset's split folders; grouped: 50/25/25 by group (default)")
    p.add_argument("--group-by", default="source", choices=GROUP_BY, help="grouping unit for the grouped protocol (default: source image)")
    p.add_argument("--patient-map", default=None, help="CSV image_id,patient_id (default with --group-by patient: the dataset's patients.csv)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--channels", type=int, default=1, choices=(1, 3), help="1 = grayscale (default); 3 = RGB copies as the authors did")
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--max-steps", type=int, default=None, help="cap batches per epoch (smoke tests)")
    p.add_argument("--preprocessing", default=None, choices=PREPROCESSINGS, help=PREPROCESSING_HELP)
    p.add_argument("--folds", type=int, default=5, help="efficientnet-lite0-ft: cross-validation folds = ensemble members (default 5)")
    p.add_argument("--recipe", action="append", metavar="KEY=VALUE", help=RECIPE_HELP)
    p.add_argument("--progress-file", type=Path, default=None, help="write live progress JSON here")
    p.add_argument("--calibrate", action="store_true", help="then fit temperature scaling and operating points on the validation split")
    p.add_argument("--strategy", default="none", choices=STRATEGIES, help=STRATEGY_HELP)
    p.set_defaults(func=cmd_train)


def _add_cv(sub: argparse._SubParsersAction) -> None:
    from mammo_core.data.splits import GROUP_BY
    from mammo_core.io.preprocessing import PREPROCESSING_ID, PREPROCESSINGS
    from mammo_core.models.architectures import ARCHITECTURES
    from mammo_core.training.distribute import STRATEGIES

    p = sub.add_parser("cv", help="k-fold cross-validation grouped by source image or patient, with cluster-bootstrap CIs")
    p.add_argument("--data", type=Path, default=None, help="dataset folder (default: $MAMMO_DATA_DIR)")
    p.add_argument("--arch", default="efficientnet-lite0", choices=sorted(ARCHITECTURES), help="architecture (default: efficientnet-lite0)")
    p.add_argument("--k", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--group-by", default="source", choices=GROUP_BY, help="grouping unit (default: source image)")
    p.add_argument("--patient-map", default=None, help="CSV image_id,patient_id (default with --group-by patient: the dataset's patients.csv)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--epochs", type=int, default=None, help="epochs per fold (default: 10 for image models, 30 for a feature head)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--copies-per-source", type=int, default=None, help="image models: training copies kept per source image (default: all)")
    p.add_argument("--val-copies-per-source", type=int, default=8, help="image models: validation copies per source image (default 8)")
    p.add_argument("--preprocessing", default=PREPROCESSING_ID, choices=PREPROCESSINGS, help=f"input pipeline (default {PREPROCESSING_ID})")
    p.add_argument("--recipe", action="append", metavar="KEY=VALUE", help=RECIPE_HELP)
    p.add_argument("--inner-only", action="store_true", help="recipe selection: score only the validation parts of the training folds, never the test folds")
    p.add_argument("--inner-parts", type=int, default=1, metavar="N",
                   help="with --inner-only: use N of each fold's 4 inner folds in turn as its validation part "
                        "(nested CV; 4 scores every training source image once, at 4x the cost; default 1)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the CIs (default 2000)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--out", type=Path, default=None, help="folder for cv_results.json and oof_predictions.csv (default: cv-results/<arch>-<group-by>-k<k>-seed<seed>)")
    p.add_argument("--into-card", default=None, metavar="MODEL", help="store the results in this model's card (cross_validation or cross_validation_patient)")
    p.add_argument("--from-results", default=None, metavar="JSON", help="store an existing cv_results.json instead of running CV (with --into-card)")
    p.add_argument("--allow-other-architecture", action="store_true", help="store results of another architecture in the card")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--strategy", default="none", choices=STRATEGIES, help=STRATEGY_HELP)
    p.set_defaults(func=cmd_cv)


def _add_breast_level(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("breast-level", help="breast- and exam-level AUC (max/mean of the views) from a patient-grouped CV's out-of-fold table")
    p.add_argument("--model", default=None, help="model name or directory (default: the active model)")
    p.add_argument("--oof", required=True, type=Path, help="oof_predictions.csv of `cv --group-by patient` for this model's recipe")
    p.add_argument("--patient-map", default=None, help="patients.csv with image_id, patient_id, laterality, view (default: the dataset's)")
    p.add_argument("--data", type=Path, default=None, help="dataset folder holding patients.csv (default: $MAMMO_DATA_DIR)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of patients (default 2000)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="decision threshold for accuracy, sensitivity, specificity (default %(default)s, as the CV)")
    p.add_argument("--into-card", action="store_true", help="store the results as the card's breast_level block")
    p.add_argument("--allow-mismatch", action="store_true", help="store even when the table does not match the card's patient CV")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_breast_level)


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit temperature scaling and operating points on a model's validation predictions")
    p.add_argument("--model", default=None, help="model name or directory (default: the active model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Table 1 metrics of a model, from its recorded test predictions or by re-scoring a split")
    p.add_argument("--model", default=None, help="model name or directory (default: the active model)")
    p.add_argument("--data", type=Path, default=None, help="re-score this dataset's split instead of reading test_predictions.csv")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the card's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="score images or folders; one line per input")
    p.add_argument("paths", nargs="+", help="image files (PNG, JPEG, TIFF, BMP, DICOM) or folders")
    p.add_argument("--model", default=None, help="model name or directory (default: the active model)")
    p.add_argument("--gradcam", default=None, metavar="OUTDIR", help="write Grad-CAM overlays here")
    p.add_argument("--save-inputs", default=None, metavar="OUTDIR", help="write each model input (the preprocessed 224x224 view) here as a PNG")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation (fine-tuned ensemble only): average the members' logits over 8 views "
                        "(flips and 90° rotations), about 8x slower; the ensemble's Grad-CAM stays that of the plain "
                        "view. JSON rows then carry \"tta\": \"dihedral8\"")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local (default): this process; ray: Ray Data tasks decode, a pool of model actors scores "
                        "(pip install -r requirements-cluster.txt)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (default: $RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--workers", type=int, default=2, help="--engine ray: model actors (default 2)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the rows to FILE.csv or FILE.parquet, as they arrive")
    p.add_argument("--audit", action="store_true",
                   help="record every scored file in the audit log ($MAMMO_AUDIT_URL / $MAMMO_AUDIT_DB), like the app")
    p.set_defaults(func=cmd_predict)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models in weights/")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)


def _quiet_readers() -> None:
    """No warnings from the image readers on stderr: they name no file ("<no filename>"), span two lines, and
    what they flag is either reported in the input's own row (a refused file) or harmless (padding removed)."""
    import warnings

    warnings.filterwarnings("ignore", module=r"(pydicom|PIL)(\.|$)")


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_tensorflow()
    _quiet_readers()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MammoError as exc:
        _err(str(exc))
        return EXIT_FAIL
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        _err(str(exc))
        return EXIT_FAIL
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:  # disk full, read-only weights folder...: one line, not a traceback
        from mammo_core.store.files import storage_error_message

        _err(storage_error_message(exc, "the output"))
        return EXIT_FAIL
