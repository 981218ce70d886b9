"""`python -m bench`: speed of scoring, training and the app, each beside the baseline a user would otherwise run.

Everything is measured in one run on the same machine, on the default (active) model, with the fine-tuned
ensemble's single member and `paper-cnn-grouped-split` beside it, and against the machine's measured peak
(a large matrix product) for the model's FLOPs per image (`bench.scoring`):
0. the peak, FLOPs per image, and the scoring options against each other (frozen weights, bfloat16,
   batch sizes, decoding threads);
1. single-image latency, probability + Grad-CAM: our Predictor (one compiled call) vs the keras-io
   recipe (`model.predict`, then `make_gradcam_heatmap` with a GradientTape model built per call);
2. folder scoring throughput: Predictor.score_many in batches vs a loop of `model.predict` per file, and
   `python -m mammo_core predict` on the whole test folder end to end (start-up included);
3. training throughput of paper-cnn: ours (1 channel, decoded once and cached in memory, trained through
   `fast_training`) vs the authors' (RGB copies decoded from disk every epoch, batch 64), with ours on
   plain `model.fit` and the compute ceiling alongside to show where the gain comes from; and the
   fine-tuning recipe's training images/s beside full fine-tuning (`bench.finetune`);
4. app: seconds from `streamlit run` to the first page served, and from an upload to the overlay
   shown in headless Chromium (warm);
5. test-time augmentation (`--only tta`, issue 12): the ensemble's single image + Grad-CAM and folder
   throughput without and with its 8 views (`bench.scoring.compare_tta`).

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


PAPER_MODEL = "paper-cnn-grouped-split"
#: Models every scoring row runs on: the default (active) model, one member of it alone (fine-tuned
#: ensembles only), and paper-cnn beside them.
ROLES = ("default", "member", "paper")


def model_facts(predictor) -> dict:
    """Name, FLOPs per image (forward; forward + Grad-CAM's backward pass) and arithmetic of a Predictor."""
    from bench.scoring import flops_per_image

    forward = flops_per_image(predictor.model)["total"]
    if predictor.ensemble is not None:  # the backward pass runs through the members only (input gradients)
        from mammo_core.training.finetune import TRUNK_NAME

        backward = forward - flops_per_image(predictor.model.get_layer(TRUNK_NAME))["total"]
        precision = predictor.ensemble.precision
    else:  # Grad-CAM's backward pass runs through the dense head only
        backward = flops_per_image(predictor.model)["by_type"].get("Dense", 0.0)
        precision = "float32"
    return {"model": predictor.name, "flops": forward, "flops_cam": forward + backward, "precision": precision}


def load_role(role: str, model: str | None):
    """The Predictor for a role (None: the role does not apply, e.g. `member` for a single model)."""
    from mammo_core.inference.predict import Predictor

    if role == "paper":
        return Predictor.load(PAPER_MODEL)
    predictor = Predictor.load(model)
    if role == "member":
        if predictor.ensemble is None:
            return None
        from bench.scoring import single_member

        return single_member(predictor, 0)
    return predictor


# --- 0. the machine's peak, and the scoring options against each other -------------------------


def bench_peak() -> dict:
    from bench.scoring import peak_gflops
    from mammo_core.models.fast_training import cpu_has_native_bfloat16

    return {"float32": peak_gflops("float32"),
            "bfloat16": peak_gflops("bfloat16") if cpu_has_native_bfloat16() else None}


def prepared_images(predictor, files: list[Path]) -> np.ndarray:
    return np.stack([predictor.prepare_one(f, str(f)).model_input for f in files])


def bench_options(predictor, files: list[Path]) -> dict:
    """The compiled-call options of the default model (ensembles), on prepared test images."""
    from bench.scoring import compare_options

    if predictor.ensemble is None:
        return {"skipped_reason": f"{predictor.name} is not a fine-tuned ensemble"}
    return {**compare_options(predictor, prepared_images(predictor, files)), **model_facts(predictor)}


#: Process-wide oneDNN / TensorFlow settings tried on the frozen float32 scorer, each in its own process.
ONEDNN_SETTINGS: dict[str, dict[str, str]] = {
    "defaults (oneDNN on, 2 intra-op threads)": {},
    "TF_ONEDNN_ASSUME_FROZEN_WEIGHTS=1": {"TF_ONEDNN_ASSUME_FROZEN_WEIGHTS": "1"},
    "TF_ENABLE_ONEDNN_OPTS=0 (Eigen kernels)": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "TF_NUM_INTEROP_THREADS=1": {"TF_NUM_INTEROP_THREADS": "1"},
}


def bench_onednn_one(predictor, files: list[Path]) -> dict:
    """The default model's scoring call alone in this process (its settings come from the environment)."""
    images = prepared_images(predictor, files)
    scorer = predictor.ensemble
    if scorer is None:
        return {}
    scorer(images[:1], with_cam=True)
    scorer(images[:32], with_cam=False)
    lat = []
    for i in range(20):
        t = time.perf_counter()
        scorer(images[i % len(images)][None], with_cam=True)
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    n = 0
    for start in range(0, len(images) - 31, 32):
        scorer(images[start:start + 32], with_cam=False)
        n += 32
    return {"latency_ms": percentile(lat, 50) * 1e3, "images_per_s": n / (time.perf_counter() - t)}


def bench_onednn(data: Path, extra: list[str], rounds: int = 2) -> dict:
    out = {name: {"latency_ms": [], "images_per_s": []} for name in ONEDNN_SETTINGS}
    for _ in range(rounds):
        for name, env in ONEDNN_SETTINGS.items():
            r = _run_part("onednn-one", data=data, extra=extra, env=env)
            if not r:
                return {}
            for key in ("latency_ms", "images_per_s"):
                out[name][key].append(r[key])
    return {"settings": {k: {"latency_ms": min(v["latency_ms"]), "images_per_s": max(v["images_per_s"])}
                         for k, v in out.items()}, "rounds": rounds}


def bench_decode(predictor, files: list[Path], rounds: int = 2) -> dict:
    """Folder scoring (no Grad-CAM) end to end after start-up, by decoding threads and batch size; best of
    interleaved rounds."""
    from mammo_core.inference.predict import score_paths

    for f in files:
        f.read_bytes()
    settings = [(1, 32), (2, 32), (3, 32), (4, 32), (2, 16), (2, 64), (3, 64)]
    list(score_paths(predictor, files[:96], with_cam=False, keep_images=False, batch_size=32))  # warm
    best = {f"{w} threads, batch {b}": 0.0 for w, b in settings}
    for _ in range(rounds):
        for w, b in settings:
            t = time.perf_counter()
            n = len(list(score_paths(predictor, files, with_cam=False, keep_images=False, batch_size=b, workers=w)))
            best[f"{w} threads, batch {b}"] = max(best[f"{w} threads, batch {b}"], n / (time.perf_counter() - t))
    # preprocessing alone, one thread: what each image costs before the model
    t = time.perf_counter()
    for f in files[:200]:
        predictor.prepare_one(f, str(f))
    prep_ms = (time.perf_counter() - t) / min(200, len(files)) * 1e3
    return {"images_per_s": best, "n": len(files), "rounds": rounds, "prepare_ms": prep_ms, **model_facts(predictor)}


def bench_cli(model: str, data: Path) -> dict:
    """`python -m mammo_core predict $DATA/test --json` end to end (start-up included), peak RSS."""
    import resource

    folder = data / "test"
    files = sorted(folder.rglob("*.png"))
    for f in files:
        f.read_bytes()
    cmd = [sys.executable, "-m", "mammo_core", "predict", str(folder), "--model", model, "--json"]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"predict failed: {out.stderr[-2000:]}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 / 1024  # kB on Linux
    return {"seconds": wall, "n": len(rows), "errors": sum("error" in r for r in rows), "rss_gb": rss_gb,
            "images_per_s": len(rows) / wall, "model": Path(model).name, "command": " ".join(["python", *cmd[1:4], "$MAMMO_DATA_DIR/test", "--model",
                                                          Path(model).name, "--json"])}


def bench_cli_profile(data: Path) -> dict:
    """`bench.cli_profile` on the test folder in a fresh process (start-up pieces, steady-state pieces,
    pipelines interleaved), with the process's wall time from start to exit."""
    cmd = [sys.executable, "-m", "bench.cli_profile", str(data / "test")]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"cli_profile failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    # the interpreter's own start (before bench.cli_profile's first line) and its exit
    result["startup"] = {"Python start and exit": wall - result["inside_s"], **result["startup"]}
    return result


def bench_finetune(steps: int) -> dict:
    from bench.finetune import measure

    return measure(steps=steps, rounds=2)


# --- 1. single-image latency ---------------------------------------------------------------------


def keras_io_gradcam(img_array, model, last_conv_layer_name):
    """keras-io examples/vision/grad_cam.py `make_gradcam_heatmap`, as published (grad model built per call)."""
    import keras

    grad_model = keras.models.Model(model.inputs, [model.get_layer(last_conv_layer_name).output, model.output])
    return recipe_heatmap(grad_model, img_array)


def recipe_heatmap(grad_model, img_array):
    """The body of keras-io's `make_gradcam_heatmap` on a grad model giving (feature map, predictions)."""
    import tensorflow as tf

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
    from mammo_core.inference.explain import find_last_conv_layer
    from mammo_core.io.images import load_image
    from mammo_core.io.preprocessing import model_input

    blobs = [f.read_bytes() for f in files[:n]]
    t = time.perf_counter()
    predictor.score_one(blobs[0], name="warm")  # traces (and freezes) the compiled call
    first_s = time.perf_counter() - t
    ours = []
    for b in blobs:
        t = time.perf_counter()
        pred = predictor.score_one(b, name="x")
        ours.append(time.perf_counter() - t)
        assert pred.error is None and pred.heatmap is not None

    model = predictor.model
    if predictor.ensemble is not None:
        from bench.scoring import keras_io_gradcam_ensemble

        recipe_model, note = model, "recipe on the ensemble's mean logit at the trunk output (its Grad-CAM layer)"
        recipe = lambda x: keras_io_gradcam_ensemble(x, recipe_model)  # noqa: E731
    else:
        try:
            keras_io_gradcam(np.zeros((1, 224, 224, predictor.channels), np.float32), model, find_last_conv_layer(model))
            recipe_model, note = model, "recipe on the model as saved"
        except Exception as exc:  # the recipe's known failure on Sequential models
            recipe_model, note = functional_copy(model), f"recipe fails on the Sequential model ({type(exc).__name__}); run on a functional copy"
        layer = find_last_conv_layer(recipe_model)
        recipe = lambda x: keras_io_gradcam(x, recipe_model, layer)  # noqa: E731
    base = []
    for b in blobs[: max(10, n // 4)]:  # the baseline is slow; fewer runs suffice for its percentiles
        t = time.perf_counter()
        x = model_input(load_image(b).pixels, predictor.preprocessing).astype(np.float32)[None, ..., None] / 255.0
        x = np.repeat(x, predictor.channels, axis=-1)
        recipe_model.predict(x, verbose=0)
        recipe(x)
        base.append(time.perf_counter() - t)
    return {"ours_p50": percentile(ours, 50) * 1e3, "ours_p95": percentile(ours, 95) * 1e3,
            "base_p50": percentile(base, 50) * 1e3, "base_p95": percentile(base, 95) * 1e3,
            "n": len(ours), "n_base": len(base), "note": note, "first_s": first_s, **model_facts(predictor)}


def bench_tta(predictor, files: list[Path], latency_runs: int, folder_images: int) -> dict:
    """The default model without and with test-time augmentation (fine-tuned ensembles only)."""
    from bench.scoring import compare_tta

    if predictor.ensemble is None:
        return {"skipped_reason": f"{predictor.name} is not a fine-tuned ensemble (test-time augmentation is offered for those only)"}
    return {**compare_tta(predictor, files, latency_runs=latency_runs, folder_images=folder_images), **model_facts(predictor)}


# --- 2. folder throughput ------------------------------------------------------------------------


def bench_folder(predictor, files: list[Path], n_base: int) -> dict:
    import keras

    from mammo_core.inference.predict import score_paths

    for f in files:  # page cache warm for every contender: we measure scoring, not the disk
        f.read_bytes()
    list(score_paths(predictor, files[:128], with_cam=False, keep_images=False, batch_size=64))  # warm: traced and frozen
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
    return {"ours": ours, "ours_cam": ours_cam, "base": base, "n": len(files), "n_base": n_base, **model_facts(predictor)}


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

    from mammo_core.data.datasets import scan_dataset
    from mammo_core.data.pipeline import load_images, make_tf_dataset
    from mammo_core.models.architectures import build_model

    keras.utils.set_random_seed(0)
    decode_s, precision, n_decoded = None, None, None
    if contender in ("ours", "ours_plain", "compute_bound"):
        from mammo_core.models.architectures import get_architecture
        from mammo_core.models.fast_training import training_model

        frame = scan_dataset(data)
        train_paths = frame[frame["given_split"] == "train"]
        t = time.perf_counter()
        images = load_images(train_paths["path"].tolist())
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
            batches = make_tf_dataset(images, train_paths["label"], batch_size=64, shuffle=True).repeat()
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


def _run_part(part: str, *, data: Path, extra: list[str], env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, "-m", "bench", "--part", part, "--data", str(data), *extra]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"benchmark part {part!r} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- 4. app --------------------------------------------------------------------------------------


def bench_app(sample: Path, model: str | None = None, trace: bool = False) -> dict:
    from bench.app import measure_app

    return measure_app(sample, model=model, trace=trace)


# --- report ---------------------------------------------------------------------------------------


def _pct(images_per_s: float | None, flops: float, peak: float | None) -> str:
    if not images_per_s or not peak:
        return ""
    return f"{images_per_s * flops / peak / 1e9:.1%}"


def _peak_for(results: dict, facts: dict) -> float | None:
    peak = results.get("peak") or {}
    return peak.get("bfloat16") if facts.get("precision") == "bfloat16" else peak.get("float32")


def report(results: dict, command: str, machine_desc: str, default_name: str) -> str:
    rows = ["| # | measure | model | ours | baseline | ratio | of peak | target |", "|---|---|---|---|---|---|---|---|"]
    peak = results.get("peak") or {}
    label = {"default": "default", "member": "1 member", "paper": "paper-cnn"}
    for role in ROLES:
        r = results.get(f"latency:{role}")
        if not r:
            continue
        target = "≤ 15 ms, ≥ 10x" if role == "default" else ""
        per_s = 1e3 / r["ours_p50"]
        rows.append(f"| 1 | single image, probability + Grad-CAM, p50 (ms) | {label[role]} | {r['ours_p50']:.1f} | "
                    f"{r['base_p50']:.1f} | {r['base_p50'] / r['ours_p50']:.1f}x faster | "
                    f"{_pct(per_s, r['flops_cam'], _peak_for(results, r))} | {target} |")
        rows.append(f"| 1 | same, p95 (ms) | {label[role]} | {r['ours_p95']:.1f} | {r['base_p95']:.1f} | "
                    f"{r['base_p95'] / r['ours_p95']:.1f}x faster | | |")
    for role in ROLES:
        r = results.get(f"folder:{role}")
        if not r:
            continue
        pk = _peak_for(results, r)
        rows.append(f"| 2 | folder scoring, probability only (images/s) | {label[role]} | {r['ours']:.0f} | {r['base']:.1f} | "
                    f"{r['ours'] / r['base']:.1f}x | {_pct(r['ours'], r['flops'], pk)} | |")
        rows.append(f"| 2 | folder scoring with Grad-CAM (images/s) | {label[role]} | {r['ours_cam']:.0f} | | | "
                    f"{_pct(r['ours_cam'], r['flops_cam'], pk)} | |")
    for role in ("default", "paper"):
        r = results.get(f"cli:{role}")
        if not r:
            continue
        facts = results.get(f"folder:{role}") or results.get(f"latency:{role}") or {}
        rows.append(f"| 2 | `mammo_core predict` on the {r['n']:,} test images, end to end with start-up (images/s) | "
                    f"{label[role]} | {r['images_per_s']:.0f} ({r['seconds']:.1f} s, {r['rss_gb']:.2f} GB peak RSS) | | | "
                    f"{_pct(r['images_per_s'], facts.get('flops', 0), _peak_for(results, facts))} | "
                    f"{'≥ 300 images/s' if role == 'default' else ''} |")
    if "training" in results:
        r = results["training"]
        rows.append(f"| 3 | paper-cnn training vs the authors' Keras-2 style loader, flow_from_directory (images/s) | paper-cnn | "
                    f"{r['ours']:.0f} | {r['authors_flow']:.0f} | {r['ours'] / r['authors_flow']:.2f}x | | ≥ 2x |")
        rows.append(f"| 3 | paper-cnn training vs RGB `image_dataset_from_directory`, parallel tf.data decode (images/s) | paper-cnn | "
                    f"{r['ours']:.0f} | {r['authors']:.0f} | {r['ours'] / r['authors']:.2f}x | | |")
        rows.append(f"| 3 | our input pipeline on plain `model.fit`, without `fast_training` (images/s) | paper-cnn | "
                    f"{r['ours_plain']:.0f} | {r['authors_flow']:.0f} | {r['ours_plain'] / r['authors_flow']:.2f}x | | |")
        rows.append(f"| 3 | ceiling: our training computation on one in-memory batch, no input pipeline (images/s) | paper-cnn | "
                    f"{r['compute_bound']:.0f} | | {r['ours'] / r['compute_bound']:.2f} of ceiling | | |")
    if "finetune" in results:
        r = results["finetune"]
        full = r["rows"][r["full"]]["images_per_s"]
        for name, row in r["rows"].items():
            if name == r["full"]:
                continue
            rows.append(f"| 3 | training step, {name} (images/s) | EfficientNet-Lite0 | {row['images_per_s']:.1f} | "
                        f"{full:.1f} (full fine-tuning) | {row['images_per_s'] / full:.1f}x | | |")
    if "app" in results:
        r = results["app"]
        rows.append(f"| 4 | `streamlit run` to first page served (s) | default | {r['start_s']:.1f} | | | | |")
        rows.append(f"| 4 | upload to overlay shown, warm (s) | default | {r['upload_warm_s']:.2f} | | | | ≤ 0.5 s |")
        rows.append(f"| 4 | upload to overlay shown, first upload (s) | default | {r['upload_cold_s']:.2f} | | | | |")

    notes = []
    facts = {role: results.get(f"latency:{role}") or results.get(f"folder:{role}") for role in ROLES}
    model_lines = [f"{label[role]} = `{f['model']}`, {f['flops'] / 1e9:.3f} GFLOP per image forward, "
                   f"{f['flops_cam'] / 1e9:.3f} with Grad-CAM's backward pass, scored in {f['precision']}"
                   for role, f in facts.items() if f]
    if model_lines:
        notes.append("- Models: " + "; ".join(model_lines) + ". FLOPs = 2 x multiply-adds of the convolutions and "
                     "Dense layers (BatchNorm, activations, pooling left out).")
    if peak:
        bf = f", bfloat16 {peak['bfloat16']:.0f}" if peak.get("bfloat16") else " (no native bfloat16)"
        notes.append(f"- Peak: best GFLOP/s of a 2048 x 2048 x 2048 TensorFlow matrix product, float32 {peak['float32']:.0f}{bf}. "
                     "\"of peak\" = images/s x FLOPs per image / the peak of the arithmetic the model ran in.")
    for role in ROLES:
        r = results.get(f"latency:{role}")
        if r:
            notes.append(f"- Latency ({label[role]}): {r['n']} runs of ours, {r['n_base']} of the recipe, from PNG bytes to "
                         f"probability + heatmap; {r['note']}; first call (tracing and freezing) {r['first_s']:.1f} s.")
    r = results.get("folder:default")
    if r:
        notes.append(f"- Folder: {r['n']} test-split PNGs for ours (decode in threads, batches of 64, 32 with Grad-CAM), "
                     f"{r['n_base']} for the per-file loop; page cache warm.")
    for role in ("default", "paper"):
        r = results.get(f"cli:{role}")
        if r:
            notes.append(f"- End to end ({label[role]}): `{r['command']}` in a fresh process, wall time from start to exit, "
                         f"{r['n']} rows ({r['errors']} errors).")
    if "training" in results:
        r = results["training"]
        notes.append(f"- Training: each pipeline in its own process; median of {r['rounds']} interleaved rounds of {r['steps']} steps of batch 64 "
                     f"(all rounds, images/s: {r['all']}), after 3 warm-up steps each; ours trains through `fast_training` in {r.get('precision')}; ours decodes the {r['n_decoded']} "
                     f"training images once in {r['decode_s']:.1f} s (not counted above, paid once per run).")
    if "finetune" in results:
        r = results["finetune"]
        notes.append(f"- Fine-tuning: `bench.finetune`, one training step on a batch of {r['batch']} (random data), best of "
                     f"{r['rounds']} interleaved rounds of {r['steps']} steps; the recipe trains the upper part from cached "
                     "trunk activations (its cut is in the model card).")
    if "app" in results:
        notes.append(f"- App: {results['app']['note']}")

    extra = []
    o = results.get("options")
    if o and "options" in o:
        pk = _peak_for(results, {"precision": "float32"})
        bs = o["batch_sizes"]
        extra += ["", f"Scoring options of the default model, in one process on {o['n_images']} prepared test images "
                  "(model call only, no decoding), best of interleaved rounds:", "",
                  "| option | 1 image + Grad-CAM p50 (ms) | " + " | ".join(f"batch {b} images/s" for b in bs) +
                  " | batch 32 + Grad-CAM images/s | max probability diff vs float32 | Grad-CAM max diff (min corr.) | first calls (s) |",
                  "|---|---|" + "---|" * len(bs) + "---|---|---|---|"]
        for name, row in o["options"].items():
            pk = _peak_for(results, {"precision": "bfloat16" if "bfloat16" in name else "float32"})
            cells = " | ".join(f"{row[f'plain_b{b}_best']:.0f} ({_pct(row[f'plain_b{b}_best'], o['flops'], pk)})" for b in bs)
            extra.append(f"| {name}: {row['description']} | {row['latency_ms_best']:.1f} | {cells} | {row['cam_b32_best']:.0f} | "
                         f"{row['max_prob_diff']:.1e} | {row['cam_max_diff']:.3f} ({row['cam_min_corr']:.4f}) | {row['first_calls_s']:.1f} |")
        if o.get("skipped"):
            extra.append(f"\nNot measured (no native bfloat16 on this CPU): {', '.join(o['skipped'])}.")
    pr = results.get("profile")
    if pr:
        pk = _peak_for(results, {"precision": "float32"})
        extra += ["", "Where the default model's time goes: each piece of its scoring call frozen and timed alone "
                  "(float32), milliseconds per image and the fraction of the float32 peak it reaches:", "",
                  "| piece | GFLOP per image | batch 1: ms | of peak | batch 32: ms per image | of peak |",
                  "|---|---|---|---|---|---|"]
        for name, row in pr["pieces"].items():
            extra.append(f"| {name} | {row['flops'] / 1e9:.3f} | {row['b1_ms_per_image']:.1f} | "
                         f"{_pct(1e3 / row['b1_ms_per_image'], row['flops'], pk)} | {row['b32_ms_per_image']:.2f} | "
                         f"{_pct(1e3 / row['b32_ms_per_image'], row['flops'], pk)} |")
        extra.append(f"| decode a test PNG (one thread) | | {pr['decode_ms']:.2f} | | | |")
        extra.append(f"| `preprocessing.prepare` (breast mask, crop, flip, intensity; one thread) | | {pr['prepare_ms']:.2f} | | | |")
    e = results.get("onednn")
    if e:
        extra += ["", f"oneDNN / TensorFlow settings, each in its own process (default model, frozen float32, best of "
                  f"{e['rounds']} interleaved rounds):", "", "| setting | 1 image + Grad-CAM p50 (ms) | batch 32 images/s |",
                  "|---|---|---|"]
        extra += [f"| {k} | {v['latency_ms']:.1f} | {v['images_per_s']:.0f} |" for k, v in e["settings"].items()]
    d = results.get("decode")
    if d:
        extra += ["", f"Decoding threads and batch size, `Predictor.score_many` on {d['n']} test PNGs without Grad-CAM "
                  f"(default model, best of {d['rounds']} interleaved rounds; preprocessing alone costs "
                  f"{d['prepare_ms']:.1f} ms per image on one thread):", "",
                  "| setting | images/s |", "|---|---|"]
        extra += [f"| {k} | {v:.0f} |" for k, v in d["images_per_s"].items()]
    extra += cli_profile_lines(results)
    extra += tta_lines(results.get("tta"))
    extra += app_trace_lines(results.get("apptrace"))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([f"Measured {stamp} on {machine_desc}.", "", f"Default (active) model: `{default_name}`; "
                      f"paper-cnn = `{PAPER_MODEL}`.", "", f"Command: `{command}`", "", *rows, "", *notes, *extra])


def cli_profile_lines(results: dict) -> list[str]:
    """The `cliprofile` part as a table: each piece's seconds, its share of the end-to-end run, and for
    the model call the fraction of the float32 peak."""
    c = results.get("cliprofile")
    if not c:
        return []
    peak = (results.get("peak") or {}).get("float32")
    flops = c.get("flops") or (results.get("folder:default") or results.get("latency:default") or {}).get("flops")
    best = max(c["pipelines"].values(), key=lambda r: r["images_per_s"])
    total = c["startup_s"] + c["startup"]["Python start and exit"] + best["wall_s"]
    n = c["n"]
    lines = ["", f"Where `mammo_core predict` spends its time on the {n:,} test images (`bench.cli_profile`, one "
             f"fresh process; end to end = start-up + the best pipeline = {total:.1f} s, {n / total:.0f} images/s):", "",
             "| piece | seconds | share of end to end | of float32 peak |", "|---|---|---|---|"]
    for name, sec in c["startup"].items():
        lines.append(f"| start-up: {name} | {sec:.2f} | {sec / total:.0%} | |")
    for name, r in c["steady"].items():
        pk = (f"{r['images_per_s'] * flops / peak / 1e9:.0%}" if peak and flops and name.startswith("model") else "")
        lines.append(f"| alone: {name} | {r['wall_s']:.2f} (user {r['user_s']:.1f}, sys {r['sys_s']:.1f}) | "
                     f"{r['wall_s'] / total:.0%} | {pk} |")
    for name, r in c["pipelines"].items():
        pk = f"{r['images_per_s'] * flops / peak / 1e9:.0%}" if peak and flops else ""
        lines.append(f"| folder: {name}, {r['images_per_s']:.0f} images/s (rounds {r['all_images_per_s']}) | "
                     f"{r['wall_s']:.2f} (user {r['user_s']:.1f}, sys {r['sys_s']:.1f}, {r['page_faults_per_image']:.0f} "
                     f"page faults per image) | {r['wall_s'] / total:.0%} | {pk} |")
    return lines


def tta_lines(r: dict | None) -> list[str]:
    """The `tta` part: the default model without and with test-time augmentation, side by side."""
    if not r or "arms" not in r:
        return []
    none, tta = r["arms"]["none"], r["arms"]["dihedral8"]
    lines = ["", f"Test-time augmentation of the default model (`predict --tta`: member logits averaged over 8 views, flips "
             f"and 90° rotations; Grad-CAM of the plain view), in one process, best of {r['rounds']} interleaved rounds; "
             f"single image from PNG bytes over {r['n_latency']} test images, folder = `score_paths` on {r['n_folder']} "
             f"test PNGs, batches of 64 (with the 8 views, 8 images = 64 views per compiled call), no Grad-CAM; largest "
             f"change of a probability {r['max_probability_change']:.3f}:", "",
             "| scoring | 1 image + Grad-CAM p50 (ms) | folder images/s | first calls (s) |", "|---|---|---|---|"]
    for name, row in (("plain view (default)", none), ("8 views (`--tta`)", tta)):
        lines.append(f"| {name} | {row['latency_ms_best']:.1f} | {row['folder_images_per_s_best']:.1f} | "
                     f"{row['first_calls_s']:.1f} |")
    lines.append(f"| cost of the 8 views | {tta['latency_ms_best'] / none['latency_ms_best']:.1f}x | "
                 f"{none['folder_images_per_s_best'] / tta['folder_images_per_s_best']:.1f}x slower | |")
    return lines


def app_trace_lines(r: dict | None) -> list[str]:
    if not r or "pieces" not in r:
        return []
    one = r["pieces"].get("median upload") or {}
    lines = ["", "Where a warm upload's time goes (`--only apptrace`: the server started through `bench.app_trace`; "
             f"the upload with the median total of {len(r['upload_warm_all_s'])}, and the median of each piece; "
             "server pieces are parts of the script run):", "",
             "| piece | median upload (s) | median of the piece (s) |", "|---|---|---|"]
    for k, v in r["pieces"].items():
        if k == "median upload":
            continue
        whole = k.endswith("(bytes)") or k == "script runs in this span"
        cell = (lambda x: f"{x:,.0f}") if whole else (lambda x: f"{x:.3f}")
        lines.append(f"| {k} | {cell(one.get(k, 0.0))} | {cell(v)} |")
    return lines


PARTS = ("peak", "options", "profile", "onednn", "latency", "folder", "cli", "cliprofile", "decode", "finetune",
         "training", "app", "apptrace", "tta")


def run_part(part: str, args: argparse.Namespace) -> dict | None:
    """One measurement, in this process."""
    if part.startswith("training:"):
        return bench_training_one(args.data, args.train_steps, part.split(":", 1)[1])
    if part == "peak":
        return bench_peak()
    if part == "finetune":
        return bench_finetune(args.finetune_steps)
    if part.startswith("cli:"):
        return bench_cli(PAPER_MODEL if part == "cli:paper" else args.model, args.data)
    if part == "cliprofile":
        return bench_cli_profile(args.data)
    files = test_files(args.data, max(args.folder_images, args.latency_runs))
    if part in ("app", "apptrace"):
        from mammo_core.store.registry import resolve_model_dir

        return bench_app(files[0], resolve_model_dir(args.model).name, trace=part == "apptrace")
    name, _, role = part.partition(":")
    predictor = load_role(role or "default", args.model)
    if predictor is None:
        return None
    if name == "latency":
        return bench_latency(predictor, files, args.latency_runs)
    if name == "options":
        return bench_options(predictor, files[: args.option_images])
    if name == "decode":
        return bench_decode(predictor, files[: args.decode_images])
    if name == "profile":
        if predictor.ensemble is None:
            return None
        from bench.scoring import profile_pieces

        some = files[: args.option_images]
        return profile_pieces(predictor, prepared_images(predictor, some[:32]), some)
    if name == "onednn-one":
        return bench_onednn_one(predictor, files[: args.option_images])
    if name == "tta":
        return bench_tta(predictor, files, args.latency_runs, args.folder_images)
    return bench_folder(predictor, files[: args.folder_images], args.baseline_images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or directory (default: the active model)")
    parser.add_argument("--data", type=Path, default=os.environ.get("MAMMO_DATA_DIR"), help="dataset (default: $MAMMO_DATA_DIR)")
    parser.add_argument("--latency-runs", type=int, default=100)
    parser.add_argument("--folder-images", type=int, default=1024)
    parser.add_argument("--baseline-images", type=int, default=100)
    parser.add_argument("--option-images", type=int, default=128)
    parser.add_argument("--decode-images", type=int, default=512)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--finetune-steps", type=int, default=6)
    parser.add_argument("--only", nargs="*", choices=PARTS, default=None)
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one measurement, print JSON
    parser.add_argument("--write", action="store_true", help=f"replace the results block in {DOC.relative_to(REPO)}")
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("no dataset: pass --data DIR or set MAMMO_DATA_DIR")
    todo = args.only or list(PARTS)

    if args.part:
        print(json.dumps(run_part(args.part, args)))
        return 0

    from mammo_core.store.registry import resolve_model_dir

    desc = machine()
    model_dir = resolve_model_dir(args.model)
    model_name = model_dir.name
    results: dict = {}
    common = ["--model", str(model_dir), "--latency-runs", str(args.latency_runs), "--folder-images", str(args.folder_images),
              "--baseline-images", str(args.baseline_images), "--option-images", str(args.option_images),
              "--decode-images", str(args.decode_images), "--finetune-steps", str(args.finetune_steps)]
    # Each measurement runs in its own process: TensorFlow state left by one (threads, traced
    # functions, the baseline's many models) must not slow or speed up the next.
    for i, part in enumerate(todo, start=1):
        print(f"{i}/{len(todo)} {part} ...", file=sys.stderr)
        if part == "training":
            results[part] = bench_training(args.data, args.train_steps)
        elif part in ("latency", "folder"):
            for role in ROLES:
                results[f"{part}:{role}"] = _run_part(f"{part}:{role}", data=args.data, extra=common)
        elif part == "onednn":
            results[part] = bench_onednn(args.data, common)
        elif part == "cli":
            for role in ("default", "paper"):
                results[f"cli:{role}"] = _run_part(f"cli:{role}", data=args.data, extra=common)
        else:
            results[part] = _run_part(part, data=args.data, extra=common)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, command.strip(), desc, model_name)
    print(text)
    import tempfile

    (Path(tempfile.gettempdir()) / "mammo-bench-last.json").write_text(json.dumps(results, indent=1))
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
