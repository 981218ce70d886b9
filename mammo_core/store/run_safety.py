"""Process safety of a training run: one run at a time (an `flock` lock the kernel releases when its holder
dies, so a killed run never leaves a stale lock), SIGTERM turned into a clean cancellation (raised at the next
batch boundary while a Keras `fit` runs, `cancel_at_batch_end`), and half-written model folders
(`.tmp-<name>-<pid>`) of dead runs removed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

from mammo_core.config import weights_dir
from mammo_core.errors import MammoError, TrainingBusyError
from mammo_core.store.procs import pid_running

LOCK_FILE = ".train.lock"


class Cancelled(MammoError):
    """Training was cancelled (SIGTERM or Ctrl-C); nothing was written."""


@contextlib.contextmanager
def training_lock(root: Path) -> Iterator[None]:
    """Hold the one-training-at-a-time lock in `root`; TrainingBusyError if another run holds it."""
    root.mkdir(parents=True, exist_ok=True)
    fh = open(root / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise TrainingBusyError(f"a training run is already in progress ({holder}); wait for it or cancel it.") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}")
        fh.flush()
        yield
    finally:
        fh.close()  # closing releases the flock


def training_in_progress(root: Path | None = None) -> bool:
    """True when some process holds the training lock."""
    root = Path(root) if root is not None else weights_dir()
    path = root / LOCK_FILE
    if not path.exists():
        return False
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False


def remove_stale_tmp_dirs(root: Path) -> None:
    """Delete half-written model directories left by killed runs (we hold the lock, so none is live)."""
    for path in root.glob(".tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and (not pid.isdigit() or not pid_running(int(pid)) or int(pid) == os.getpid()):
            shutil.rmtree(path, ignore_errors=True)


class CancelRequest(threading.Event):
    """The Event `sigterm_cancels` yields: set when SIGTERM arrived.

    `deferred` counts the open `cancel_at_batch_end` blocks; while it is non-zero the SIGTERM handler only
    sets the Event and the cancellation is raised later, at a safe point, by `check`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.deferred = 0  # changed by the main thread only, like the handler that reads it

    def check(self) -> None:
        """Raise Cancelled if SIGTERM arrived; call it only where ordinary Python code is on the stack."""
        if self.is_set():
            raise Cancelled("training cancelled")


#: The requests of the open `sigterm_cancels` blocks that installed their handler, innermost last.
_ACTIVE: list[CancelRequest] = []


@contextlib.contextmanager
def sigterm_cancels() -> Iterator[CancelRequest]:
    """Turn SIGTERM into a Cancelled exception so cleanup runs (main thread only).

    Yields a `CancelRequest` (an Event) set when SIGTERM arrived. Outside `cancel_at_batch_end` the
    exception is raised wherever the main thread is (decoding images, writing files), and TensorFlow or
    Keras code there may wrap it in an error of its own; the caller uses the Event to report such an
    error as the cancellation it is. Inside `cancel_at_batch_end` (around Keras fits) the handler only
    sets the Event and a Keras callback raises at the next batch boundary: an exception raised in the
    middle of Keras' `fit`, with TensorFlow's runtime mid-step, once ended a run in a segmentation fault.
    A second SIGTERM during the cleanup is ignored.
    """
    requested = CancelRequest()

    def handler(signum, frame):  # noqa: ARG001
        if not requested.is_set():
            requested.set()
            if not requested.deferred:
                raise Cancelled("training cancelled")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        yield requested
        return
    _ACTIVE.append(requested)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGTERM, previous)
        _ACTIVE.remove(requested)


@contextlib.contextmanager
def cancel_at_batch_end(requested: CancelRequest | None = None) -> Iterator[list[Any]]:
    """Around Keras fits: SIGTERM only records the request, and Cancelled is raised at a batch boundary.

    Yields the callbacks to add to every Keras `fit` run in the block (one `cancel_callback`): it raises
    Cancelled at the end of the batch (train, validation or predict) or epoch during which SIGTERM
    arrived, from ordinary Python code, instead of the handler raising wherever the main thread is. When
    the block ends normally after a SIGTERM that no callback has acted on yet (it came after the last
    batch), Cancelled is raised there. Other code in the block delays a cancellation until the next
    check, so keep the block to the fits. `requested` defaults to the innermost open `sigterm_cancels`;
    with none (not under `sigterm_cancels`, or its handler could not be installed) the block changes
    nothing and yields no callbacks.
    """
    if requested is None:
        requested = _ACTIVE[-1] if _ACTIVE else None
    if requested is None:
        yield []
        return
    requested.check()
    requested.deferred += 1
    try:
        yield [cancel_callback(requested)]
    finally:
        requested.deferred -= 1
    requested.check()


def cancel_callback(requested: CancelRequest) -> Any:
    """A Keras callback that raises Cancelled at the next batch or epoch boundary once `requested` is set."""
    import keras  # here, not at module level: mammo_core.store stays free of TensorFlow until a fit needs it

    class CancelAtBatchEnd(keras.callbacks.Callback):
        """Raise Cancelled at the first batch or epoch boundary after SIGTERM (synchronous: it overrides
        the batch hooks, so Keras never dispatches them to a worker thread)."""

        def _check(self, *args: Any, **kwargs: Any) -> None:  # noqa: ARG002
            requested.check()

        on_train_batch_end = on_test_batch_end = on_predict_batch_end = _check
        on_epoch_begin = on_epoch_end = _check

    return CancelAtBatchEnd()


@contextlib.contextmanager
def staging_dir(root: Path, name: str) -> Iterator[Path]:
    """A fresh hidden folder `root/.tmp-<name>-<pid>` to build a model directory in (call under the lock).

    Half-written folders of dead runs are removed first. The caller renames the folder into place when
    it is complete; if anything is raised before that, the folder is deleted and the exception goes on.
    """
    remove_stale_tmp_dirs(root)
    tmp_dir = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        yield tmp_dir
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
