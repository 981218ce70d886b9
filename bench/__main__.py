"""`python -m bench`: speed of scoring, training and the app, each beside the baseline a user would otherwise run.

Everything is measured in one run on the same machine:
1. single-image latency, probability + Grad-CAM: our Predictor (one compiled call) vs the keras-io
   recipe (`model.predict`, then `make_gradcam_heatmap` with a GradientTape model built per call);
2. folder scoring throughput: Predictor.score_many in batches vs a loop of `model.predict` per file;
3. training throughput of paper-cnn: our pipeline (1 channel, decoded once, cached in memory) vs the
   authors' (RGB copies decoded from disk every epoch, `image_dataset_from_directory`, batch 64);
4. app: seconds from `streamlit run` to the first page served, and from an upload to the overlay
   shown in headless Chromium (warm).

Results print as a Markdown table; `--write` also replaces the results block of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
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
    from mammo_core.imaging import load_for_model

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
        x = load_for_model(b).astype(np.float32)[None, ..., None] / 255.0
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

    list(score_paths(predictor, files[:64], with_cam=False, keep_images=False, batch_size=64))  # warm
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

def _time_fit(model, ds, steps: int) -> float:
    model.fit(ds.take(3), epochs=1, verbose=0)  # build, trace, warm caches
    t = time.perf_counter()
    model.fit(ds.take(steps), epochs=1, verbose=0)
    return steps * 64 / (time.perf_counter() - t)


def bench_training(data: Path, steps: int) -> dict:
    import keras
    import tensorflow as tf

    from mammo_core import data as data_mod
    from mammo_core.model import build_model

    frame = data_mod.scan_dataset(data)
    train_paths = frame[frame["given_split"] == "train"]
    t = time.perf_counter()
    images = data_mod.load_images(train_paths["path"].tolist())
    decode_s = time.perf_counter() - t
    keras.utils.set_random_seed(0)
    ours_ds = data_mod.make_tf_dataset(images, train_paths["label"], batch_size=64, shuffle=True).repeat()
    ours = _time_fit(build_model("paper-cnn", channels=1), ours_ds, steps)

    authors_ds = keras.utils.image_dataset_from_directory(
        data / "train", labels="inferred", label_mode="binary", color_mode="rgb", image_size=(224, 224),
        batch_size=64, shuffle=True, seed=0, verbose=False,
    ).map(lambda x, y: (x / 255.0, y)).repeat()
    authors = _time_fit(build_model("paper-cnn", channels=3), authors_ds, steps)
    del tf
    return {"ours": ours, "authors": authors, "decode_s": decode_s, "n_decoded": len(images), "steps": steps}


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
        rows.append(f"| 3 | paper-cnn training (images/s) | {r['ours']:.0f} | {r['authors']:.0f} | "
                    f"{r['ours'] / r['authors']:.1f}x | ≥ 2x |")
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
        notes.append(f"- Training: {r['steps']} steps of batch 64 after 3 warm-up steps; ours decodes the {r['n_decoded']} "
                     f"training images once in {r['decode_s']:.1f} s (not counted above, paid once per run).")
    if "app" in results:
        notes.append(f"- App: {results['app']['note']}")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([f"Measured {stamp} on {machine_desc}.", "", f"Command: `{command}`", "", *rows, "", *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or directory (default: the active model)")
    parser.add_argument("--data", type=Path, default=os.environ.get("MAMMO_DATA_DIR"), help="dataset (default: $MAMMO_DATA_DIR)")
    parser.add_argument("--latency-runs", type=int, default=100)
    parser.add_argument("--folder-images", type=int, default=1024)
    parser.add_argument("--baseline-images", type=int, default=100)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--only", nargs="*", choices=("latency", "folder", "training", "app"), default=None)
    parser.add_argument("--write", action="store_true", help=f"replace the results block in {DOC.relative_to(REPO)}")
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("no dataset: pass --data DIR or set MAMMO_DATA_DIR")
    todo = args.only or ["latency", "folder", "training", "app"]

    from mammo_core.predict import Predictor

    desc = machine()
    predictor = Predictor.load(args.model)
    files = test_files(args.data, max(args.folder_images, args.latency_runs))
    results: dict = {}
    if "latency" in todo:
        print("1/4 latency ...", file=sys.stderr)
        results["latency"] = bench_latency(predictor, files, args.latency_runs)
    if "folder" in todo:
        print("2/4 folder throughput ...", file=sys.stderr)
        results["folder"] = bench_folder(predictor, files[: args.folder_images], args.baseline_images)
    if "training" in todo:
        print("3/4 training throughput ...", file=sys.stderr)
        results["training"] = bench_training(args.data, args.train_steps)
    if "app" in todo:
        print("4/4 app ...", file=sys.stderr)
        results["app"] = bench_app(files[0])
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, command.strip(), desc + f"; model {predictor.name}")
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
