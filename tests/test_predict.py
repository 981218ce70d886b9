"""The Predictor: batch and single scoring agree, order is kept, bad inputs don't stop a batch, threads are safe."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from mammo_core.inference.predict import Predictor  # noqa: E402

from .factories import png_bytes, synthetic_mammogram  # noqa: E402


@pytest.fixture(scope="module")
def predictor(tiny_weights):
    return Predictor.load("tiny-paper", root=tiny_weights)


@pytest.mark.parametrize("batch_size", [3, 16], ids=["tf.data pipeline", "one batch, no pipeline"])
def test_batches_keep_order_and_report_failures(predictor, batch_size):
    good = [png_bytes(synthetic_mammogram(s, malignant=bool(s % 2))) for s in range(7)]
    items = [(good[0], "g0"), (b"", "empty"), (good[1], "g1"), (good[2], "g2"), (b"junk", "junk"),
             *[(g, f"g{i}") for i, g in enumerate(good[3:], start=3)], (b"", "tail-empty")]
    done = []
    batched = list(predictor.score_many(items, batch_size=batch_size, progress=done.append))
    assert [p.name for p in batched] == [name for _, name in items]
    assert [p.error is not None for p in batched] == [False, True, False, False, True, False, False, False, False, True]
    assert done[-1] == len(items) and done == sorted(done)
    for (data, name), p in zip(items, batched):
        if p.error is None:
            single = predictor.score_one(data, name=name)
            assert single.probability == pytest.approx(p.probability, abs=1e-5)
            np.testing.assert_allclose(single.heatmap, p.heatmap, atol=1e-4)
            assert p.label == predictor.decision(p.probability) and len(p.sha256) == 64


@pytest.mark.parametrize("batch_size", [1, 32])
def test_all_inputs_bad(predictor, batch_size):
    done = []
    out = list(predictor.score_many([(b"", "a"), (b"xx", "b")], batch_size=batch_size, progress=done.append))
    assert [p.error is not None for p in out] == [True, True] and done[-1] == 2


def test_probability_only_matches_gradcam_path(predictor):
    images = np.stack([synthetic_mammogram(s, malignant=True) for s in range(5)])
    with_cam, cams = predictor.score_arrays(images, with_cam=True)
    without, none = predictor.score_arrays(images, with_cam=False)
    assert none is None and cams.shape == (5, 224, 224)
    np.testing.assert_allclose(with_cam, without, atol=1e-5)


def test_concurrent_calls_from_threads(predictor):
    """Several app sessions share one Predictor: concurrent calls must give the same answers as serial ones."""
    images = [synthetic_mammogram(s, malignant=bool(s % 2)) for s in range(8)]
    serial = [predictor.score_arrays(img[None])[0][0] for img in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda img: predictor.score_arrays(img[None])[0][0], images * 3))
    np.testing.assert_allclose(parallel, serial * 3, atol=1e-5)
