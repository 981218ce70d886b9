"""Where `python -m mammo_core predict FOLDER --json` spends its time (issue 18), in one fresh process.

`python -m bench.cli_profile FOLDER` runs the CLI's steps one after the other with timers, the way
`mammo_core.cli.cmd_predict` runs them, and prints one JSON object:

- start-up: importing TensorFlow and Keras, our modules, listing the inputs, verifying the model
  directory (sha256 of model.keras), loading the Keras model, freezing the compiled call (trace and
  convert the weights to constants), its first call (grappler's rewrites and oneDNN's kernels);
- steady state, each piece alone: decoding (read, PIL, sha256) and `preprocessing.prepare` on one
  thread, the model call alone on prepared batches of 32 (both cores), building and printing the JSON
  rows; then the folder as `Predictor.score_many` does it, with CPU user/system seconds and page faults:
  the current pipeline (decoding threads at most two batches ahead of the model) beside the tf.data
  pipeline it replaced (`score_many_tfdata`, kept here as the baseline), interleaved.

`bench.__main__` runs it as the `cliprofile` part and adds the wall time of the whole process, so
that the interpreter's own start and exit are counted too.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def score_many_tfdata(predictor, items, *, with_cam: bool = False, batch_size: int = 32, workers: int = 2):
    """`Predictor.score_many` as it was before issue 18's profile: decoding threads feeding a tf.data
    `from_generator` pipeline that batches and prefetches (the baseline of the pipeline comparison)."""
    import numpy as np
    import tensorflow as tf

    from mammo_core.config import IMAGE_SIZE

    items = list(items)
    preds = [None] * len(items)

    def decoded():
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, pred in enumerate(pool.map(lambda it: predictor._load(*it), items)):
                preds[i] = pred
                if pred.error is None:
                    yield i, pred.model_input

    ds = tf.data.Dataset.from_generator(
        decoded, output_signature=(tf.TensorSpec((), tf.int64), tf.TensorSpec((IMAGE_SIZE, IMAGE_SIZE), tf.uint8)),
    ).batch(batch_size).prefetch(1)
    emitted = 0
    for index, images in ds.as_numpy_iterator():
        predictor._fill_batch([preds[i] for i in index], images, with_cam)
        ready = int(index[-1]) + 1
        while emitted < ready:
            yield predictor._strip(preds[emitted], False)
            emitted += 1
    while emitted < len(items):
        yield predictor._strip(preds[emitted], False)
        emitted += 1


def _usage() -> tuple[float, float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt


def _delta(a, b, n: int) -> dict:
    return {"wall_s": b[0] - a[0], "user_s": b[1] - a[1], "sys_s": b[2] - a[2], "images_per_s": n / (b[0] - a[0]),
            "page_faults_per_image": (b[3] - a[3]) / n}


def profile(folder: str, *, rounds: int = 2) -> dict:
    marks: dict[str, float] = {}
    last = [T0]

    def mark(name: str) -> None:
        now = time.perf_counter()
        marks[name] = now - last[0]
        last[0] = now

    import numpy as np
    import tensorflow as tf  # noqa: F401
    import keras  # noqa: F401

    mark("import TensorFlow and Keras")
    from mammo_core.data.datasets import expand_inputs
    from mammo_core.inference.predict import Predictor, _decode
    from mammo_core.store import registry

    mark("import mammo_core")
    paths = expand_inputs([folder])
    mark("list the inputs")
    model_dir = registry.resolve_model_dir(None)
    card = registry.verify_model_dir(model_dir)
    mark("verify the model directory (sha256 of model.keras)")
    model = keras.saving.load_model(model_dir / registry.MODEL_FILE, compile=False, safe_mode=True)
    mark("load the Keras model")
    predictor = Predictor(model, card, model_dir)
    mark("build the Predictor")
    if predictor.ensemble is not None:
        predictor.ensemble.function(False)
        mark("freeze the scoring call (trace, weights to constants)")
    first = np.zeros((32, 224, 224), np.uint8)
    predictor.score_arrays(first, with_cam=False)
    mark("first call (grappler rewrites, oneDNN kernels)")
    startup_s = sum(marks.values())

    n = len(paths)
    for f in paths:  # page cache warm: the disk is not what is measured
        f.read_bytes()
    a = _usage()
    decoded = [_decode(f, str(f)) for f in paths]
    b = _usage()
    steady = {"decode (read, PIL, sha256), one thread": _delta(a, b, n)}
    del decoded
    a = _usage()
    prepared = [predictor.prepare_one(f, str(f)) for f in paths]
    b = _usage()
    steady["decode + preprocessing.prepare, one thread"] = _delta(a, b, n)
    good = [p for p in prepared if p.error is None]
    images = np.stack([p.model_input for p in good])
    a = _usage()
    for start in range(0, len(good), 32):
        predictor._fill_batch(good[start:start + 32], images[start:start + 32], False)
    b = _usage()
    steady["model call alone, batches of 32 (both cores)"] = _delta(a, b, len(good))
    a = _usage()
    with open(os.devnull, "w") as sink:
        for p in prepared:
            print(json.dumps(p.to_json(predictor.name)), file=sink, flush=True)
    b = _usage()
    steady["JSON rows built and printed"] = _delta(a, b, n)

    items = [(f, str(f)) for f in paths]
    contenders = {
        "score_many (decoding threads two batches ahead), 2 threads":
            lambda: predictor.score_many(items, with_cam=False, keep_images=False, workers=2),
        "score_many, 1 decoding thread":
            lambda: predictor.score_many(items, with_cam=False, keep_images=False, workers=1),
        "tf.data pipeline (before), 2 threads":
            lambda: score_many_tfdata(predictor, items, workers=2),
    }
    runs: dict[str, list[dict]] = {k: [] for k in contenders}
    reference = None
    for _ in range(rounds):
        for name, run in contenders.items():
            a = _usage()
            out = list(run())
            b = _usage()
            runs[name].append(_delta(a, b, len(out)))
            probs = np.array([p.probability for p in out], dtype=np.float64)
            reference = probs if reference is None else reference
            runs[name][-1]["identical_to_first"] = bool(np.array_equal(probs, reference))
    pipelines = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in runs.items()}
    for k, v in runs.items():
        pipelines[k]["all_images_per_s"] = [round(r["images_per_s"], 1) for r in v]
    from bench.scoring import flops_per_image

    return {"n": n, "startup": marks, "startup_s": startup_s, "steady": steady, "pipelines": pipelines,
            "rounds": rounds, "flops": flops_per_image(predictor.model)["total"], "inside_s": time.perf_counter() - T0}


if __name__ == "__main__":
    print(json.dumps(profile(sys.argv[1], rounds=int(sys.argv[2]) if len(sys.argv) > 2 else 2)))
