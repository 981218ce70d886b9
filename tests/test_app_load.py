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
    shared._glibc.cache_clear()
    gc.unfreeze()
    yield
    shared._load_predictor.clear()
    shared._glibc.cache_clear()
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


class _FakeSession:
    def __init__(self, sid: str) -> None:
        self.id, self.shut_down = sid, False

    def shutdown(self) -> None:
        self.shut_down = True


def _fake_runtime(monkeypatch, clock: list[float]):
    """A Streamlit runtime whose session manager holds a real MemorySessionStorage (the class the server
    uses, with its default 120 s TTL) on a clock the test moves (`clock[0]`, seconds)."""
    import threading
    import types

    from streamlit import runtime
    from streamlit.runtime.memory_session_storage import MemorySessionStorage

    storage = MemorySessionStorage()
    storage._cache._timer = lambda: clock[0]
    manager = types.SimpleNamespace(_session_storage=storage, _storage_lock=threading.Lock())
    monkeypatch.setattr(runtime, "exists", lambda: True)
    monkeypatch.setattr(runtime, "get_instance", lambda: types.SimpleNamespace(_session_mgr=manager))
    return storage


def test_streamlit_drops_expired_sessions_without_shutting_them_down(monkeypatch):
    """The Streamlit behaviour the app works around: a disconnected session past its TTL is dropped from
    the storage without AppSession.shutdown(), which is what frees its uploaded files. If this fails,
    Streamlit now shuts them down itself and `release_ended_sessions` may be obsolete."""
    from streamlit.runtime.session_manager import SessionInfo

    clock = [0.0]
    storage = _fake_runtime(monkeypatch, clock)
    old = _FakeSession("closed-browser")
    storage.save(SessionInfo(client=None, session=old, script_run_count=1))
    clock[0] = 121.0
    storage.save(SessionInfo(client=None, session=_FakeSession("later-visitor"), script_run_count=1))  # reaps `old`
    assert storage.get("closed-browser") is None
    assert not old.shut_down


def test_page_runs_shut_down_sessions_past_their_ttl(monkeypatch):
    from streamlit.runtime.session_manager import SessionInfo

    from appkit import shared

    clock = [0.0]
    storage = _fake_runtime(monkeypatch, clock)
    gone = [_FakeSession(f"closed-{i}") for i in range(3)]
    for session in gone:
        storage.save(SessionInfo(client=None, session=session, script_run_count=1))
    assert shared.release_ended_sessions() == 0  # still within the TTL: kept for reconnection
    clock[0] = 121.0
    assert shared.release_ended_sessions() == 3
    assert all(s.shut_down for s in gone)
    assert shared.release_ended_sessions() == 0  # each only once


def test_sessions_within_their_ttl_are_kept_for_reconnection(monkeypatch):
    from streamlit.runtime.session_manager import SessionInfo

    from appkit import shared

    clock = [0.0]
    storage = _fake_runtime(monkeypatch, clock)
    clock[0] = 60.0
    waiting = _FakeSession("network-blip")
    storage.save(SessionInfo(client=None, session=waiting, script_run_count=1))
    clock[0] = 179.0
    assert shared.release_ended_sessions() == 0
    assert not waiting.shut_down and storage.get("network-blip") is not None


def test_bench_png_variant_changes_the_bytes_not_the_pixels(tmp_path):
    """bench.app_load varies one large PNG per upload without re-encoding it: another sha256 (so no cache
    answers), the same decoded pixels, and a breast-like shape the app accepts as a mammogram."""
    import hashlib

    import numpy as np

    from bench.app_load import breast_like_png, png_variant
    from mammo_core.io.images import load_image

    base = breast_like_png(tmp_path / "base.png", width=400, height=500).read_bytes()
    one, two = png_variant(base, 1), png_variant(base, 2)
    assert len({hashlib.sha256(b).hexdigest() for b in (base, one, two)}) == 3
    pixels = load_image(base, name="base.png").pixels
    assert np.array_equal(load_image(two, name="two.png").pixels, pixels)
    assert pixels.shape == (500, 400) and pixels[:, :40].mean() > 100 and pixels[:, -20:].max() == 0


def test_review_returns_the_heap_after_the_run_that_scored(app_env, tiny_weights, sample_png, monkeypatch,  # noqa: F811
                                                            fresh_model_cache):
    """The heap is trimmed once the upload has been scored and its panels drawn (the run that scored ends
    by starting the page again with an empty uploader; that next run trims, when the full-size decode is
    garbage), and not on runs that score nothing."""
    import ctypes

    from appkit import plots

    events = []

    class FakeLibc:
        def malloc_trim(self, pad):
            events.append("trim")
            return 1

    outlined = plots.outlined

    def recording_panels(*args, **kwargs):
        events.append("panels")
        return outlined(*args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: FakeLibc())
    monkeypatch.setattr(plots, "outlined", recording_panels)
    app_env(tiny_weights)
    at = start("review")
    events.clear()  # the model load trims too
    at.file_uploader[0].set_value([("scan.png", sample_png, "image/png")]).run()
    no_exception(at)
    assert events == ["panels", "trim"]
    events.clear()
    at.slider[0].set_value(0.3).run()  # a rerun that scores nothing
    no_exception(at)
    assert events == ["panels"]


def test_releasing_memory_forks_no_process(monkeypatch, fresh_model_cache):
    """ctypes.util.find_library runs `ldconfig -p` in a subprocess: a fork of the whole server (1.7 GB of
    page tables copied, its RSS counted twice while it lives) after every scoring run. The C library is
    opened by name, once."""
    import subprocess

    from appkit import shared

    def no_fork(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "Popen", no_fork)
    shared.release_freed_memory()
    shared.release_freed_memory()


def test_background_reaper_frees_ended_sessions_with_no_page_run(monkeypatch):
    """Memory must come back after the last browser closes even if nobody opens a page again."""
    import threading

    from streamlit.runtime.session_manager import SessionInfo

    from appkit import shared

    clock = [0.0]
    storage = _fake_runtime(monkeypatch, clock)
    gone = _FakeSession("closed-browser")
    storage.save(SessionInfo(client=None, session=gone, script_run_count=1))
    clock[0] = 121.0
    stop = threading.Event()
    reaper = threading.Thread(target=shared.reap_until, args=(stop, 0.01), daemon=True)
    reaper.start()
    for _ in range(200):
        if gone.shut_down:
            break
        threading.Event().wait(0.01)
    stop.set()
    reaper.join(timeout=5)
    assert gone.shut_down and not reaper.is_alive()


def test_reaper_survives_a_failing_round(monkeypatch):
    import threading

    from appkit import shared

    calls = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("streamlit internals changed")
        return 0

    monkeypatch.setattr(shared, "release_ended_sessions", flaky)
    stop = threading.Event()
    reaper = threading.Thread(target=shared.reap_until, args=(stop, 0.01), daemon=True)
    reaper.start()
    for _ in range(200):
        if len(calls) >= 3:
            break
        threading.Event().wait(0.01)
    stop.set()
    reaper.join(timeout=5)
    assert len(calls) >= 3


def test_the_app_keeps_the_traced_scoring_call(app_env, tiny_weights, monkeypatch,  # noqa: F811
                                               fresh_model_cache):
    """The server loads models with freeze=False: a frozen ensemble graph would hold ~0.75 GB more for the
    server's lifetime (docs/BENCHMARKS.md) to save a few ms per upload."""
    from mammo_core.inference.predict import Predictor

    seen = []
    init = Predictor.__init__

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("freeze", True))
        init(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "__init__", recording)
    app_env(tiny_weights)
    at = start("review")
    no_exception(at)
    assert seen == [False]
