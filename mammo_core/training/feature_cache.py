"""Frozen-backbone features: an EfficientNet-Lite0 classifier's pooled features for every image, cached on disk.

With the ImageNet backbone frozen, the classifier's only trainable part is its Dense(1) head, so the
backbone's pooled output (layer ``avg_pool`` of the architecture's classifier: 1280-d for
`efficientnet-lite0`, 672-d for the shallower `efficientnet-lite0-mid`) is computed once per image and
reused by every training run and cross-validation fold. The cache lives
outside the repository (``$MAMMO_CACHE_DIR``, default ``~/.cache/mammo_core``) and is keyed by the
files (path, size, modification time) and the backbone's weights, so a changed file or weight file is
never served stale features. The Dense(1) head trained on them is `training.heads`.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mammo_core.config import IMAGE_SIZE

#: Layer of the classifier whose output is cached (global average pool of its last feature map).
FEATURE_LAYER = "avg_pool"
DEFAULT_ARCHITECTURE = "efficientnet-lite0"
_VERSION = "avgpool-v1"


def cache_dir() -> Path:
    """Folder for feature caches: `$MAMMO_CACHE_DIR`, else ~/.cache/mammo_core."""
    return Path(os.environ.get("MAMMO_CACHE_DIR", Path.home() / ".cache" / "mammo_core"))


def _weights_id() -> str:
    from mammo_core.models.efficientnet_lite import imagenet_weights_path
    from mammo_core.store.files import sha256_file

    return sha256_file(imagenet_weights_path())[:16]


def _cache_key(paths: Sequence[str], flip: bool, architecture: str, preprocessing: str) -> str:
    from mammo_core.io.preprocessing import LEGACY

    # Keys of the original architecture and preprocessing are unchanged from the first version of this cache.
    arch = "" if architecture == DEFAULT_ARCHITECTURE else f"\t{architecture}"
    version = "efficientnet-lite0-avgpool-v1" if not arch else _VERSION
    prep = "" if preprocessing == LEGACY else f"\t{preprocessing}"
    digest = hashlib.sha256(f"{version}\t{_weights_id()}\tflip={flip}{arch}{prep}\n".encode())
    for path in sorted(paths):
        st = os.stat(path)
        digest.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def build_extractor(architecture: str = DEFAULT_ARCHITECTURE):
    """The architecture's frozen ImageNet classifier cut at `FEATURE_LAYER`: (N, 224, 224, 1) in [0, 1] -> (N, D)."""
    import keras

    from mammo_core.models.architectures import build_model

    full = build_model(architecture, channels=1, compile=False)
    return keras.Model(full.inputs, full.get_layer(FEATURE_LAYER).output, name="features")


def extract(paths: Sequence[str], *, architecture: str = DEFAULT_ARCHITECTURE, flip: bool = False,
            preprocessing: str, batch_size: int = 32, chunk: int = 256,
            log: Callable[[str], None] = print) -> np.ndarray:
    """Features (len(paths), D) float32 for image files, decoded with `data.pipeline.load_images` (no cache).

    `flip=True` mirrors every image left-right first (test-time augmentation).
    """
    import tensorflow as tf

    from mammo_core.data.pipeline import load_images

    extractor = build_extractor(architecture)
    infer = tf.function(lambda x: extractor(x, training=False),
                        input_signature=[tf.TensorSpec((None, IMAGE_SIZE, IMAGE_SIZE, 1), tf.float32)])
    out = np.empty((len(paths), int(extractor.output.shape[-1])), dtype=np.float32)
    t0 = time.time()
    for start in range(0, len(paths), chunk):
        images = load_images(list(paths[start:start + chunk]), preprocessing=preprocessing)
        if flip:
            images = images[:, :, ::-1]
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size].astype(np.float32)[..., None] / 255.0
            out[start + i:start + i + len(batch)] = infer(batch).numpy()
        done = min(start + chunk, len(paths))
        rate = done / max(time.time() - t0, 1e-6)
        log(f"features: {done}/{len(paths)} images, {rate:.1f} img/s")
    return out


def cached_features(paths: Sequence[str], *, architecture: str = DEFAULT_ARCHITECTURE, flip: bool = False,
                    preprocessing: str, log: Callable[[str], None] = print) -> np.ndarray:
    """Features for `paths` (in the given order), from the cache or computed once and stored.

    The cache file holds the sorted set of paths; any order or subset of the same set is served from it.
    """
    paths = [os.path.abspath(p) for p in paths]
    ordered = sorted(set(paths))
    folder = cache_dir()
    target = folder / f"features-{_cache_key(ordered, flip, architecture, preprocessing)}.npz"
    if target.is_file():
        with np.load(target, allow_pickle=False) as stored:
            stored_paths, feats = stored["paths"].tolist(), stored["features"]
        log(f"features: {len(stored_paths)} from cache {target}")
    else:
        t0 = time.time()
        feats = extract(ordered, architecture=architecture, flip=flip, preprocessing=preprocessing, log=log)
        seconds = time.time() - t0
        folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, paths=np.asarray(ordered), features=feats, seconds=np.float64(seconds))
        os.replace(tmp, target)
        stored_paths = ordered
        log(f"features: {len(ordered)} images in {seconds:.0f} s ({len(ordered) / max(seconds, 1e-6):.1f} img/s), cached in {target}")
    row = {p: i for i, p in enumerate(stored_paths)}
    return feats[[row[p] for p in paths]]


def extraction_seconds(paths: Sequence[str], *, architecture: str = DEFAULT_ARCHITECTURE,
                       flip: bool = False, preprocessing: str) -> float | None:
    """Seconds the cached extraction of `paths` took, when it is cached (for benchmarks)."""
    key = _cache_key(sorted({os.path.abspath(p) for p in paths}), flip, architecture, preprocessing)
    target = cache_dir() / f"features-{key}.npz"
    if not target.is_file():
        return None
    with np.load(target, allow_pickle=False) as stored:
        seconds = float(stored["seconds"])
    return seconds if seconds > 0 else None  # <= 0: the cache was filled from elsewhere, time unknown
