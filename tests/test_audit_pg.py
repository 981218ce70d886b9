"""The audit log on a real PostgreSQL server (mammo_core.store.audit_pg), started here on a free loopback port.

The server comes from Debian's postgresql package (scripts/install_cluster.sh): `initdb` into a
temporary folder (as the postgres user when we are root: initdb refuses root), `postgres` on
127.0.0.1 with a private socket folder, stopped by PID. The system's own cluster is never touched.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg missing: pip install -r requirements-cluster.txt")

from mammo_core.store.audit import COLUMNS, AUDIT_URL_ENV, AuditLog, open_audit_log, sha256_hex  # noqa: E402

MODEL_SHA = sha256_hex(b"model weights")
PASSWORD = "s3cret-Pa55"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A throwaway PostgreSQL cluster in a temporary folder; `url` has a password user."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            pytest.skip("PostgreSQL is not installed (scripts/install_cluster.sh installs Debian's postgresql)")
        self.bin = Path(bins[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="mammo-pg-"))
        os.chmod(self.root, 0o755)
        self.data, self.sockets = self.root / "data", self.root / "sockets"
        self.data.mkdir(mode=0o700)
        self.sockets.mkdir()
        self.user = None
        if os.geteuid() == 0:
            self.user = "postgres"
            shutil.chown(self.data, "postgres", "postgres")
            shutil.chown(self.sockets, "postgres", "postgres")
        cmd = [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            pytest.skip(f"initdb failed: {done.stderr.strip()[-300:]}")
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.start()
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE mammo LOGIN PASSWORD '{PASSWORD}'")
            conn.execute("CREATE DATABASE audit OWNER mammo")

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return f"postgresql://mammo:{PASSWORD}@127.0.0.1:{self.port}/audit"

    def start(self) -> None:
        # Popen(user=...) runs postgres itself as the postgres user, so proc.pid is the postmaster's PID.
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.sockets),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=50"],
            user=self.user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(self.admin_url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.skip("the PostgreSQL test server did not start")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)  # "fast" shutdown: disconnect clients, stop
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def fresh_database(self, name: str) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER mammo")
        return f"postgresql://mammo:{PASSWORD}@127.0.0.1:{self.port}/{name}"

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    server = PostgresServer()
    yield server
    server.remove()


def _record(log, tag: str, probability: float = 0.7, **overrides) -> int:
    fields = dict(file_sha256=sha256_hex(tag.encode()), file_name=f"{tag}.png", model_name="paper-cnn",
                  model_sha256=MODEL_SHA, probability=probability, threshold=0.5,
                  decision="malignant" if probability >= 0.5 else "benign")
    fields.update(overrides)
    return log.record(**fields)


def _writer(url: str, worker: int, rows: int) -> None:
    log = open_audit_log(url)  # every process opens the log (and may create the schema) itself
    for i in range(rows):
        _record(log, f"w{worker}-{i}", probability=(i % 10) / 10, user=f"user{worker}")


def test_four_processes_write_2000_rows_and_none_is_lost(postgres):
    url = postgres.fresh_database("concurrency")
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: nothing shared but the server
    processes = [ctx.Process(target=_writer, args=(url, w, 500)) for w in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
        assert process.exitcode == 0
    log = open_audit_log(url)
    assert len(log) == 2000
    rows = log.recent(limit=-1)
    assert {r["file_sha256"] for r in rows} == {sha256_hex(f"w{w}-{i}".encode()) for w in range(4) for i in range(500)}
    assert len({r["id"] for r in rows}) == 2000
    assert {r["user"] for r in rows} == {f"user{w}" for w in range(4)}
    assert log.schema_version() == 2


def test_same_api_as_sqlite_masking_users_notes_and_csv(postgres, monkeypatch, tmp_path):
    monkeypatch.setenv(AUDIT_URL_ENV, postgres.fresh_database("api"))
    monkeypatch.delenv("MAMMO_AUDIT_KEEP_FILE_NAMES", raising=False)
    pg = open_audit_log()
    sqlite = open_audit_log(f"sqlite:///{tmp_path / 'a.sqlite3'}")
    assert type(pg).__name__ == "PostgresAuditLog" and isinstance(sqlite, AuditLog)
    for log in (pg, sqlite):
        a = _record(log, "Smith^Anna_ID12345", probability=0.9, file_name="Smith^Anna_ID12345.dcm", user="alice")
        _record(log, "b", probability=0.1, user="bob")
        log.set_note(a, "=agreed by second reader")
        with pytest.raises(ValueError, match="probability"):
            _record(log, "bad", probability=1.5)
        with pytest.raises(KeyError):
            log.scoped("bob").set_note(a, "not mine")
    pg_rows, sqlite_rows = pg.recent(), sqlite.recent()
    assert list(pg_rows[0]) == list(COLUMNS)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("id", "time")} for r in rows]  # noqa: E731
    assert strip(pg_rows) == strip(sqlite_rows)
    assert pg_rows[1]["file_name"] == "***^***_ID#.dcm" and pg_rows[1]["user"] == "alice"
    # the app's audit section: a reader sees and exports only their rows, an admin everything
    reader, admin = pg.scoped("alice"), pg.scoped("carol", all_users=True)
    assert [r["user"] for r in reader.recent()] == ["alice"] and len(admin) == 2
    export = reader.to_csv().splitlines()
    assert export[0] == ",".join(COLUMNS) and len(export) == 2 and "'=agreed by second reader" in export[1]
    assert admin.record(**{k: v for k, v in dict(file_sha256=sha256_hex(b"c"), file_name="c.png", model_name="m",
                                                   model_sha256=MODEL_SHA, probability=0.5, threshold=0.5,
                                                   decision="malignant").items()}) > 0
    assert pg.recent(1)[0]["user"] == "carol"


def test_old_schema_is_migrated_on_first_use(postgres):
    url = postgres.fresh_database("migrate")
    with psycopg.connect(url, autocommit=True) as conn:  # a version-1 database: no user column
        conn.execute("CREATE TABLE mammo_audit_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO mammo_audit_schema VALUES (1)")
        conn.execute("CREATE TABLE scores (id BIGSERIAL PRIMARY KEY, time TEXT NOT NULL, file_sha256 TEXT NOT NULL, "
                     "file_name TEXT, model_name TEXT NOT NULL, model_sha256 TEXT NOT NULL, "
                     "probability DOUBLE PRECISION NOT NULL, threshold DOUBLE PRECISION NOT NULL, "
                     "decision TEXT NOT NULL, reviewer_note TEXT)")
        conn.execute("INSERT INTO scores (time, file_sha256, file_name, model_name, model_sha256, probability, "
                     "threshold, decision) VALUES ('t', %s, 'old.png', 'm', %s, 0.2, 0.5, 'benign')",
                     (sha256_hex(b"old"), MODEL_SHA))
    log = open_audit_log(url)
    assert log.schema_version() == 2
    _record(log, "new", user="dora")
    assert [(r["file_name"], r["user"]) for r in log.recent()] == [("***.png", "dora"), ("old.png", None)]


def test_server_going_away_queues_rows_and_says_which(postgres):
    url = postgres.fresh_database("outage")
    log = open_audit_log(url)
    _record(log, "before", file_name="left.png")
    postgres.stop()
    try:
        with pytest.raises(Exception) as info:
            _record(log, "Smith_during", file_name="Smith_during.png")
        message = str(info.value)
        assert type(info.value).__name__ == "AuditUnavailable"
        assert "***_***.png" in message and "queued" in message and "Smith" not in message
        assert PASSWORD not in message
        assert [r["file_name"] for r in log.pending()] == ["***_***.png"]
    finally:
        postgres.start()
    _record(log, "after", file_name="right.png")  # the queued row goes first
    assert [r["file_name"] for r in log.recent()] == ["right.png", "***_***.png", "left.png"]
    assert log.pending() == []


def test_predict_audit_records_every_scored_file(postgres, monkeypatch, tiny_weights, tmp_path, sample_png, capsys):
    from mammo_core import cli

    url = postgres.fresh_database("cli")
    monkeypatch.setenv(AUDIT_URL_ENV, url)
    good = tmp_path / "scan.png"
    good.write_bytes(sample_png)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    code = cli.main(["--weights", str(tiny_weights), "predict", str(good), str(tmp_path / "broken.png"),
                     "--json", "--audit", "--no-progress"])
    assert code == 2  # one input rejected
    rows = open_audit_log(url).recent()
    assert len(rows) == 1 and rows[0]["file_sha256"] == sha256_hex(sample_png)
    assert rows[0]["file_name"].endswith("scan.png") and rows[0]["user"]
