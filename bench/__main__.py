"""`python -m bench`: speed of scoring, training and the app, each beside the baseline a user would otherwise run.

Everything is measured in one run on the same machine:
1. single-image latency, probability + Grad-CAM: our Predictor (one compiled call) vs the keras-io
   recipe (`model.predict`, then `make_gradcam_heatmap` with a GradientTape model built per call);
2. folder scoring throughput: Predictor.score_many in batches vs a loop of `model.predict` per file;
3. training throughput of paper-cnn: ours (1 channel, decoded once and cached in memory, trained through
   `fast_training`) vs the authors' (RGB copies decoded from disk every epoch, batch 64), with ours on
   plain `model.fit` and the compute ceiling alongside to show where the gain comes from;
4. app: seconds from `streamlit run` to the first page served, and from an upload to the overlay
   shown in headless Chromium (warm).

Results print as a Markdown table; `--write` also replaces the results block of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import tensorflow as tf

    return (f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, TensorFlow {tf.__version__}, "
            f"load average at start {load:.2f}")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def test_files(data: Path, n: int) -> list[Path]:
    files = sorted((data / "test").rglob("*.png"))
    rng = np.random.default_rng(0)
    return [files[i] for i in sorted(rng.choice(len(files), size=min(n, len(files)), replace=False))]


# --- 1. single-image latency ---------------------------------------------------------------------

def keras_io_gradcam(img_array, model, last_conv_layer_name):
    """keras-io examples/vision/grad_cam.py `make_gradcam_heatmap`, as published (grad model built per call)."""
    import keras
    import tensorflow as tf

    grad_model = keras.models.Model(model.inputs, [model.get_layer(last_conv_layer_name).output, model.output])
    with tf.GradientTape() as tape:
        last_conv_layer_output, preds = grad_model(img_array)
        class_channel = preds[:, 0]
    grads = tape.gradient(class_channel, last_conv_layer_output)
    pooled_grads = tf.reduce_mean(grads, axis=(0, 1, 2))
    heatmap = last_conv_layer_output[0] @ pooled_grads[..., tf.newaxis]
    heatmap = tf.squeeze(heatmap)
    heatmap = tf.maximum(heatmap, 0) / tf.math.reduce_max(heatmap)
    return heatmap.numpy()


def functional_copy(model):
    """The recipe needs a functional model; a Sequential one is rebuilt with fresh layers (the usual workaround)."""
    import keras

    inp = keras.Input(model.inputs[0].shape[1:])
    x = inp
    clones = []
    for layer in model.layers:
        clone = layer.__class__.from_config(layer.get_config())
        x = clone(x)
        clones.append((clone, layer))
    copy = keras.Model(inp, x)
    for clone, layer in clones:
        clone.set_weights(layer.get_weights())
    return copy


def bench_latency(predictor, files: list[Path], n: int) -> dict:
    from mammo_core.explain import find_last_conv_layer
    from mammo_core.imaging import load_image
    from mammo_core.preprocessing import model_input

    blobs = [f.read_bytes() for f in files[:n]]
    predictor.score_one(blobs[0], name="warm")
    ours = []
    for b in blobs:
        t = time.perf_counter()
        pred = predictor.score_one(b, name="x")
        ours.append(time.perf_counter() - t)
        assert pred.error is None and pred.heatmap is not None

    model = predictor.model
    try:
        keras_io_gradcam(np.zeros((1, 224, 224, predictor.channels), np.float32), model, find_last_conv_layer(model))
        recipe_model, note = model, "recipe on the model as saved"
    except Exception as exc:  # the recipe's known failure on Sequential models
        recipe_model, note = functional_copy(model), f"recipe fails on the Sequential model ({type(exc).__name__}); run on a functional copy"
    layer = find_last_conv_layer(recipe_model)
    base = []
    for b in blobs[: max(10, n // 4)]:  # the baseline is slow; fewer runs suffice for its percentiles
        t = time.perf_counter()
        x = model_input(load_image(b).pixels, predictor.preprocessing).astype(np.float32)[None, ..., None] / 255.0
        x = np.repeat(x, predictor.channels, axis=-1)
        recipe_model.predict(x, verbose=0)
        keras_io_gradcam(x, recipe_model, layer)
        base.append(time.perf_counter() - t)
    return {"ours_p50": percentile(ours, 50) * 1e3, "ours_p95": percentile(ours, 95) * 1e3,
            "base_p50": percentile(base, 50) * 1e3, "base_p95": percentile(base, 95) * 1e3,
            "n": len(ours), "n_base": len(base), "note": note}


# --- 2. folder throughput ------------------------------------------------------------------------

def bench_folder(predictor, files: list[Path], n_base: int) -> dict:
    import keras

    from mammo_core.predict import score_paths

    for f in files:  # page cache warm for every contender: we measure scoring, not the disk
        f.read_bytes()
    list(score_paths(predictor, files[:128], with_cam=False, keep_images=False, batch_size=64))  # warm, through tf.data
    t = time.perf_counter()
    results = list(score_paths(predictor, files, with_cam=False, keep_images=False, batch_size=64))
    ours = len(results) / (time.perf_counter() - t)
    t = time.perf_counter()
    with_cam = list(score_paths(predictor, files, with_cam=True, keep_images=False, batch_size=32))
    ours_cam = len(with_cam) / (time.perf_counter() - t)

    model = predictor.model
    mode = "grayscale" if predictor.channels == 1 else "rgb"
    model.predict(np.zeros((1, 224, 224, predictor.channels), np.float32), verbose=0)
    t = time.perf_counter()
    for f in files[:n_base]:
        img = keras.utils.img_to_array(keras.utils.load_img(f, color_mode=mode, target_size=(224, 224))) / 255.0
        model.predict(img[None], verbose=0)
    base = n_base / (time.perf_counter() - t)
    return {"ours": ours, "ours_cam": ours_cam, "base": base, "n": len(files), "n_base": n_base}


# --- 3. training throughput ----------------------------------------------------------------------

def _time_fit(model, batches, steps: int) -> float:
    """Images/s of `model.fit` over `steps` batches (after the first call has built and traced it)."""
    t = time.perf_counter()
    model.fit(batches.take(steps), epochs=1, verbose=0)
    return steps * 64 / (time.perf_counter() - t)


class FlowFromDirectory:
    """Keras 2's `ImageDataGenerator(rescale=1/255).flow_from_directory(color_mode="rgb", batch_size=64)`,
    which the authors' notebook style used and Keras 3 no longer ships: every batch is loaded from disk
    with PIL in the training loop, as RGB copies of the grayscale images."""

    def __init__(self, folder: Path, seed: int = 0, batch_size: int = 64) -> None:
        self.files = [(p, 0.0) for p in sorted((folder / "benign").glob("*.png"))] + \
                     [(p, 1.0) for p in sorted((folder / "malignant").glob("*.png"))]
        self.rng = np.random.default_rng(seed)
        self.batch_size = batch_size

    def take(self, steps: int):
        import keras

        def gen():
            for _ in range(steps):
                idx = self.rng.choice(len(self.files), self.batch_size, replace=False)
                x = np.stack([keras.utils.img_to_array(keras.utils.load_img(self.files[i][0], color_mode="rgb",
                                                                            target_size=(224, 224))) / 255.0
                              for i in idx])
                yield x.astype(np.float32), np.array([self.files[i][1] for i in idx], np.float32)

        import tensorflow as tf

        return tf.data.Dataset.from_generator(gen, output_signature=(
            tf.TensorSpec((None, 224, 224, 3), tf.float32), tf.TensorSpec((None,), tf.float32)))


TRAINING_CONTENDERS = ("ours", "ours_plain", "authors_flow", "authors", "compute_bound")


def bench_training_one(data: Path, steps: int, contender: str) -> dict:
    """Images/s of one training pipeline, measured alone in this process."""
    import keras
    import tensorflow as tf

    from mammo_core import data as data_mod
    from mammo_core.model import build_model

    keras.utils.set_random_seed(0)
    decode_s, precision, n_decoded = None, None, None
    if contender in ("ours", "ours_plain", "compute_bound"):
        from mammo_core.fast_training import training_model
        from mammo_core.model import get_architecture

        frame = data_mod.scan_dataset(data)
        train_paths = frame[frame["given_split"] == "train"]
        t = time.perf_counter()
        images = data_mod.load_images(train_paths["path"].tolist())
        decode_s, n_decoded = time.perf_counter() - t, len(images)
        model = build_model("paper-cnn", channels=1, compile=contender == "ours_plain")
        if contender != "ours_plain":  # what `mammo_core train` fits: fast_training's equivalent computation
            model, computation = training_model(model, get_architecture("paper-cnn"))
            precision = computation["precision"]
        if contender == "compute_bound":  # the ceiling: one batch held in memory, no input pipeline at all
            x0 = np.asarray(images[:64], np.float32)[..., None] / 255.0
            y0 = train_paths["label"].to_numpy()[:64].astype(np.float32)
            batches = tf.data.Dataset.from_tensors((x0, y0)).cache().repeat()
        else:
            batches = data_mod.make_tf_dataset(images, train_paths["label"], batch_size=64, shuffle=True).repeat()
    elif contender == "authors_flow":
        model, batches = build_model("paper-cnn", channels=3), FlowFromDirectory(data / "train", seed=0)
    else:
        model = build_model("paper-cnn", channels=3)
        batches = keras.utils.image_dataset_from_directory(
            data / "train", labels="inferred", label_mode="binary", color_mode="rgb", image_size=(224, 224),
            batch_size=64, shuffle=True, seed=0, verbose=False).map(lambda x, y: (x / 255.0, y)).repeat()
    model.fit(batches.take(3), epochs=1, verbose=0)  # build, trace, warm caches
    return {"images_per_s": _time_fit(model, batches, steps), "decode_s": decode_s, "precision": precision,
            "n_decoded": n_decoded}


def bench_training(data: Path, steps: int, rounds: int = 2) -> dict:
    """Each contender in its own process, rounds interleaved so drift in machine speed hits all alike;
    each figure is the median over rounds."""
    speeds: dict[str, list[float]] = {name: [] for name in TRAINING_CONTENDERS}
    decode_s = precision = n_decoded = None
    for _ in range(rounds):
        for name in TRAINING_CONTENDERS:
            r = _run_part(f"training:{name}", data=data, extra=["--train-steps", str(steps)])
            speeds[name].append(r["images_per_s"])
            decode_s = r["decode_s"] if r["decode_s"] is not None else decode_s
            n_decoded = r.get("n_decoded") or n_decoded
            precision = r.get("precision") or precision
    out = {name: statistics.median(v) for name, v in speeds.items()}
    return {**out, "decode_s": decode_s, "precision": precision, "n_decoded": n_decoded, "steps": steps, "rounds": rounds,
            "all": {k: [round(x, 1) for x in v] for k, v in speeds.items()}}


def _run_part(part: str, *, data: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench", "--part", part, "--data", str(data), *extra]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"benchmark part {part!r} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- 4. app --------------------------------------------------------------------------------------

def bench_app(sample: Path) -> dict:
    from bench.app import measure_app

    return measure_app(sample)


# --- report --------------------------------------------------------------------------------------

def report(results: dict, command: str, machine_desc: str) -> str:
    rows = ["| # | measure | ours | baseline | ratio | target |", "|---|---|---|---|---|---|"]
    if "latency" in results:
        r = results["latency"]
        rows.append(f"| 1 | single image, probability + Grad-CAM, p50 (ms) | {r['ours_p50']:.1f} | {r['base_p50']:.1f} | "
                    f"{r['base_p50'] / r['ours_p50']:.1f}x faster | ≤ 15 ms, ≥ 5x |")
        rows.append(f"| 1 | same, p95 (ms) | {r['ours_p95']:.1f} | {r['base_p95']:.1f} | "
                    f"{r['base_p95'] / r['ours_p95']:.1f}x faster | |")
    if "folder" in results:
        r = results["folder"]
        rows.append(f"| 2 | folder scoring, probability only (images/s) | {r['ours']:.0f} | {r['base']:.1f} | "
                    f"{r['ours'] / r['base']:.1f}x | ≥ 300 images/s |")
        rows.append(f"| 2 | folder scoring with Grad-CAM (images/s) | {r['ours_cam']:.0f} | | | |")
    if "training" in results:
        r = results["training"]
        rows.append(f"| 3 | paper-cnn training vs the authors' Keras-2 style loader, flow_from_directory (images/s) | "
                    f"{r['ours']:.0f} | {r['authors_flow']:.0f} | {r['ours'] / r['authors_flow']:.2f}x | ≥ 2x |")
        rows.append(f"| 3 | paper-cnn training vs RGB `image_dataset_from_directory`, parallel tf.data decode (images/s) | "
                    f"{r['ours']:.0f} | {r['authors']:.0f} | {r['ours'] / r['authors']:.2f}x | |")
        rows.append(f"| 3 | our input pipeline on plain `model.fit`, without `fast_training` (images/s) | "
                    f"{r['ours_plain']:.0f} | {r['authors_flow']:.0f} | {r['ours_plain'] / r['authors_flow']:.2f}x | |")
        rows.append(f"| 3 | ceiling: our training computation on one in-memory batch, no input pipeline (images/s) | "
                    f"{r['compute_bound']:.0f} | | {r['ours'] / r['compute_bound']:.2f} of ceiling | |")
    if "app" in results:
        r = results["app"]
        rows.append(f"| 4 | `streamlit run` to first page served (s) | {r['start_s']:.1f} | | | |")
        rows.append(f"| 4 | upload to overlay shown, warm (s) | {r['upload_warm_s']:.2f} | | | ≤ 1 s |")
        rows.append(f"| 4 | upload to overlay shown, first upload (s) | {r['upload_cold_s']:.2f} | | | |")
    notes = []
    if "latency" in results:
        r = results["latency"]
        notes.append(f"- Latency: {r['n']} runs of ours, {r['n_base']} of the recipe, from PNG bytes to probability + heatmap; {r['note']}.")
    if "folder" in results:
        r = results["folder"]
        notes.append(f"- Folder: {r['n']} test-split PNGs for ours (decode in threads, batches of 64), {r['n_base']} for the per-file loop.")
    if "training" in results:
        r = results["training"]
        notes.append(f"- Training: each pipeline in its own process; median of {r['rounds']} interleaved rounds of {r['steps']} steps of batch 64 "
                     f"(all rounds, images/s: {r['all']}), after 3 warm-up steps each; ours trains through `fast_training` in {r.get('precision')}; ours decodes the {r['n_decoded']} "
                     f"training images once in {r['decode_s']:.1f} s (not counted above, paid once per run).")
    if "app" in results:
        notes.append(f"- App: {results['app']['note']}")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([f"Measured {stamp} on {machine_desc}.", "", f"Command: `{command}`", "", *rows, "", *notes])


def run_part(part: str, args: argparse.Namespace) -> dict:
    """One measurement, in this process."""
    if part.startswith("training:"):
        return bench_training_one(args.data, args.train_steps, part.split(":", 1)[1])
    from mammo_core.predict import Predictor

    files = test_files(args.data, max(args.folder_images, args.latency_runs))
    if part == "app":
        return bench_app(files[0])
    predictor = Predictor.load(args.model)
    if part == "latency":
        return bench_latency(predictor, files, args.latency_runs)
    return bench_folder(predictor, files[: args.folder_images], args.baseline_images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or directory (default: the active model)")
    parser.add_argument("--data", type=Path, default=os.environ.get("MAMMO_DATA_DIR"), help="dataset (default: $MAMMO_DATA_DIR)")
    parser.add_argument("--latency-runs", type=int, default=100)
    parser.add_argument("--folder-images", type=int, default=1024)
    parser.add_argument("--baseline-images", type=int, default=100)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--only", nargs="*", choices=("latency", "folder", "training", "app"), default=None)
    parser.add_argument("--part", choices=("latency", "folder", "app", *(f"training:{c}" for c in TRAINING_CONTENDERS)),
                        default=None,
                        help=argparse.SUPPRESS)  # internal: run one measurement and print JSON
    parser.add_argument("--write", action="store_true", help=f"replace the results block in {DOC.relative_to(REPO)}")
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("no dataset: pass --data DIR or set MAMMO_DATA_DIR")
    todo = args.only or ["latency", "folder", "training", "app"]

    if args.part:
        print(json.dumps(run_part(args.part, args)))
        return 0

    from mammo_core.registry import resolve_model_dir

    desc = machine()
    model_name = resolve_model_dir(args.model).name
    results: dict = {}
    # Each measurement runs in its own process: TensorFlow state left by one (threads, traced
    # functions, the baseline's many models) must not slow or speed up the next.
    for i, part in enumerate(todo, start=1):
        print(f"{i}/{len(todo)} {part} ...", file=sys.stderr)
        if part == "training":
            results[part] = bench_training(args.data, args.train_steps)
            continue
        results[part] = _run_part(part, data=args.data, extra=[
            "--model", model_name, "--latency-runs", str(args.latency_runs), "--folder-images",
            str(args.folder_images), "--baseline-images", str(args.baseline_images)])
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, command.strip(), desc + f"; model {model_name}")
    print(text)
    if args.write:
        doc = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
        if BEGIN not in doc:
            doc += f"\n{BEGIN}\n{END}\n"
        head, rest = doc.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
