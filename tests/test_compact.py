"""mammo_core.store.compact: model.keras with float16 kernels loads as the same float32 model, rounded."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from mammo_core.store.compact import WEIGHTS_ENTRY, compact_keras_file, save_compact  # noqa: E402


def _model():
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(32, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(256, name="hidden")(x)
    outputs = keras.layers.Dense(1, name="head")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    # statistics and weights well away from float16's grid, a variance of several hundred among them
    model.get_layer("bn").set_weights([rng.normal(1, 0.3, 32), rng.normal(0, 2, 32), rng.normal(0, 5, 32),
                                       rng.uniform(100, 400, 32)])
    model.get_layer("conv").set_weights([rng.normal(0, 0.2, (3, 3, 1, 32)), rng.normal(0, 0.1, 32)])
    return model


def test_kernels_round_to_float16_and_vectors_stay_exact(tmp_path):
    model = _model()
    full, half = tmp_path / "full.keras", tmp_path / "half.keras"
    model.save(full)
    counts = save_compact(model, half)
    assert counts == {"float16": 3 * 3 * 32 + 32 * 256 + 256, "float32": 32 + 4 * 32 + 256 + 1, "other": 0}
    loaded = keras.saving.load_model(half, compile=False, safe_mode=True)
    assert {v.dtype for v in loaded.weights} == {"float32"}  # computes in float32 like the original
    for original, back in zip(model.weights, loaded.weights):
        a, b = original.numpy(), back.numpy()
        if a.ndim >= 2:
            np.testing.assert_array_equal(b, a.astype(np.float16).astype(np.float32))
            assert not np.array_equal(a, b)  # it was rounded: the test would see a float32 file
        else:
            np.testing.assert_array_equal(b, a)
    x = np.random.default_rng(1).random((4, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=2e-3, atol=2e-3)
    with zipfile.ZipFile(full) as a, zipfile.ZipFile(half) as b:
        assert [i.filename for i in a.infolist()] == [i.filename for i in b.infolist()]
        assert b.getinfo(WEIGHTS_ENTRY).file_size < a.getinfo(WEIGHTS_ENTRY).file_size


def test_a_file_that_is_not_a_keras_model_is_refused_and_nothing_is_written(tmp_path):
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("config.json", "{}")
    target = tmp_path / "out.keras"
    target.write_bytes(b"the model a user relied on")
    with pytest.raises(ValueError, match="not a Keras 3 model file"):
        compact_keras_file(bad, target)
    assert target.read_bytes() == b"the model a user relied on"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.keras", "out.keras"]  # no temporary left
