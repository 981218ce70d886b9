"""File helpers every writer shares: a file's sha256, atomic text writes, strict JSON, plain storage errors.

Readers see a file's old content or its new content, never a partial one (`atomic_write_text`); cards and
results are strict JSON with NaN written as null (`dumps`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file so readers see either the old content or the new, never a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def storage_error_message(exc: OSError, what: str) -> str:
    """One line for an OSError while writing `what`: disk full and read-only folders said plainly."""
    where = exc.filename or what
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: the disk is full; {what} was not written (nothing was left behind). Free some space and retry."
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{where}: the folder is read-only or not writable by this user; {what} was not written."
    return f"{where}: {exc.strerror or exc}; {what} was not written."


def plain_json(value: Any) -> Any:
    """Plain JSON values: NaN and infinities become None; NumPy scalars and arrays become Python ones."""
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # NumPy scalar or array
        return plain_json(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(obj: Any) -> str:
    """Strict JSON text (NaN written as null), indented, ending in a newline: cards and results files."""
    return json.dumps(plain_json(obj), indent=2, allow_nan=False) + "\n"
