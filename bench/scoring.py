"""Physical reference and scoring options for `python -m bench` (issue 18).

- `flops_per_image`: multiply-add FLOPs (2 per multiply-add) of every convolution and Dense layer of a
  Keras model, nested models included (BatchNorm, activations and pooling are memory-bound and left out);
- `peak_gflops`: the machine's measured peak for that arithmetic, a large matrix product in float32 and,
  where the CPU has it, bfloat16;
- `single_member`: a one-member model cut from a fine-tuned ensemble (same trunk, member `index`), scored
  through the same `Predictor` path, to put the ensemble beside one model;
- `keras_io_gradcam_ensemble`: the keras-io recipe on the ensemble (grad model built per call);
- `compare_options`: the scoring options against each other in one process, interleaved, on the same
  prepared test images: speed and the largest difference from the float32 reference;
- `compare_tta`: the ensemble without and with test-time augmentation (8 views, issue 12), single image +
  Grad-CAM and folder throughput side by side.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

#: The scoring options `compare_options` measures: name -> (EnsembleScorer keyword arguments, description).
OPTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "traced-float32": ({"frozen": False, "precision": "float32"},
                       "traced tf.function, weights as variables (the scorer before issue 18)"),
    "frozen-float32": ({"frozen": True, "precision": "float32"},
                       "weights frozen into constants: BatchNorm folded, conv + bias + ReLU6 fused"),
    "frozen-bfloat16": ({"frozen": True, "precision": "bfloat16"},
                        "frozen + grappler's oneDNN automatic mixed precision (bfloat16)"),
}


def _layers(model: Any):
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _layers(layer)
        else:
            yield layer


def flops_per_image(model: Any) -> dict[str, float]:
    """{"total": FLOPs of one image, "by_type": {layer type: FLOPs}}: 2 x multiply-adds of Conv2D,
    DepthwiseConv2D and Dense layers, from their kernels and output shapes."""
    by_type: dict[str, float] = {}
    for layer in _layers(model):
        kind = type(layer).__name__
        if kind not in ("Conv2D", "DepthwiseConv2D", "Dense"):
            continue
        kernel = np.asarray(layer.kernel.shape)
        out = [int(d) for d in layer.output.shape[1:-1]]  # spatial positions (none for Dense)
        positions = float(np.prod(out)) if out else 1.0
        if kind == "DepthwiseConv2D":
            macs = positions * kernel[0] * kernel[1] * kernel[2] * kernel[3]
        else:  # Conv2D (kh, kw, cin, cout) and Dense (in, out): every kernel entry once per position
            macs = positions * float(np.prod(kernel))
        by_type[kind] = by_type.get(kind, 0.0) + 2.0 * float(macs)
    return {"total": sum(by_type.values()), "by_type": by_type}


def peak_gflops(dtype: str = "float32", n: int = 2048, seconds: float = 2.0) -> float:
    """Best GFLOP/s of an n x n x n matrix product in `dtype` (TensorFlow, oneDNN), over `seconds`."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a = tf.constant(rng.random((n, n), dtype=np.float32))
    b = tf.constant(rng.random((n, n), dtype=np.float32))
    if dtype == "bfloat16":
        a, b = tf.cast(a, tf.bfloat16), tf.cast(b, tf.bfloat16)
    matmul = tf.function(lambda x, y: tf.reduce_sum(tf.cast(tf.matmul(x, y)[:1, :1], tf.float32)))
    matmul(a, b).numpy()
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        matmul(a, b).numpy()
        best = max(best, 2.0 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def single_member(predictor: Any, index: int = 0) -> Any:
    """A Predictor for member `index` of a fine-tuned ensemble alone: the same trunk, one upper part, the
    same out-of-distribution layer and that member's temperature; scored by the same code."""
    from mammo_core.inference.predict import Predictor
    from mammo_core.training import finetune

    model, card = predictor.model, predictor.card
    members = model.get_layer(finetune.MEMBERS_NAME)
    member = members.get_layer(f"member_{index}")
    whiten = model.get_layer(finetune.OOD_LAYER).get_weights()
    recipes = [(card.get("training") or {}).get("recipe"), ((card.get("cross_validation") or {}).get("training") or {}).get("recipe"),
               (card.get("config") or {}).get("recipe")]
    recipe = finetune.Recipe.from_card(next((r for r in recipes if r and r.get("cut")), {}))
    one = finetune.build_ensemble([member], recipe.cut, (whiten[0], whiten[1]), recipe.input_scale, recipe.backbone)
    temps = card["ensemble"]["temperatures"]
    one_card = {**card, "name": f"{card.get('name', 'ensemble')} (member {index} alone)",
                "ensemble": {**card["ensemble"], "members": 1, "temperatures": [temps[index]]}}
    return Predictor(one, one_card, predictor.model_dir)


def keras_io_gradcam_ensemble(img_array: np.ndarray, model: Any) -> np.ndarray:
    """keras-io's `make_gradcam_heatmap` on the ensemble's mean logit at the trunk output, as published:
    a grad model built on every call, one image."""
    import keras

    from mammo_core.training import finetune

    image = keras.Input(model.inputs[0].shape[1:])
    features = model.get_layer(finetune.TRUNK_NAME)(image)
    mean_logit = keras.ops.mean(model.get_layer(finetune.MEMBERS_NAME)(features), axis=-1, keepdims=True)
    from bench.__main__ import recipe_heatmap

    return recipe_heatmap(keras.Model(image, [features, mean_logit]), img_array)


def _cam_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(largest absolute difference, lowest correlation) between two stacks of heatmaps."""
    diff = float(np.abs(a - b).max())
    corr = min(float(np.corrcoef(x.ravel(), y.ravel())[0, 1]) if x.std() > 0 and y.std() > 0 else 1.0
               for x, y in zip(a, b))
    return diff, corr


def compare_options(predictor: Any, images: np.ndarray, *, rounds: int = 3, latency_runs: int = 20,
                    batch_sizes: tuple[int, ...] = (16, 32, 64), cam_images: int = 8) -> dict[str, Any]:
    """Every option in `OPTIONS` (bfloat16 only where the CPU has it) on the same prepared (N, 224, 224)
    uint8 images, rounds interleaved: single-image probability + Grad-CAM p50 (ms), model-only images/s
    without Grad-CAM per batch size and with Grad-CAM at 32, and the largest differences from the float32
    reference (probability; Grad-CAM maps on `cam_images` images)."""
    from mammo_core.inference.ensemble import EnsembleScorer, resolve_precision

    scorers, skipped = {}, []
    for name, (kwargs, _) in OPTIONS.items():
        if kwargs["precision"] == "bfloat16" and resolve_precision("bfloat16") != "bfloat16":
            skipped.append(name)
            continue
        scorers[name] = EnsembleScorer(predictor.model, predictor.card, **kwargs)
    reference = scorers["traced-float32"]
    ref_probs, _, _ = reference(images, with_cam=False)
    _, _, ref_cams = reference(images[:cam_images], with_cam=True)
    out: dict[str, Any] = {"skipped": skipped, "options": {}}
    for name, scorer in scorers.items():
        t = time.perf_counter()
        probs, _, _ = scorer(images, with_cam=False)
        _, _, cams = scorer(images[:cam_images], with_cam=True)
        first = time.perf_counter() - t
        mean_diff = float(np.abs(probs.mean(axis=1) - ref_probs.mean(axis=1)).max())
        cam_diff, cam_corr = _cam_agreement(cams, ref_cams)
        out["options"][name] = {"description": OPTIONS[name][1], "first_calls_s": first,
                                "max_prob_diff": mean_diff, "max_member_prob_diff": float(np.abs(probs - ref_probs).max()),
                                "cam_max_diff": cam_diff, "cam_min_corr": cam_corr,
                                "latency_ms": [], **{f"plain_b{b}": [] for b in batch_sizes}, "cam_b32": []}
    for _ in range(rounds):
        for name, scorer in scorers.items():
            row = out["options"][name]
            times = []
            for i in range(latency_runs):
                t = time.perf_counter()
                scorer(images[i % len(images)][None], with_cam=True)
                times.append(time.perf_counter() - t)
            row["latency_ms"].append(float(np.median(times)) * 1e3)
            for b in batch_sizes:
                t = time.perf_counter()
                done = 0
                for start in range(0, len(images) - b + 1, b):
                    scorer(images[start:start + b], with_cam=False)
                    done += b
                row[f"plain_b{b}"].append(done / (time.perf_counter() - t))
            t = time.perf_counter()
            scorer(images[:32], with_cam=True)
            row["cam_b32"].append(32 / (time.perf_counter() - t))
    for row in out["options"].values():  # best round: the machine's slow phases hit every option
        row["latency_ms_best"] = min(row["latency_ms"])
        for key in [k for k in row if k.startswith(("plain_b", "cam_b"))]:
            row[key + "_best"] = max(row[key])
    out["batch_sizes"] = list(batch_sizes)
    out["n_images"] = int(len(images))
    return out


def profile_pieces(predictor: Any, images: np.ndarray, files: list, *, runs: int = 10) -> dict[str, Any]:
    """Where the default model's time goes: each piece of the scoring call frozen and timed alone (batch 1
    and batch 32), with its FLOPs per image, plus decoding and preprocessing on one thread."""
    import tensorflow as tf

    from mammo_core.config import IMAGE_SIZE
    from mammo_core.inference.ensemble import frozen_function
    from mammo_core.inference.explain import cam_from_gradients
    from mammo_core.io.images import load_image
    from mammo_core.io.preprocessing import prepare

    scorer = predictor.ensemble
    trunk, members = scorer.trunk, scorer.members
    feat_shape = tuple(int(d) for d in trunk.output.shape[1:])
    img_spec = [tf.TensorSpec((None, IMAGE_SIZE, IMAGE_SIZE, 1), tf.float32)]
    feat_spec = [tf.TensorSpec((None, *feat_shape), tf.float32)]

    def members_cam(features):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(features)
            total = tf.reduce_sum(tf.reduce_mean(members(features, training=False), axis=-1))
        return cam_from_gradients(features, tape.gradient(total, features), (IMAGE_SIZE, IMAGE_SIZE))

    pieces = {
        "trunk forward": (tf.function(lambda x: trunk(x, training=False), input_signature=img_spec), "image"),
        "members forward": (tf.function(lambda f: members(f, training=False), input_signature=feat_spec), "features"),
        "members forward + backward to the trunk output, Grad-CAM map": (tf.function(members_cam, input_signature=feat_spec), "features"),
    }
    trunk_flops = flops_per_image(trunk)["total"]
    member_flops = flops_per_image(predictor.model)["total"] - trunk_flops
    flops = {"trunk forward": trunk_flops, "members forward": member_flops,
             "members forward + backward to the trunk output, Grad-CAM map": 2 * member_flops}
    x = images.astype(np.float32)[..., None] / 255.0
    feats = trunk(tf.constant(x[:32]), training=False).numpy()
    out: dict[str, Any] = {}
    for name, (fn, kind) in pieces.items():
        frozen = frozen_function(fn, tag=name)
        data = x if kind == "image" else feats
        row = {"flops": flops[name]}
        for batch in (1, 32):
            arg = tf.constant(data[:batch])
            [t.numpy() for t in tf.nest.flatten(frozen(arg))]
            times = []
            for _ in range(runs if batch == 1 else max(3, runs // 3)):
                t = time.perf_counter()
                [t_.numpy() for t_ in tf.nest.flatten(frozen(arg))]
                times.append(time.perf_counter() - t)
            row[f"b{batch}_ms_per_image"] = float(np.median(times)) / batch * 1e3
        out[name] = row
    blobs = [open(f, "rb").read() for f in files[:100]]
    t = time.perf_counter()
    decoded = [load_image(b).pixels for b in blobs]
    decode_ms = (time.perf_counter() - t) / len(blobs) * 1e3
    t = time.perf_counter()
    for pixels in decoded:
        prepare(pixels)
    prep_ms = (time.perf_counter() - t) / len(blobs) * 1e3
    return {"pieces": out, "decode_ms": decode_ms, "prepare_ms": prep_ms}


def compare_tta(predictor: Any, files: list, *, rounds: int = 2, latency_runs: int = 20,
                folder_images: int = 256) -> dict[str, Any]:
    """The ensemble without and with test-time augmentation (`tta="dihedral8"`, issue 12), side by side in one
    process, rounds interleaved: one image from PNG bytes to probability + Grad-CAM, p50 (ms; the map is the
    plain view's in both), and folder images/s (`score_paths`, batches of 64, no Grad-CAM, as the folder row);
    best round of each. Also the largest change of a probability that the augmentation makes on those images."""
    from mammo_core.inference.predict import Predictor, score_paths

    arms = {tta: Predictor(predictor.model, predictor.card, predictor.model_dir, tta=tta) for tta in ("none", "dihedral8")}
    blobs = [f.read_bytes() for f in files[:latency_runs]]
    folder = list(files[:folder_images])
    for f in folder:  # page cache warm for both arms
        f.read_bytes()
    out: dict[str, Any] = {"arms": {}, "n_latency": len(blobs), "n_folder": len(folder), "rounds": rounds}
    for tta, arm in arms.items():
        t = time.perf_counter()
        arm.score_one(blobs[0], name="warm")  # traces and freezes the Grad-CAM call
        list(score_paths(arm, folder[:64], with_cam=False, keep_images=False, batch_size=64))  # and the plain one
        out["arms"][tta] = {"first_calls_s": time.perf_counter() - t, "latency_ms": [], "folder_images_per_s": []}
    probabilities = {}
    for _ in range(rounds):
        for tta, arm in arms.items():
            row = out["arms"][tta]
            times = []
            for blob in blobs:
                t = time.perf_counter()
                pred = arm.score_one(blob, name="x")
                times.append(time.perf_counter() - t)
                assert pred.error is None and pred.heatmap is not None
            row["latency_ms"].append(float(np.median(times)) * 1e3)
            t = time.perf_counter()
            rows = list(score_paths(arm, folder, with_cam=False, keep_images=False, batch_size=64))
            row["folder_images_per_s"].append(len(rows) / (time.perf_counter() - t))
            probabilities[tta] = np.asarray([p.probability for p in rows if p.error is None], dtype=float)
    for row in out["arms"].values():  # best round: the machine's slow phases hit both arms
        row["latency_ms_best"] = min(row["latency_ms"])
        row["folder_images_per_s_best"] = max(row["folder_images_per_s"])
    out["max_probability_change"] = float(np.abs(probabilities["dihedral8"] - probabilities["none"]).max())
    return out
