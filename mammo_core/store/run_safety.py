"""Process safety of a training run: one run at a time (an `flock` lock the kernel releases when its holder
dies, so a killed run never leaves a stale lock), SIGTERM turned into a clean cancellation, and half-written
model folders (`.tmp-<name>-<pid>`) of dead runs removed.
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
from typing import Iterator

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


@contextlib.contextmanager
def sigterm_cancels() -> Iterator[threading.Event]:
    """Turn SIGTERM into a Cancelled exception so cleanup runs (main thread only).

    Yields an Event set when SIGTERM arrived. The exception is raised wherever the main thread is, and
    TensorFlow or Keras code there may wrap it in an error of its own; the caller uses the Event to
    report such an error as the cancellation it is. A second SIGTERM during the cleanup is ignored.
    """
    requested = threading.Event()

    def handler(signum, frame):  # noqa: ARG001
        if not requested.is_set():
            requested.set()
            raise Cancelled("training cancelled")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        yield requested
        return
    try:
        yield requested
    finally:
        signal.signal(signal.SIGTERM, previous)


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
