"""Screening, on the validation parts only: does feeding EfficientNet-Lite0 the 224x224 model input upsampled
(x1.5, x2, x3) give more useful frozen features, and do the deeper, wider Lite1 and Lite2 give more at the same
input? (python experiments/probe_scale.py [SIZE | VARIANT:SIZE ...], e.g. 672 or lite2:448; test folds never
scored)

For each input scale, every dataset image (breast-crop-v1) is resized bilinearly inside TensorFlow and passed
through the frozen ImageNet network; the global average of three layers' outputs is kept (block5c_add, the
shipped ensemble's cut; block6d_add; the 1280-channel top). A linear probe (standardised features, L2
logistic regression, class-balanced, its C chosen by grouped 4-fold CV inside the training part) is fitted on
the training part of each of the 5 grouped folds and scored on that fold's validation part, exactly the parts
`select_recipe.py` compared recipes on. The figure is the mean over folds of the validation-part AUC.
Rows go to experiments/probe_scale.jsonl.
"""
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np

from mammo_core.data.datasets import scan_dataset
from mammo_core.data.pipeline import load_images
from mammo_core.data.splits import fold_assignment, group_folds

DATA = os.environ.get("MAMMO_DATA_DIR", "../shared/data/augmented-inbreast")
SCALES = [224, 336, 448]
LAYERS = ["block5c_add", "block6d_add", "top_activation"]
# Lite1 and Lite2 have 4 blocks in stage 5 and 5 in stage 6: their last blocks of those stages.
_LAYERS_DEEPER = ["block5d_add", "block6e_add", "top_activation"]
CACHE = os.path.join(os.environ.get("MAMMO_CACHE_DIR", os.path.expanduser("~/.cache/mammo_core")), "probe_scale")


def features(images: np.ndarray, size: int, variant: str = "lite0") -> dict[str, np.ndarray]:
    import keras
    import tensorflow as tf

    from mammo_core.models.efficientnet_lite import build_efficientnet_lite

    net = build_efficientnet_lite(variant, input_shape=(size, size, 1), weights="imagenet")
    outs = [keras.layers.GlobalAveragePooling2D()(net.get_layer(n).output) for n in layers(variant)]
    model = keras.Model(net.input, outs)
    fn = tf.function(lambda x: model(tf.image.resize(x, (size, size), method="bilinear"), training=False))
    acc = {n: [] for n in layers(variant)}
    t0 = time.time()
    for i in range(0, len(images), 32):
        batch = images[i:i + 32].astype(np.float32)[..., None] / 255.0
        for n, o in zip(layers(variant), fn(batch)):
            acc[n].append(o.numpy())
    print(f"{variant} at {size}: {len(images) / (time.time() - t0):.0f} img/s", flush=True)
    return {n: np.concatenate(v) for n, v in acc.items()}


def layers(variant: str) -> list[str]:
    return LAYERS if variant == "lite0" else _LAYERS_DEEPER


def probe_auc(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, frame) -> float:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    inner = group_folds(frame.iloc[train].reset_index(drop=True), n_folds=4, seed=7, group_by="source")
    splits = [(np.flatnonzero(inner != k), np.flatnonzero(inner == k)) for k in range(4)]
    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-4, 0, 9), cv=splits, scoring="roc_auc",
                                                               class_weight="balanced", max_iter=2000))
    clf.fit(x[train], y[train])
    return float(roc_auc_score(y[val], clf.predict_proba(x[val])[:, 1]))


def main() -> None:
    frame = scan_dataset(DATA).reset_index(drop=True)
    folds, val_masks = fold_assignment(frame, k=5, seed=0, group_by="source")
    y = frame["label"].to_numpy()
    images = None
    os.makedirs(CACHE, exist_ok=True)
    only = [(a.split(":")[0], int(a.split(":")[1])) if ":" in a else ("lite0", int(a)) for a in sys.argv[1:]]
    for variant, size in only or [("lite0", s) for s in SCALES]:
        path = os.path.join(CACHE, f"features-{size}.npz" if variant == "lite0" else f"features-{variant}-{size}.npz")
        if not os.path.exists(path):
            if images is None:
                images = load_images(frame["path"].tolist(), preprocessing="breast-crop-v1")
            np.savez(path, **features(images, size, variant))
        feats = dict(np.load(path))
        for layer in layers(variant):
            aucs = []
            for f in range(5):
                val = np.flatnonzero(val_masks[f])
                train = np.flatnonzero((folds != f) & ~val_masks[f])
                aucs.append(round(probe_auc(feats[layer], y, train, val, frame), 4))
            row = {"variant": variant, "scale": size, "layer": layer, "fold_val_auc": aucs, "mean_validation_auc": round(float(np.mean(aucs)), 4)}
            print("RESULT", json.dumps(row), flush=True)
            with open("experiments/probe_scale.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
