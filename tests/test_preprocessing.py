"""The one preprocessing: breast found, labels dropped, crop, chest wall left, intensity range, idempotence,
and Grad-CAM drawn back onto the original."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mammo_core.io.preprocessing import (CEILING, FLOOR, LEGACY, PREPROCESSING_ID, card_preprocessing, model_input,
                                         prepare, to_original)

DATA = os.environ.get("MAMMO_DATA_DIR")


def full_field(*, chest_wall: str = "left", height: int = 1200, width: int = 900, bits12: bool = False) -> np.ndarray:
    """A synthetic full-field mammogram: a half-ellipse breast against one side of a black frame, a
    bright lesion, a burned-in "RCC" label block in the far corner, noise."""
    rng = np.random.default_rng(0)
    img = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(img)
    d.ellipse((-width // 2, height // 8, width * 2 // 3, height * 7 // 8), fill=110)
    d.ellipse((width // 5, height // 2 - 40, width // 5 + 80, height // 2 + 40), fill=200)  # lesion
    d.rectangle((width - 150, 30, width - 40, 90), fill=255)  # the burned-in label
    arr = np.clip(np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (height, width)), 0, 255)
    if chest_wall == "right":
        arr = arr[:, ::-1]
    return arr.astype(np.uint8)


@pytest.mark.parametrize("orientation", ["left", "right", "left-upside-down", "right-upside-down"])
def test_breast_cropped_label_dropped_chest_wall_left(orientation):
    image = full_field(chest_wall=orientation.split("-")[0])
    if orientation.endswith("upside-down"):
        image = image[::-1]
    p = prepare(image)
    assert p.breast_found and not p.warnings
    assert 0.2 < p.breast_fraction < 0.7
    out = p.pixels
    assert out.shape == (224, 224) and out.dtype == np.uint8
    # the label (255 in the far corner) is gone: the crop holds the breast only
    top, left, bottom, right = p.geometry.crop
    assert right - left < image.shape[1] * 0.8
    # chest wall on the left: the left third holds more tissue than the right third
    assert (out[:, :75] > 0).sum() > (out[:, -75:] > 0).sum()
    # intensities: background exactly 0, breast 1st/99th percentiles at FLOOR/CEILING
    inside = out[out > 0]
    assert inside.min() >= FLOOR
    lo, hi = np.percentile(inside, (1, 99))
    assert abs(lo - FLOOR) <= 2 and abs(hi - CEILING) <= 3


def test_bit_depth_and_contrast_do_not_change_the_input():
    """A darker, low-contrast rendering of the same breast lands in the same range."""
    image = full_field()
    dim = (image.astype(np.float32) * 0.5 + 10).astype(np.uint8)
    a, b = prepare(image).pixels.astype(int), prepare(dim).pixels.astype(int)
    assert np.abs(a - b).mean() < 4


def test_idempotent_on_its_own_output():
    once = prepare(full_field()).pixels
    twice = prepare(once).pixels
    assert np.abs(twice.astype(int) - once.astype(int)).max() <= 3


def test_no_breast_is_a_warning_not_an_error():
    for frame in (np.zeros((300, 300), np.uint8), np.full((300, 300), 255, np.uint8)):
        p = prepare(frame)
        assert not p.breast_found and p.warnings and p.pixels.shape == (224, 224)


def test_heatmap_maps_back_onto_the_original():
    """A hot spot on the lesion in the model input lands on the lesion in the original, flip included."""
    for side in ("left", "right"):
        image = full_field(chest_wall=side)
        p = prepare(image)
        lesion = (p.pixels > 215)
        heat = lesion.astype(np.float32)
        back = to_original(heat, p.geometry)
        assert back.shape == image.shape
        hot = back > 0.5
        assert hot.any()
        assert image[hot].mean() > 170  # on the bright lesion, not the 110 tissue or the background
        small = to_original(heat, p.geometry, (120, 90))
        assert small.shape == (120, 90) and small.max() > 0.5


def test_stretch_and_legacy_names():
    image = full_field()
    assert model_input(image, PREPROCESSING_ID).shape == (224, 224)
    assert model_input(image, "breast-crop-stretch-v1").shape == (224, 224)
    assert np.array_equal(model_input(image, LEGACY),
                          np.asarray(Image.fromarray(image).resize((224, 224), Image.BILINEAR)))
    assert card_preprocessing({}) == LEGACY
    assert card_preprocessing({"input_pipeline": PREPROCESSING_ID}) == PREPROCESSING_ID
    with pytest.raises(ValueError, match="unknown preprocessing"):
        model_input(image, "nope")


@pytest.mark.skipif(not DATA, reason="MAMMO_DATA_DIR is not set; the real-dataset check needs the Augmented INbreast folder")
def test_idempotent_on_dataset_cutouts():
    files = sorted(Path(DATA, "test").rglob("*.png"))[::97][:20]
    for f in files:
        once = prepare(np.asarray(Image.open(f).convert("L"))).pixels
        again = prepare(once).pixels
        assert np.abs(again.astype(int) - once.astype(int)).max() <= 3, f.name


@pytest.mark.parametrize("drop", ["PhotometricInterpretation", "ImageLaterality"])
def test_full_field_dicom_without_tags_goes_through_the_same_path(tmp_path, tiny_weights, drop):
    """A 12-bit full-field DICOM (breast against the right edge, a burned-in label) with a tag missing is
    scored with the breast crop, its Grad-CAM drawn back onto the original frame."""
    from mammo_core.inference.predict import Predictor

    from .test_dicom import make_dataset, write

    image = full_field(chest_wall="right").astype(np.uint16) * 16  # 12-bit values
    ds = make_dataset(image, ImageLaterality="R")
    if hasattr(ds, drop):
        delattr(ds, drop)
    path = write(ds, tmp_path / "IM00001")
    predictor = Predictor.load("tiny-grouped", root=tiny_weights)
    assert predictor.preprocessing == PREPROCESSING_ID
    pred = predictor.score_one(path, name="IM00001")
    assert pred.error is None, pred.error
    assert pred.geometry is not None and pred.geometry.flipped  # chest wall on the right -> flipped
    assert not any("No breast" in w for w in pred.warnings)
    assert any("MONOCHROME2" in w for w in pred.warnings) == (drop == "PhotometricInterpretation")
    back = pred.heatmap_on_original()
    assert back.shape == image.shape
    assert np.array_equal(pred.model_input, prepare(pred.image.pixels).pixels)
