"""Append-only SQLite audit log of every scored image: which file, which model, what it said.

One row per scored image: UTC time, the signed-in user, the file's SHA-256 and a *masked* display
name, the model's name and SHA-256, the probability, the threshold and the decision, plus an
optional reviewer note (the only field that can change later). File names are data, not
identifiers: PACS exports are often named after the patient (`Smith^Anna_ID12345.dcm`), so by
default `mask_file_name` replaces digit runs and name-like letter runs before the name is stored
(`***^***_ID#.dcm`); the SHA-256 identifies the file. Set MAMMO_AUDIT_KEEP_FILE_NAMES=1 (or pass
`keep_file_names=True`) to store names as given, for sites that want them.

The database file is created with mode 0600 (owner only) in a 0700 folder; SQLite gives its
-wal and -shm files the same mode. `AuditLog.scoped` gives a per-user view: a reader sees and
exports only their own rows, an admin everything.

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
from typing import Any, Iterable, Iterator, Sequence

from mammo_core import config

log = logging.getLogger(__name__)

#: Columns in table order; `to_csv` writes them in this order.
COLUMNS: tuple[str, ...] = (
    "id",
    "time",
    "user",
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
    user          TEXT,
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

#: Environment variable that keeps original file names in the log (any of 1, true, yes).
KEEP_FILE_NAMES_ENV = "MAMMO_AUDIT_KEEP_FILE_NAMES"

#: Letter runs kept by `mask_file_name`: technical words of mammogram file names, not names.
SAFE_WORDS: frozenset[str] = frozenset("""
    scan scans image img mammo mammogram mammography mg dicom dcm png jpg jpeg tif tiff bmp
    left right lcc rcc lmlo rmlo cc mlo ml lm xccl view series study img upload file copy crop roi
    id benign malignant normal mass calc test train val sample example synthetic tomo synth
    broken damaged truncated original processed for presentation raw""".split())
_RUNS = re.compile(r"[^\W\d_]+|\d+", re.UNICODE)  # letter runs and digit runs


def mask_file_name(name: str | None) -> str | None:
    """A display name with identifiers masked: every digit run becomes '#', every letter run of two
    or more letters that is not a technical word (`SAFE_WORDS`) becomes '***'; separators and a
    known image extension are kept. `Smith^Anna_ID12345.dcm` -> `***^***_ID#.dcm`.

    Why by hand: no library masks free-form file names; DICOM de-identification works on tags.
    """
    if name is None:
        return None
    from mammo_core.config import IMAGE_EXTENSIONS

    stem, dot, ext = name.rpartition(".")
    if not dot or "." + ext.lower() not in IMAGE_EXTENSIONS:
        stem, ext = name, ""

    def mask(match: re.Match) -> str:
        run = match.group(0)
        if run.isdigit():
            return "#"
        return run if len(run) < 2 or run.lower() in SAFE_WORDS else "***"

    return _RUNS.sub(mask, stem) + ("." + ext if ext else "")


def keep_file_names_default() -> bool:
    return os.environ.get(KEEP_FILE_NAMES_ENV, "").strip().lower() in ("1", "true", "yes")


def default_audit_path() -> Path:
    """Audit database path: `MAMMO_AUDIT_DB`, else `<repo>/audit/audit.sqlite3`."""
    return Path(os.environ.get("MAMMO_AUDIT_DB", config.REPO_ROOT / "audit" / "audit.sqlite3"))


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256 of `data`, the form `record` expects for `file_sha256`."""
    return hashlib.sha256(data).hexdigest()



def rows_to_csv(rows: Iterable[Sequence[Any]]) -> str:
    """Audit rows (in `COLUMNS` order) as CSV text with a header line, each cell made formula-safe; shared
    by the SQLite and PostgreSQL stores."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_csv_safe(value) for value in tuple(row)])
    return buffer.getvalue()

class AuditLog:
    """The audit log in one SQLite file; safe to share between threads and processes.

    Args:
        path: the database file; its folder is created (0700) if missing, the file itself 0600.
        keep_file_names: store file names as given instead of masked (default: MAMMO_AUDIT_KEEP_FILE_NAMES).
    """

    def __init__(self, path: Path, *, keep_file_names: bool | None = None) -> None:
        self.path = Path(path)
        self.keep_file_names = keep_file_names_default() if keep_file_names is None else bool(keep_file_names)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _create_private(self.path)
        with self._connect() as conn:
            mode = self._enable_wal(conn)
            if str(mode).lower() != "wal":
                log.warning("audit log %s: WAL mode unavailable (journal_mode=%s)", self.path, mode)
            with self._write(conn):
                conn.execute(_SCHEMA)
                columns = {row[1] for row in conn.execute("PRAGMA table_info(scores)")}
                if "user" not in columns:  # a log written before users were recorded
                    conn.execute("ALTER TABLE scores ADD COLUMN user TEXT")

    def scoped(self, user: str, *, all_users: bool = False) -> "AuditView":
        """The log as `user` may use it: their rows only, or every row with `all_users` (admins)."""
        return AuditView(self, user, all_users)

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
        user: str | None = None,
    ) -> int:
        """Append one scored image; return its row id. `file_name` is masked unless the log keeps
        names (see `mask_file_name`); `user` is who asked for the score.

        Raises:
            ValueError: a hash that is not 64 hex characters, or a probability or threshold
                outside [0, 1]; the message names the bad value.
        """
        row = new_row(self.keep_file_names, file_sha256=file_sha256, file_name=file_name, model_name=model_name,
                      model_sha256=model_sha256, probability=probability, threshold=threshold, decision=decision,
                      note=note, user=user)
        with self._connect() as conn, self._write(conn):
            cursor = conn.execute(
                f"INSERT INTO scores ({', '.join(COLUMNS[1:])}) VALUES ({', '.join('?' * len(row))})",
                row,
            )
            return int(cursor.lastrowid)

    def set_note(self, row_id: int, note: str | None, *, user: str | None = None) -> None:
        """Set (or clear, with None) the reviewer note of a row; with `user`, only a row of that
        user. KeyError if there is no such row."""
        where, args = "id = ?", [int(row_id)]
        if user is not None:
            where, args = where + " AND user = ?", args + [str(user)]
        with self._connect() as conn, self._write(conn):
            changed = conn.execute(f"UPDATE scores SET reviewer_note = ? WHERE {where}", (note, *args)).rowcount
        if changed == 0:
            raise KeyError(f"audit log {self.path}: no row with id {row_id}" + (" of this user" if user else ""))

    def recent(self, limit: int = 50, *, user: str | None = None) -> list[dict[str, Any]]:
        """The `limit` newest rows (of `user` only, when given), newest first, as dicts keyed by `COLUMNS`."""
        where, args = ("WHERE user = ?", (str(user),)) if user is not None else ("", ())
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT {', '.join(COLUMNS)} FROM scores {where} ORDER BY id DESC LIMIT ?", (*args, int(limit))
            ).fetchall()
        return [dict(row) for row in rows]

    def to_csv(self, *, user: str | None = None) -> str:
        """Every row (of `user` only, when given), oldest first, as CSV text with a header line."""
        where, args = ("WHERE user = ?", (str(user),)) if user is not None else ("", ())
        with self._connect() as conn:
            return rows_to_csv(conn.execute(f"SELECT {', '.join(COLUMNS)} FROM scores {where} ORDER BY id", args))

    def __len__(self) -> int:
        with self._connect() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0])


class AuditView:
    """The audit log as one user may use it (see `AuditLog.scoped`): `record` stamps the user;
    `recent`, `to_csv` and `set_note` cover the user's own rows, or every row when `all_users`."""

    def __init__(self, log: AuditLog, user: str, all_users: bool) -> None:
        self.log, self.user, self.all_users = log, str(user), bool(all_users)

    def record(self, **fields: Any) -> int:
        fields.pop("user", None)
        return self.log.record(**fields, user=self.user)

    def set_note(self, row_id: int, note: str | None) -> None:
        self.log.set_note(row_id, note, user=None if self.all_users else self.user)

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.log.recent(limit, user=None if self.all_users else self.user)

    def to_csv(self) -> str:
        return self.log.to_csv(user=None if self.all_users else self.user)

    def __len__(self) -> int:
        return len(self.recent(limit=-1))


def new_row(keep_file_names: bool, *, file_sha256: str, file_name: str | None, model_name: str, model_sha256: str,
            probability: float, threshold: float, decision: str, note: str | None = None,
            user: str | None = None) -> tuple:
    """The validated values of one new row, in `COLUMNS[1:]` order (every backend stores this tuple).

    Raises ValueError naming a hash that is not 64 hex characters, a probability or threshold outside
    [0, 1], or an empty decision.
    """
    file_sha256 = _check_sha256("file_sha256", file_sha256)
    model_sha256 = _check_sha256("model_sha256", model_sha256)
    probability = _check_unit("probability", probability)
    threshold = _check_unit("threshold", threshold)
    if not isinstance(decision, str) or not decision:
        raise ValueError(f"decision must be a non-empty string, got {decision!r}")
    return (
        datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        None if user is None else str(user),
        file_sha256,
        file_name if keep_file_names else mask_file_name(file_name),
        str(model_name),
        model_sha256,
        probability,
        threshold,
        decision,
        note,
    )


#: A database URL for the audit log: `sqlite:///path` or `postgresql://user:password@host:port/db`.
AUDIT_URL_ENV = "MAMMO_AUDIT_URL"


def open_audit_log(url: str | None = None, *, keep_file_names: bool | None = None) -> Any:
    """The audit log that `url` (default: MAMMO_AUDIT_URL) names: a shared PostgreSQL log for
    `postgresql://...` (`audit_pg.PostgresAuditLog`, same API), a SQLite file for `sqlite:///path`;
    without a URL the embedded SQLite default (`default_audit_path`). ValueError for another scheme
    (the message never repeats the URL, which may hold a password)."""
    url = url if url is not None else os.environ.get(AUDIT_URL_ENV, "").strip()
    if not url:
        return AuditLog(default_audit_path(), keep_file_names=keep_file_names)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        from mammo_core.store.audit_pg import PostgresAuditLog

        return PostgresAuditLog(url, keep_file_names=keep_file_names)
    if scheme == "sqlite" and url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return AuditLog(Path(url[len("sqlite:///"):]), keep_file_names=keep_file_names)
    raise ValueError(f"{AUDIT_URL_ENV}: expected sqlite:///PATH or postgresql://..., got a URL of scheme {scheme or 'none'!r}")


def _create_private(path: Path) -> None:
    """Create the database file owner-only (0600) before SQLite opens it; tighten an older, looser one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
        except OSError as exc:  # not our file: say so, keep going
            log.warning("audit log %s: could not restrict its permissions (%s)", path, exc)
        return
    os.close(fd)


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
