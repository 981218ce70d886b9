"""Is a process still running? One answer for the trainer's stale-folder clean-up and the job runner."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def pid_running(pid: int) -> bool:
    """True when process `pid` exists and has not exited (a zombie, exited but not yet reaped, is not
    running). A process of another user counts as running: it exists, even if we may not signal it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = (Path("/proc") / str(pid) / "stat").read_text()
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
    return True
