"""The input pipeline: decode dataset files once into model inputs, then batch them for Keras with tf.data.

Every file goes through `io.preprocessing.model_input`, the function the CLI and the app use too.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from mammo_core.config import IMAGE_SIZE
from mammo_core.errors import DatasetError, ImageReadError
from mammo_core.io.images import load_image
from mammo_core.io.preprocessing import PREPROCESSING_ID, model_input

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf


def load_images(paths: Sequence[str], *, workers: int | None = None, preprocessing: str = PREPROCESSING_ID) -> np.ndarray:
    """Decode files once into a (N, IMAGE_SIZE, IMAGE_SIZE) uint8 array of model inputs, in parallel threads.

    Every file goes through `io.preprocessing.model_input` with the named preprocessing, the same function
    the CLI and the app use. Raises DatasetError listing every file that could not be read.
    """
    out = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    errors: list[str] = []

    def work(i_path: tuple[int, str]) -> None:
        i, path = i_path
        try:
            out[i] = model_input(load_image(path).pixels, preprocessing)
        except ImageReadError as exc:
            errors.append(str(exc))

    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        list(pool.map(work, enumerate(paths)))
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise DatasetError(f"{len(errors)} unreadable file(s) in the dataset: " + "; ".join(errors[:5]) + more)
    return out


def make_tf_dataset(
    images: np.ndarray,
    labels: Iterable[int] | None = None,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    channels: int = 1,
    augment: "callable | None" = None,
) -> "tf.data.Dataset":
    """Batches of float32 (B, 224, 224, channels) in [0, 1] (and float32 labels) from decoded uint8 images.

    The images are already decoded in memory (`load_images`), so each epoch only shuffles, batches,
    scales and prefetches. `channels=3` repeats the gray channel (the authors' RGB copies).
    `augment`, if given, maps a float batch to a float batch at train time.
    """
    import tensorflow as tf

    tensors = (images,) if labels is None else (images, np.asarray(labels, dtype=np.float32))
    ds = tf.data.Dataset.from_tensor_slices(tensors)
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def scale(x, *rest):
        x = tf.cast(x[..., None], tf.float32) / 255.0
        if channels != 1:
            x = tf.repeat(x, channels, axis=-1)
        if augment is not None:
            x = augment(x)
        return (x, *rest) if rest else x

    return ds.map(scale, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
