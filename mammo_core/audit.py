"""Append-only SQLite audit log of every scored image: which file, which model, what it said.

One row per scored image: UTC time, the file's SHA-256 and name as given by the caller, the model's
name and SHA-256, the probability, the threshold and the decision, plus an optional reviewer note
(the only field that can change later). No patient identifiers are stored; callers that want
none in file names strip them before calling `record`.

Concurrency: the database is in WAL mode and every call opens its own short-lived connection
with a 30 s busy timeout; writes take the write lock up front (`BEGIN IMMEDIATE`). Several
threads and several processes (app workers, CLI runs) can therefore write at once without losing
rows. WAL needs a local file system (not NFS/SMB).

Example:
    >>> log = AuditLog(tmp_path / "audit.sqlite3")                  # doctest: +SKIP
    >>> row = log.record(file_sha256=sha256_hex(data), file_name="scan.png", model_name="paper-cnn",
    ...                  model_sha256=digest, probability=0.83, threshold=0.5, decision="malignant")
    >>> log.set_note(row, "agreed by second reader")               # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import re
import sqlite3
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from . import config

log = logging.getLogger(__name__)

#: Columns in table order; `to_csv` writes them in this order.
COLUMNS: tuple[str, ...] = (
    "id",
    "time",
    "file_sha256",
    "file_name",
    "model_name",
    "model_sha256",
    "probability",
    "threshold",
    "decision",
    "reviewer_note",
)

#: Seconds a connection waits for another writer before giving up.
BUSY_TIMEOUT_S: float = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    time          TEXT    NOT NULL,
    file_sha256   TEXT    NOT NULL,
    file_name     TEXT,
    model_name    TEXT    NOT NULL,
    model_sha256  TEXT    NOT NULL,
    probability   REAL    NOT NULL CHECK (probability >= 0 AND probability <= 1),
    threshold     REAL    NOT NULL CHECK (threshold >= 0 AND threshold <= 1),
    decision      TEXT    NOT NULL,
    reviewer_note TEXT
)
"""

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def default_audit_path() -> Path:
    """Audit database path: `MAMMO_AUDIT_DB`, else `<repo>/audit/audit.sqlite3`."""
    return Path(os.environ.get("MAMMO_AUDIT_DB", config.REPO_ROOT / "audit" / "audit.sqlite3"))


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256 of `data`, the form `record` expects for `file_sha256`."""
    return hashlib.sha256(data).hexdigest()


class AuditLog:
    """The audit log in one SQLite file; safe to share between threads and processes.

    Args:
        path: the database file; its folder is created if missing.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            mode = self._enable_wal(conn)
            if str(mode).lower() != "wal":
                log.warning("audit log %s: WAL mode unavailable (journal_mode=%s)", self.path, mode)
            with self._write(conn):
                conn.execute(_SCHEMA)

    @staticmethod
    def _enable_wal(conn: sqlite3.Connection) -> str:
        """Switch to WAL. Changing the journal mode needs an exclusive lock and SQLite answers
        'database is locked' at once (no busy wait) while another process holds it, e.g. when several
        sessions open a new log together; so retry until the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        delay = 0.005
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() == "wal":
                    return mode
                return conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.row_factory = sqlite3.Row
            yield conn
        finally:
            conn.close()

    @staticmethod
    @contextmanager
    def _write(conn: sqlite3.Connection) -> Iterator[None]:
        # Take the write lock at BEGIN, so a reader never has to upgrade (which can deadlock).
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def record(
        self,
        *,
        file_sha256: str,
        file_name: str | None,
        model_name: str,
        model_sha256: str,
        probability: float,
        threshold: float,
        decision: str,
        note: str | None = None,
    ) -> int:
        """Append one scored image; return its row id.

        Raises:
            ValueError: a hash that is not 64 hex characters, or a probability or threshold
                outside [0, 1]; the message names the bad value.
        """
        file_sha256 = _check_sha256("file_sha256", file_sha256)
        model_sha256 = _check_sha256("model_sha256", model_sha256)
        probability = _check_unit("probability", probability)
        threshold = _check_unit("threshold", threshold)
        if not isinstance(decision, str) or not decision:
            raise ValueError(f"decision must be a non-empty string, got {decision!r}")
        row = (
            datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            file_sha256,
            file_name,
            str(model_name),
            model_sha256,
            probability,
            threshold,
            decision,
            note,
        )
        with self._connect() as conn, self._write(conn):
            cursor = conn.execute(
                f"INSERT INTO scores ({', '.join(COLUMNS[1:])}) VALUES ({', '.join('?' * len(row))})",
                row,
            )
            return int(cursor.lastrowid)

    def set_note(self, row_id: int, note: str | None) -> None:
        """Set (or clear, with None) the reviewer note of a row. KeyError if the row does not exist."""
        with self._connect() as conn, self._write(conn):
            changed = conn.execute(
                "UPDATE scores SET reviewer_note = ? WHERE id = ?", (note, int(row_id))
            ).rowcount
        if changed == 0:
            raise KeyError(f"audit log {self.path}: no row with id {row_id}")

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The `limit` newest rows, newest first, as dicts keyed by `COLUMNS`."""
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT {', '.join(COLUMNS)} FROM scores ORDER BY id DESC LIMIT ?", (int(limit),)
            ).fetchall()
        return [dict(row) for row in rows]

    def to_csv(self) -> str:
        """Every row, oldest first, as CSV text with a header line (for download or export)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        with self._connect() as conn:
            for row in conn.execute(f"SELECT {', '.join(COLUMNS)} FROM scores ORDER BY id"):
                writer.writerow([_csv_safe(value) for value in tuple(row)])
        return buffer.getvalue()

    def __len__(self) -> int:
        with self._connect() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0])


def _csv_safe(value: object) -> object:
    """Neutralise spreadsheet formulas: text starting with = + - @ (or a tab/CR) gets a leading quote."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _check_sha256(name: str, value: str) -> str:
    text = str(value).strip().lower()
    if not _SHA256.match(text):
        raise ValueError(f"{name} must be a SHA-256 hex digest (64 hex characters), got {value!r}")
    return text


def _check_unit(name: str, value: float) -> float:
    number = float(value)
    if math.isnan(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
    return number
