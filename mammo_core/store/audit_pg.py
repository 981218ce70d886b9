"""The audit log on a shared PostgreSQL server, for a department where several people use one app.

`PostgresAuditLog` has `audit.AuditLog`'s API, columns, masking and per-user views; choose it with
`MAMMO_AUDIT_URL=postgresql://user:password@host:5432/db` (`audit.open_audit_log`). It talks to
the server through psycopg 3. The schema is created or migrated on first use, under an advisory
lock so that several processes starting together do not race, and its version is kept in the
`mammo_audit_schema` table: no SQL for users to run.

Each thread keeps one connection in autocommit mode, so each row is one transaction and many
processes can write at once. When the server cannot be reached, `record` keeps the row in this
process's queue and raises `AuditUnavailable` naming the file (masked) and how many rows wait; the
queue is written, in order, before the next row once the server answers again. `pending()` lists
the rows still waiting. Messages never contain the password.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from mammo_core.errors import MammoError
from mammo_core.store.audit import COLUMNS, keep_file_names_default, new_row, rows_to_csv

#: Newest schema version; `_MIGRATIONS[v]` brings a database from version v to v + 1.
SCHEMA_VERSION = 2
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    0: ("""CREATE TABLE IF NOT EXISTS scores (
            id            BIGSERIAL PRIMARY KEY,
            time          TEXT NOT NULL,
            file_sha256   TEXT NOT NULL,
            file_name     TEXT,
            model_name    TEXT NOT NULL,
            model_sha256  TEXT NOT NULL,
            probability   DOUBLE PRECISION NOT NULL CHECK (probability >= 0 AND probability <= 1),
            threshold     DOUBLE PRECISION NOT NULL CHECK (threshold >= 0 AND threshold <= 1),
            decision      TEXT NOT NULL,
            reviewer_note TEXT)""",),
    1: ('ALTER TABLE scores ADD COLUMN IF NOT EXISTS "user" TEXT',
        'CREATE INDEX IF NOT EXISTS scores_user ON scores ("user")'),
}
_LOCK_KEY = 0x6D616D6D6F  # "mammo": serialises schema set-up between processes
CONNECT_TIMEOUT_S = 5
_COLS = ", ".join('"user"' if c == "user" else c for c in COLUMNS)


class AuditUnavailable(MammoError):
    """The audit server could not be reached; the message says which row waits in the queue."""


def redacted(url: str) -> str:
    """`url` without its password, for messages: postgresql://user@host:port/db."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{user}{parts.hostname or ''}{port}{parts.path}"


class PostgresAuditLog:
    """The audit log in a PostgreSQL database; safe to share between threads, processes and machines.

    Args:
        url: postgresql://user:password@host:port/database (a `+psycopg` driver suffix is accepted).
        keep_file_names: store file names as given instead of masked (default: MAMMO_AUDIT_KEEP_FILE_NAMES).
    """

    def __init__(self, url: str, *, keep_file_names: bool | None = None) -> None:
        self.url = url.replace("postgresql+psycopg://", "postgresql://", 1).replace("postgres://", "postgresql://", 1)
        self.where = redacted(self.url)
        self.keep_file_names = keep_file_names_default() if keep_file_names is None else bool(keep_file_names)
        self._local = threading.local()
        self._queue: deque[tuple] = deque()
        self._queue_lock = threading.Lock()
        with self._cursor() as cur:
            self._migrate(cur)

    # --- connections ---

    def _conn(self):
        import psycopg

        conn = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or getattr(self._local, "pid", None) != os.getpid()):
            conn = None  # closed, or inherited through fork: never share a socket between processes
        if conn is None:
            try:
                conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                       application_name="mammo_core audit")
            except psycopg.OperationalError as exc:
                raise AuditUnavailable(f"audit log {self.where}: the server cannot be reached "
                                       f"({_first_line(exc)})") from None
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _cursor(self):
        import contextlib

        import psycopg

        @contextlib.contextmanager
        def cursor():
            conn = self._conn()
            try:
                with conn.cursor() as cur:
                    yield cur
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self._local.conn = None
                with contextlib.suppress(Exception):
                    conn.close()
                raise AuditUnavailable(f"audit log {self.where}: the connection failed ({_first_line(exc)})") from None

        return cursor()

    @staticmethod
    def _migrate(cur) -> None:
        with cur.connection.transaction():
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            cur.execute("CREATE TABLE IF NOT EXISTS mammo_audit_schema (version INTEGER NOT NULL)")
            cur.execute("SELECT version FROM mammo_audit_schema")
            row = cur.fetchone()
            version = row[0] if row else 0
            if row is None:
                cur.execute("INSERT INTO mammo_audit_schema (version) VALUES (0)")
            if version > SCHEMA_VERSION:
                raise MammoError(f"the audit database has schema version {version}, newer than this program's "
                                 f"{SCHEMA_VERSION}; update mammo_core")
            for v in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[v]:
                    cur.execute(statement)
            cur.execute("UPDATE mammo_audit_schema SET version = %s", (SCHEMA_VERSION,))

    def schema_version(self) -> int:
        with self._cursor() as cur:
            cur.execute("SELECT version FROM mammo_audit_schema")
            return int(cur.fetchone()[0])

    # --- the AuditLog API ---

    def scoped(self, user: str, *, all_users: bool = False):
        from mammo_core.store.audit import AuditView

        return AuditView(self, user, all_users)

    def record(self, *, file_sha256: str, file_name: str | None, model_name: str, model_sha256: str,
               probability: float, threshold: float, decision: str, note: str | None = None,
               user: str | None = None) -> int:
        """Append one scored image; return its row id (see `audit.AuditLog.record`).

        Raises ValueError for a bad value, AuditUnavailable when the server is unreachable (the row is
        then queued and written before the next row that gets through)."""
        row = new_row(self.keep_file_names, file_sha256=file_sha256, file_name=file_name, model_name=model_name,
                      model_sha256=model_sha256, probability=probability, threshold=threshold, decision=decision,
                      note=note, user=user)
        insert = f"INSERT INTO scores ({_COLS.split(', ', 1)[1]}) VALUES ({', '.join(['%s'] * len(row))}) RETURNING id"
        with self._queue_lock:
            try:
                with self._cursor() as cur:
                    while self._queue:  # rows that waited for the server, oldest first
                        cur.execute(insert, self._queue[0])
                        self._queue.popleft()
                    cur.execute(insert, row)
                    return int(cur.fetchone()[0])
            except AuditUnavailable as exc:
                self._queue.append(row)
                raise AuditUnavailable(f"{exc}; the result for {row[3] or 'an unnamed file'} (sha256 "
                                       f"{row[2][:12]}...) was not recorded yet: it is queued with "
                                       f"{len(self._queue) - 1} earlier row(s) and will be written when the "
                                       f"server answers again, if this program is still running") from None

    def pending(self) -> list[dict[str, Any]]:
        """Rows waiting for the server, oldest first, as dicts keyed by `COLUMNS` (id None)."""
        with self._queue_lock:
            return [dict(zip(COLUMNS, (None, *row))) for row in self._queue]

    def set_note(self, row_id: int, note: str | None, *, user: str | None = None) -> None:
        where, args = "id = %s", [int(row_id)]
        if user is not None:
            where, args = where + ' AND "user" = %s', args + [str(user)]
        with self._cursor() as cur:
            cur.execute(f"UPDATE scores SET reviewer_note = %s WHERE {where}", (note, *args))
            changed = cur.rowcount
        if changed == 0:
            raise KeyError(f"audit log {self.where}: no row with id {row_id}" + (" of this user" if user else ""))

    def recent(self, limit: int = 50, *, user: str | None = None) -> list[dict[str, Any]]:
        where, args = ('WHERE "user" = %s', [str(user)]) if user is not None else ("", [])
        limit_sql = "" if limit is None or int(limit) < 0 else " LIMIT %s"
        with self._cursor() as cur:
            cur.execute(f"SELECT {_COLS} FROM scores {where} ORDER BY id DESC{limit_sql}",
                        (*args, *([int(limit)] if limit_sql else [])))
            rows = cur.fetchall()
        return [dict(zip(COLUMNS, row)) for row in rows]

    def to_csv(self, *, user: str | None = None) -> str:
        where, args = ('WHERE "user" = %s', (str(user),)) if user is not None else ("", ())
        with self._cursor() as cur:
            cur.execute(f"SELECT {_COLS} FROM scores {where} ORDER BY id", args)
            return rows_to_csv(cur)

    def __len__(self) -> int:
        with self._cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM scores")
            return int(cur.fetchone()[0])

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
