"""Score images with a trained model: probability of malignancy, decision and Grad-CAM, singly or in batches.

`Predictor` is what the CLI and the app use. It decodes every input with `mammo_core.imaging`
(the same path as training), and gets the probability and the Grad-CAM heatmap from one compiled
call (`explain.GradCAM`). Unreadable inputs become results with an `error` instead of raising,
so one bad file never stops a batch.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .config import CLASS_NAMES, DEFAULT_THRESHOLD, IMAGE_SIZE
from .errors import ImageReadError
from .imaging import LoadedImage, Source, load_image, resize_for_model


@dataclass
class Prediction:
    """The result for one input. Either `error` is set, or `probability` and `label` are."""

    name: str
    probability: float | None = None
    label: str | None = None
    threshold: float | None = None
    heatmap: np.ndarray | None = None  # (224, 224) float in [0, 1]
    image: LoadedImage | None = None  # the decoded original (kept for overlays)
    sha256: str | None = None  # of the input bytes, for the audit log
    error: str | None = None

    def to_json(self, model_name: str) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.name, "error": self.error}
        return {"path": self.name, "probability": round(float(self.probability), 6), "label": self.label,
                "threshold": self.threshold, "model": model_name}


def _model_channels(model: Any) -> int:
    return int(model.inputs[0].shape[-1])


def to_model_batch(images: np.ndarray, channels: int) -> np.ndarray:
    """(N, 224, 224) uint8 -> (N, 224, 224, channels) float32 in [0, 1]."""
    batch = images.astype(np.float32)[..., None] / 255.0
    return np.repeat(batch, channels, axis=-1) if channels != 1 else batch


def predict_arrays(model: Any, images: np.ndarray, *, channels: int | None = None, batch_size: int = 128) -> np.ndarray:
    """Probabilities for decoded (N, 224, 224) uint8 images, in batches (no Grad-CAM)."""
    import tensorflow as tf

    channels = channels or _model_channels(model)
    infer = tf.function(lambda x: model(x, training=False),
                        input_signature=[tf.TensorSpec((None, IMAGE_SIZE, IMAGE_SIZE, channels), tf.float32)])
    out = [infer(to_model_batch(images[i:i + batch_size], channels)).numpy().ravel()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


class Predictor:
    """A loaded model with its card, ready to score images.

    Args:
        model: Keras model ending in one sigmoid unit.
        card: its model card (threshold, name...).
        model_dir: where it was loaded from (for display).
    """

    def __init__(self, model: Any, card: dict[str, Any], model_dir: Path | None = None) -> None:
        from .explain import GradCAM

        self.model = model
        self.card = card
        self.model_dir = model_dir
        self.name: str = card.get("name") or (model_dir.name if model_dir else model.name)
        self.model_sha256: str = card.get("model_sha256", "")
        self.threshold: float = float(card.get("threshold", DEFAULT_THRESHOLD))
        self.channels = _model_channels(model)
        self.cam = GradCAM(model)

    @classmethod
    def load(cls, name_or_dir: str | Path | None = None, *, root: str | Path | None = None) -> "Predictor":
        """Load a named model, a model directory, or (None) the active model. Raises ModelDirError."""
        from .registry import load_model, resolve_model_dir

        model_dir = resolve_model_dir(name_or_dir, root=root)
        model, card = load_model(model_dir)
        return cls(model, card, model_dir)

    def warm_up(self) -> None:
        """Trace the compiled function once so the first real request is fast."""
        self.score_arrays(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8))

    def score_arrays(self, images: np.ndarray, *, with_cam: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, 224, 224) uint8 -> probabilities (N,) and heatmaps (N, 224, 224) (None without Grad-CAM)."""
        batch = to_model_batch(images, self.channels)
        if with_cam:
            return self.cam(batch)
        return predict_arrays(self.model, images, channels=self.channels), None

    def decision(self, probability: float, threshold: float | None = None) -> str:
        """Class name at the threshold (the card's by default): malignant when probability >= threshold."""
        t = self.threshold if threshold is None else threshold
        return CLASS_NAMES[int(probability >= t)]

    def score_one(self, source: Source, *, name: str | None = None, with_cam: bool = True) -> Prediction:
        """Decode and score one path or upload; never raises for a bad image (see `Prediction.error`)."""
        return next(self.score_many([(source, name)], with_cam=with_cam, batch_size=1))

    def score_many(
        self,
        items: Iterable[tuple[Source, str | None]],
        *,
        with_cam: bool = True,
        batch_size: int = 32,
        keep_images: bool = True,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Prediction]:
        """Score (source, name) pairs in batches, in input order; decoding runs ahead in threads.

        `progress(n)` is called after each batch with the number of inputs done.
        """
        items = list(items)
        done = 0
        with ThreadPoolExecutor(max_workers=2) as pool:
            decoded = pool.map(lambda it: _decode(*it), items)
            pending: list[Prediction] = []
            for pred in decoded:
                pending.append(pred)
                if len(pending) >= batch_size:
                    yield from self._finish(pending, with_cam, keep_images)
                    done += len(pending)
                    pending = []
                    if progress:
                        progress(done)
            if pending:
                yield from self._finish(pending, with_cam, keep_images)
                if progress:
                    progress(done + len(pending))

    def _finish(self, preds: list[Prediction], with_cam: bool, keep_images: bool) -> list[Prediction]:
        ok = [p for p in preds if p.error is None]
        if ok:
            images = np.stack([resize_for_model(p.image.pixels) for p in ok])
            probs, cams = self.score_arrays(images, with_cam=with_cam)
            for i, p in enumerate(ok):
                p.probability = float(probs[i])
                p.threshold = self.threshold
                p.label = self.decision(p.probability)
                p.heatmap = cams[i] if cams is not None else None
                if not keep_images:
                    p.image = None
        return preds


def _decode(source: Source, name: str | None) -> Prediction:
    label = name or (str(source) if isinstance(source, (str, Path)) else "<upload>")
    try:
        raw = source if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()
    except OSError as exc:
        return Prediction(name=label, error=f"{label}: cannot be read ({exc.strerror or exc}).")
    try:
        image = load_image(bytes(raw), name=label)
    except ImageReadError as exc:
        return Prediction(name=label, error=str(exc))
    return Prediction(name=label, image=image, sha256=hashlib.sha256(raw).hexdigest())


def score_paths(predictor: Predictor, paths: Sequence[str | Path], **kwargs: Any) -> Iterator[Prediction]:
    """Convenience: score file paths (folders already expanded) with `Predictor.score_many`."""
    return predictor.score_many([(p, str(p)) for p in paths], **kwargs)
