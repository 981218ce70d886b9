"""The app under several sessions (issue 15): what a loaded model leaves behind must not slow every
session's script run or hold memory. Timings are in `bench/app_load.py` and docs/BENCHMARKS.md; these
tests check the mechanisms."""

from __future__ import annotations

import gc

import pytest

from tests.test_app import app_env, metric, no_exception, start  # noqa: F401 - app_env is a fixture


@pytest.fixture
def fresh_model_cache():
    from appkit import shared

    shared._load_predictor.clear()
    gc.unfreeze()
    yield
    shared._load_predictor.clear()
    gc.unfreeze()


def test_loaded_model_is_kept_out_of_the_post_run_garbage_collection(app_env, tiny_weights, sample_png,  # noqa: F811
                                                                       fresh_model_cache):
    """Streamlit runs gc.collect() after every script run; with TensorFlow and a model loaded that walked
    ~500,000 objects (0.4-0.8 s holding the GIL, for every session). After the Review page loads the model,
    the model and what was alive with it are in the permanent generation, so the collection skips them."""
    from streamlit import config as st_config

    from appkit import shared

    assert st_config.get_option("runner.postScriptGC"), "Streamlit no longer collects after each run"
    app_env(tiny_weights)
    at = start("review")
    at.file_uploader[0].set_value([("scan.png", sample_png, "image/png")]).run()
    no_exception(at)
    assert metric(at, "Probability of malignancy")
    predictor = shared._load_predictor("tiny-grouped", str(tiny_weights), shared._signature(tiny_weights / "tiny-grouped"))
    assert gc.get_freeze_count() > 10_000
    model_id = id(predictor.model)
    assert not any(id(o) == model_id for o in gc.get_objects()), "the model is still walked by every gc.collect()"


def test_model_load_returns_freed_heap_to_the_os(monkeypatch, fresh_model_cache):
    """Loading a model leaves ~0.9 GB of freed heap that glibc keeps; the app asks it back (malloc_trim)."""
    import ctypes

    from appkit import shared

    calls = []

    class FakeLibc:
        def malloc_trim(self, pad):
            calls.append(pad)
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: FakeLibc())
    shared.settle_after_model_load()
    assert calls == [0]
    assert gc.get_freeze_count() > 0

