"""SIGTERM during training: raised wherever the main thread is, except inside `cancel_at_batch_end` (around
Keras fits), where the handler only records it and a callback raises Cancelled at the next batch boundary.

These tests prove the mechanism (where Cancelled is raised); the segmentation fault it guards against
(an exception unwinding from the middle of Keras' `fit`) was seen once in CI and never reproduced.
"""

from __future__ import annotations


import numpy as np
import pytest

from mammo_core.store import run_safety
from mammo_core.store.run_safety import Cancelled, cancel_at_batch_end, sigterm_cancels

from .factories import sigterm_and_wait

SIGNAL_AT_BATCH = 2


def test_outside_the_deferred_mode_sigterm_raises_at_once():
    reached = []
    with sigterm_cancels() as requested:
        with pytest.raises(Cancelled):
            sigterm_and_wait(requested)
            reached.append("after the signal")
        assert reached == [] and requested.is_set()
        sigterm_and_wait(requested)  # a second SIGTERM (during the cleanup) is ignored
    assert run_safety._ACTIVE == []


def test_in_the_deferred_mode_sigterm_waits_for_a_check_and_the_block_end_raises():
    reached = []
    with sigterm_cancels() as requested:
        with pytest.raises(Cancelled):
            with cancel_at_batch_end() as callbacks:
                assert len(callbacks) == 1
                sigterm_and_wait(requested)  # recorded, not raised
                reached.append("after the signal")
            reached.append("not reached: the block's end raises")
        assert reached == ["after the signal"]
        assert requested.deferred == 0
        sigterm_and_wait(requested)  # the second is still ignored, outside the block as well
    assert run_safety._ACTIVE == []


def test_without_sigterm_cancels_the_block_does_nothing():
    with cancel_at_batch_end() as callbacks:
        assert callbacks == []


@pytest.mark.parametrize("deferred", [True, False])
def test_sigterm_inside_a_keras_fit_is_raised_at_the_end_of_its_batch(deferred):
    """SIGTERM sent (and handled) at the beginning of batch 2. Deferred: batch 2 completes and Cancelled
    comes from the cancel callback's batch-end hook; otherwise (the old behaviour, still used outside fits)
    it comes from wherever the main thread was, here the callback that sent the signal."""
    pytest.importorskip("tensorflow")
    import keras

    events: list[str] = []

    class SignalAtBatch(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            events.append(f"begin {batch}")
            if batch == SIGNAL_AT_BATCH:
                sigterm_and_wait(requested)
                events.append("signal handled")

        def on_train_batch_end(self, batch, logs=None):
            events.append(f"end {batch}")

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    with sigterm_cancels() as requested:
        with pytest.raises(Cancelled) as raised:
            if deferred:
                with cancel_at_batch_end() as cancel:
                    model.fit(x, y, batch_size=2, epochs=3, shuffle=False, verbose=0,
                              callbacks=[SignalAtBatch(), *cancel])  # the recorder's batch end first
            else:
                model.fit(x, y, batch_size=2, epochs=3, shuffle=False, verbose=0, callbacks=[SignalAtBatch()])
    raised_in = [entry.name for entry in raised.traceback]
    if deferred:
        # batch 2 completed and batch 3 never began (16 batches an epoch: not an epoch boundary) ...
        assert events == ["begin 0", "end 0", "begin 1", "end 1", "begin 2", "signal handled", "end 2"]
        assert raised_in[-2:] == ["_check", "check"]  # ... and Cancelled came from CancelAtBatchEnd
    else:
        assert events == ["begin 0", "end 0", "begin 1", "end 1", "begin 2"]
        assert "_check" not in raised_in and "handler" in raised_in
    assert requested.is_set() and requested.deferred == 0
