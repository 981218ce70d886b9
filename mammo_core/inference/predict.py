"""Score images with a trained model: probability of malignancy, decision and Grad-CAM, singly or in batches.

`Predictor` is what the CLI and the app use. It decodes every input with `mammo_core.io.images`
(the same path as training), and gets the probability and the Grad-CAM heatmap from one compiled
call (`explain.GradCAM`). Unreadable inputs become results with an `error` instead of raising,
so one bad file never stops a batch.
"""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from mammo_core.config import CLASS_NAMES, DEFAULT_THRESHOLD, IMAGE_SIZE
from mammo_core.errors import ImageReadError
from mammo_core.evaluation.calibration import apply_temperature, card_temperature
from mammo_core.io.images import Source, load_image, read_file, resize_for_model
from mammo_core.io.pixels import LoadedImage
from mammo_core.io.preprocessing import LEGACY, PREPROCESSING_ID, Geometry, card_preprocessing, prepare, to_original

#: Threads that decode and preprocess inputs while the model scores the previous batch (PIL, NumPy and
#: pydicom release the GIL for most of their work). `python -m bench` measures the choice.
DECODE_WORKERS = 2
#: From how many images `predict` freezes the ensemble's weights into its graph (`Predictor(freeze=)`). Freezing
#: costs ~5 s of start-up and ~0.75 GB per call kind and saves ~4-8 ms per image (docs/BENCHMARKS.md): it pays
#: back from about a thousand images.
FREEZE_FROM_IMAGES = 1000


@dataclass
class Prediction:
    """The result for one input. Either `error` is set, or `probability` and `label` are.

    `heatmap` is the Grad-CAM map over the model's input (`model_input`, the preprocessed 224x224 view);
    `heatmap_on_original` draws it back onto the decoded original (crop, flip and resize undone).
    """

    name: str
    probability: float | None = None
    label: str | None = None
    threshold: float | None = None
    heatmap: np.ndarray | None = None  # (224, 224) float in [0, 1], over `model_input`
    image: LoadedImage | None = None  # the decoded original (kept for overlays)
    sha256: str | None = None  # of the input bytes, for the audit log
    error: str | None = None
    model_input: np.ndarray | None = None  # (224, 224) uint8: what the model saw
    geometry: Geometry | None = None  # how `model_input` maps onto the original (None: whole frame stretched)
    outline: np.ndarray | None = None  # (K, 2) row, col points of the breast outline on the original
    original_shape: tuple[int, int] | None = None  # of the decoded original, before any shrinking for display
    #: (low, high) range of the ensemble members' calibrated probabilities; None for a single model
    probability_interval: tuple[float, float] | None = None
    ood_score: float | None = None  # squared Mahalanobis distance of the trunk features (ensembles)
    in_distribution: bool | None = None
    warnings: list[str] = field(default_factory=list)

    def heatmap_on_original(self, shape: tuple[int, int] | None = None) -> np.ndarray | None:
        """The heatmap over the original frame, at `shape` (default: the size of `image.pixels`, which
        may have been shrunk for display); None without a heatmap."""
        if self.heatmap is None or self.image is None:
            return None
        rows, cols = shape or self.image.pixels.shape[:2]
        if self.geometry is None:
            from PIL import Image

            return np.asarray(Image.fromarray(self.heatmap.astype(np.float32), mode="F").resize((cols, rows), Image.BILINEAR))
        return to_original(self.heatmap, self.geometry, (rows, cols))

    def outline_on(self, shape: tuple[int, int]) -> np.ndarray | None:
        """The breast outline's (row, col) points scaled to an image of `shape` (e.g. the display copy)."""
        if self.outline is None or not len(self.outline) or self.original_shape is None:
            return None
        oh, ow = self.original_shape
        return self.outline * np.asarray([shape[0] / oh, shape[1] / ow], dtype=np.float32)

    def to_json(self, model_name: str) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.name, "error": self.error}
        out = {"path": self.name, "probability": round(float(self.probability), 6), "label": self.label,
               "threshold": self.threshold, "model": model_name,
               "in_distribution": bool(self.in_distribution) if self.in_distribution is not None else None,
               "warnings": list(self.warnings)}
        if self.probability_interval is not None:
            out["probability_interval"] = [round(float(v), 6) for v in self.probability_interval]
        if self.ood_score is not None:
            out["ood_score"] = round(float(self.ood_score), 3)
        return out


def _model_channels(model: Any) -> int:
    return int(model.inputs[0].shape[-1])


def to_model_batch(images: np.ndarray, channels: int) -> np.ndarray:
    """(N, 224, 224) uint8 -> (N, 224, 224, channels) float32 in [0, 1]."""
    batch = images.astype(np.float32)[..., None] / 255.0
    return np.repeat(batch, channels, axis=-1) if channels != 1 else batch


def make_inference_function(model: Any, channels: int):
    """A compiled forward pass with a fixed input signature (traced once, reused for every batch)."""
    import tensorflow as tf

    def forward(x):
        return model(x, training=False)

    return tf.function(forward, input_signature=[tf.TensorSpec((None, IMAGE_SIZE, IMAGE_SIZE, channels), tf.float32)])


def predict_arrays(model: Any, images: np.ndarray, *, channels: int | None = None, batch_size: int = 128,
                   infer: Any = None) -> np.ndarray:
    """Probabilities for decoded (N, 224, 224) uint8 images, in batches (no Grad-CAM)."""
    channels = channels or _model_channels(model)
    infer = infer or make_inference_function(model, channels)
    out = [infer(to_model_batch(images[i:i + batch_size], channels)).numpy().ravel()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


class Predictor:
    """A loaded model with its card, ready to score images.

    Every input goes through `preprocessing` with the pipeline the card names (the breast crop for
    models trained with it; the paper's whole-frame resize for older cards), then through one compiled
    call that gives the probability and, when asked, the Grad-CAM map. An ensemble
    (`efficientnet-lite0-ft`) also gives the members' range and an out-of-distribution distance.

    Args:
        model: Keras model ending in one sigmoid unit, or a `finetune.build_ensemble` model.
        card: its model card (threshold, name, preprocessing, temperatures...).
        model_dir: where it was loaded from (for display).
        tta: test-time augmentation, "none" (default) or "dihedral8": the ensemble's member logits averaged
            over the 8 flips and 90° rotations of each input (`ensemble.EnsembleScorer`; about 8x slower; the
            Grad-CAM map and the out-of-distribution distance stay those of the plain view). Offered for the
            fine-tuned ensemble only, where inner validation measured it (docs/EXPERIMENTS.md); a single model
            with "dihedral8" raises ValueError.
        freeze: for the ensemble, turn each compiled call into a graph with the weights as constants on first
            use (`ensemble.frozen_function`): 1.2-1.8x faster batches, but each call kind costs ~0.75 GB more
            memory and ~5 s more start-up (docs/BENCHMARKS.md). Worth it for large folders; the app, a
            long-lived server, and short CLI runs keep the traced call (`FREEZE_FROM_IMAGES`).
    """

    def __init__(self, model: Any, card: dict[str, Any], model_dir: Path | None = None, *,
                 tta: str | None = "none", freeze: bool = True) -> None:
        from mammo_core.inference.ensemble import check_tta
        from mammo_core.training.finetune import is_ensemble

        self.tta = check_tta(tta)
        self.model = model
        self.card = card
        self.model_dir = model_dir
        self.name: str = card.get("name") or (model_dir.name if model_dir else model.name)
        self.model_sha256: str = card.get("model_sha256", "")
        self.threshold: float = float(card.get("threshold", DEFAULT_THRESHOLD))
        self.preprocessing: str = card_preprocessing(card)
        self.channels = _model_channels(model)
        ood = card.get("ood") or {}
        self.ood_threshold: float | None = float(ood["threshold"]) if "threshold" in ood else None
        self.ensemble = None
        if is_ensemble(model):
            from mammo_core.inference.ensemble import EnsembleScorer

            self.ensemble = EnsembleScorer(model, card, tta=self.tta, frozen=freeze)
            self.temperature = 1.0  # per member, inside the scorer
        elif self.tta != "none":
            # measured on the fine-tuned ensemble's recipe only; not offered untested for the single models
            raise ValueError(f"test-time augmentation ({self.tta}) is offered for the fine-tuned ensemble only "
                             f"(efficientnet-lite0-ft); {self.name} is a single model: score it without it.")
        else:
            from mammo_core.inference.explain import GradCAM

            # Temperature scaling from the card (`training.calibrate.calibrate_model_dir`); 1.0 when uncalibrated.
            self.temperature: float = card_temperature(card)
            # The card may name the Grad-CAM layer (e.g. EfficientNet's "top_activation"); else the last convolution.
            self.cam = GradCAM(model, card.get("cam_layer") or None)
            self._infer = make_inference_function(model, self.channels)

    @classmethod
    def load(cls, name_or_dir: str | Path | None = None, *, root: str | Path | None = None,
             tta: str | None = "none", freeze: bool = True) -> "Predictor":
        """Load a named model, a model directory, or (None) the active model, with test-time augmentation
        `tta` (see the class). Raises ModelDirError; ValueError for a bad `tta` or one the model does not offer."""
        from mammo_core.inference.ensemble import check_tta
        from mammo_core.store.registry import load_model, resolve_model_dir

        check_tta(tta)  # before the model loads
        model_dir = resolve_model_dir(name_or_dir, root=root)
        model, card = load_model(model_dir)
        return cls(model, card, model_dir, tta=tta, freeze=freeze)

    def warm_up(self) -> None:
        """Trace the compiled function once so the first real request is fast."""
        self.score_arrays(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8))

    def score_batch(self, images: np.ndarray, *, with_cam: bool = True) -> dict[str, np.ndarray | None]:
        """(N, 224, 224) uint8 model inputs -> {"probability": (N,), "heatmap": (N, 224, 224) or None,
        "interval": (N, 2) or None, "ood": (N,) or None}.

        Probabilities are calibrated: with the card's temperature for a single model, with each member's
        temperature for an ensemble, whose probability is the members' mean and interval their range. With
        `tta="dihedral8"` each member's logit is first averaged over the 8 views; the heatmap and "ood" stay the
        plain view's.
        """
        if self.ensemble is not None:
            members, ood, cams = self.ensemble(images, with_cam=with_cam)
            return {"probability": members.mean(axis=1), "heatmap": cams,
                    "interval": np.stack([members.min(axis=1), members.max(axis=1)], axis=1), "ood": ood}
        batch = to_model_batch(images, self.channels)
        if with_cam:
            probs, cams = self.cam(batch)
        else:
            probs, cams = predict_arrays(self.model, images, channels=self.channels, infer=self._infer), None
        if self.temperature != 1.0:
            probs = apply_temperature(probs, self.temperature)
        return {"probability": probs, "heatmap": cams, "interval": None, "ood": None}

    def score_arrays(self, images: np.ndarray, *, with_cam: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, 224, 224) uint8 model inputs -> probabilities (N,) and heatmaps (N, 224, 224) (None without Grad-CAM)."""
        out = self.score_batch(images, with_cam=with_cam)
        return out["probability"], out["heatmap"]

    def decision(self, probability: float, threshold: float | None = None) -> str:
        """Class name at the threshold (the card's by default): malignant when probability >= threshold."""
        t = self.threshold if threshold is None else threshold
        return CLASS_NAMES[int(probability >= t)]

    def score_one(self, source: Source, *, name: str | None = None, with_cam: bool = True) -> Prediction:
        """Decode and score one path or upload; never raises for a bad image (see `Prediction.error`)."""
        return next(self.score_many([(source, name)], with_cam=with_cam))

    def score_many(
        self,
        items: Iterable[tuple[Source, str | None]],
        *,
        with_cam: bool = True,
        batch_size: int = 32,
        keep_images: bool = True,
        progress: Callable[[int], None] | None = None,
        workers: int = DECODE_WORKERS,
        started: Sequence[Future] | None = None,
    ) -> Iterator[Prediction]:
        """Score (source, name) pairs in batches; yields one Prediction per input, in input order.

        Files are decoded and preprocessed in `workers` threads, at most two batches ahead of the model,
        so the next batch is being prepared while the model runs on the current one (TensorFlow releases
        the GIL while it computes). Batches hold `batch_size` readable inputs, in input order. Inputs that
        fit in one batch (the app's usual upload) are prepared and scored at once. Unreadable inputs are
        yielded with `error` set. `progress(n)` is called after each batch with the number of inputs done.
        `started`: futures of the first inputs' Predictions already being prepared (`decode_ahead`, which
        the CLI starts before the model is loaded). (Until issue 18 a tf.data pipeline did the batching; on 2 cores it cost about 4 ms of system time
        per image in page faults, and it is not needed to overlap decoding with the model.)
        """
        items = list(items)
        if not items:
            return
        if len(items) <= batch_size and not started:
            yield from self._score_one_batch(items, with_cam=with_cam, keep_images=keep_images, progress=progress,
                                             workers=workers)
            return
        waiting: deque[Prediction] = deque()  # decoded, not yet yielded (the current batch and its failures)
        batch: list[Prediction] = []
        emitted = 0
        decoded = self._decoded_in_order(items, started=started, look_ahead=2 * batch_size, workers=workers)
        try:
            for pred, more in decoded:
                waiting.append(pred)
                if pred.error is None:
                    batch.append(pred)
                if len(batch) == batch_size or (batch and not more):
                    self._fill_batch(batch, np.stack([p.model_input for p in batch]), with_cam)
                    batch = []
                    while waiting:
                        yield self._strip(waiting.popleft(), keep_images)
                        emitted += 1
                    if progress:
                        progress(emitted)
        finally:  # the caller stopped early: drop what is not started yet
            decoded.close()
        while waiting:  # trailing failures (or every input failed)
            yield self._strip(waiting.popleft(), keep_images)
            emitted += 1
        if progress:
            progress(emitted)

    def _decoded_in_order(self, items: list[tuple[Source, str | None]], *, started: Sequence[Future] | None,
                          look_ahead: int, workers: int) -> Iterator[tuple[Prediction, bool]]:
        """Each input decoded and prepared (`_load`) in `workers` threads, at most `look_ahead` inputs ahead of
        the consumer (memory stays at about two batches of decoded images); yields (prediction, whether more
        inputs follow) in input order. `started`: futures for the first inputs, already submitted. Closing
        the generator cancels what has not started."""
        loading: deque = deque(started or ())  # futures of decoded inputs, in input order
        todo = iter(items[len(loading):])
        with ThreadPoolExecutor(max_workers=workers) as pool:

            def top_up() -> None:
                while len(loading) < look_ahead:
                    item = next(todo, None)
                    if item is None:
                        return
                    loading.append(pool.submit(self._load, *item))

            try:
                top_up()
                while loading:
                    pred = loading.popleft().result()
                    top_up()
                    yield pred, bool(loading)
            finally:
                for future in loading:
                    future.cancel()

    def _load(self, source: Source, name: str | None) -> Prediction:
        """Decode and preprocess one input (in a worker thread); errors end up in `Prediction.error`."""
        pred = _decode(source, name)
        if pred.error is None:
            pixels = pred.image.pixels
            prepared = prepare(pixels)  # its checks and outline serve every model
            pred.warnings.extend(input_warnings(pixels, prepared, pred.image.metadata))
            pred.outline, pred.original_shape = prepared.outline, tuple(pixels.shape[:2])
            if self.preprocessing == LEGACY:
                pred.model_input = resize_for_model(pixels)
            elif self.preprocessing == PREPROCESSING_ID:
                pred.model_input, pred.geometry = prepared.pixels, prepared.geometry
            else:
                other = prepare(pixels, aspect="stretch")
                pred.model_input, pred.geometry = other.pixels, other.geometry
        return pred

    def _score_one_batch(self, items: list[tuple[Source, str | None]], *, with_cam: bool, keep_images: bool,
                         progress: Callable[[int], None] | None,
                         workers: int = DECODE_WORKERS) -> Iterator[Prediction]:
        if len(items) == 1:
            preds = [self._load(*items[0])]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:  # as in the pipeline: PIL and pydicom release the GIL
                preds = list(pool.map(lambda item: self._load(*item), items))
        good = [pred for pred in preds if pred.error is None]
        if good:
            self._fill_batch(good, np.stack([pred.model_input for pred in good]), with_cam)
        if progress:
            progress(len(preds))
        for pred in preds:
            yield self._strip(pred, keep_images)

    def _fill_batch(self, preds: list[Prediction], images: np.ndarray, with_cam: bool) -> None:
        out = self.score_batch(images, with_cam=with_cam)
        for j, pred in enumerate(preds):
            probability = float(out["probability"][j])
            pred.probability = probability
            pred.threshold = self.threshold
            pred.label = self.decision(probability)
            pred.heatmap = out["heatmap"][j] if out["heatmap"] is not None else None
            if out["interval"] is not None:
                pred.probability_interval = (float(out["interval"][j, 0]), float(out["interval"][j, 1]))
            if out["ood"] is not None:
                pred.ood_score = float(out["ood"][j])
                if self.ood_threshold is not None and pred.ood_score > self.ood_threshold:
                    pred.warnings.append(OOD_WARNING)
            pred.in_distribution = not pred.warnings

    @staticmethod
    def _strip(pred: Prediction, keep_images: bool) -> Prediction:
        if not keep_images:
            pred.image = None
        return pred

    # --- the two halves of `score_many`, for engines that run them in different processes (ray_engine) ---

    @classmethod
    def preparer(cls, card: dict[str, Any]) -> "Predictor":
        """A Predictor without a model that can only `prepare_one`, with the preprocessing `card` names:
        decoding tasks use it so that they never load the model."""
        self = cls.__new__(cls)
        self.card, self.name, self.preprocessing = card, card.get("name", ""), card_preprocessing(card)
        return self

    def prepare_one(self, source: Source, name: str | None = None) -> Prediction:
        """Decode and preprocess one input exactly as `score_many` does; nothing is scored. Never raises
        for a bad image (`Prediction.error`); otherwise `model_input` is set."""
        return self._load(source, name)

    def score_prepared(self, preds: Sequence[Prediction], *, with_cam: bool = False) -> list[Prediction]:
        """Score the inputs `prepare_one` made, in one batch, as `score_many` does; error rows pass through."""
        good = [pred for pred in preds if pred.error is None]
        if good:
            self._fill_batch(good, np.stack([pred.model_input for pred in good]), with_cam)
        return list(preds)


#: Shown when the network's own features place an input far from every training image.
OOD_WARNING = ("This image looks unlike the mammograms the model was trained on (its features are far from "
               "the training images'); the score may be meaningless.")


#: Shown for a DICOM "For Processing" image (raw detector data, which the PACS path never scores).
FOR_PROCESSING_WARNING = ("This DICOM image is 'For Processing' (raw detector data, before the processing that makes "
                          "the image a reader sees); the model was trained on processed mammograms, so the score may "
                          "be meaningless. Score the 'For Presentation' image instead.")


def input_warnings(pixels: np.ndarray, prepared: Any, metadata: dict[str, Any] | None = None) -> list[str]:
    """Cheap checks on a decoded image, as sentences a person can read (empty when nothing is wrong)."""
    if int(pixels.max()) - int(pixels.min()) < 8 or float(pixels.std()) < 2.0:
        return ["The image is almost uniform (all black, all white or one grey); it is not a mammogram."]
    out = list(prepared.warnings)
    if (metadata or {}).get("photometric_assumed"):
        out.append("The DICOM file does not say whether low values are dark or bright (no Photometric "
                   "Interpretation); it was read as MONOCHROME2. Check that the image is not inverted.")
    if (metadata or {}).get("for_processing"):
        out.append(FOR_PROCESSING_WARNING)
    return out


def _decode(source: Source, name: str | None) -> Prediction:
    label = name or (str(source) if isinstance(source, (str, Path)) else "<upload>")
    try:
        raw = source if isinstance(source, (bytes, bytearray, memoryview)) else read_file(source, label)
        image = load_image(bytes(raw), name=label)
    except ImageReadError as exc:
        return Prediction(name=label, error=str(exc))
    return Prediction(name=label, image=image, sha256=hashlib.sha256(raw).hexdigest())


def decode_ahead(card: dict[str, Any], paths: Sequence[str | Path], pool: ThreadPoolExecutor, *,
                 keep_images: bool = False, limit: int = 1024) -> list[Future]:
    """Start preparing the first `limit` inputs in `pool`, with the preprocessing `card` names, while the
    model is still loading; pass the result to `score_many(started=...)` (e.g. through `score_paths`).

    Start-up (importing TensorFlow aside: loading and freezing the model) runs on one core; this puts
    the other one to work. Without `keep_images` the decoded originals are dropped as soon as each
    input is prepared, so the inputs waiting for the model cost about 50 kB each.
    """
    preparer = Predictor.preparer(card)

    def load(path: str | Path) -> Prediction:
        pred = preparer.prepare_one(path, str(path))
        if not keep_images:
            pred.image = None
        return pred

    return [pool.submit(load, path) for path in paths[:limit]]


def score_paths(predictor: Predictor, paths: Sequence[str | Path], **kwargs: Any) -> Iterator[Prediction]:
    """Convenience: score file paths (folders already expanded) with `Predictor.score_many`."""
    return predictor.score_many([(p, str(p)) for p in paths], **kwargs)
