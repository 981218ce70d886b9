"""Tests for mammo_core.store.audit: no rows lost under concurrent threads and processes, notes, CSV
export, validation, and the absence of patient-identifier columns."""

from __future__ import annotations

import csv
import io
import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pytest

from mammo_core import config
from mammo_core.store.audit import COLUMNS, AuditLog, default_audit_path, mask_file_name, sha256_hex

MODEL_SHA = sha256_hex(b"model weights")


def _record(log: AuditLog, tag: str, probability: float = 0.7, **overrides) -> int:
    fields = dict(
        file_sha256=sha256_hex(tag.encode()),
        file_name=f"{tag}.png",
        model_name="paper-cnn",
        model_sha256=MODEL_SHA,
        probability=probability,
        threshold=0.5,
        decision="malignant" if probability >= 0.5 else "benign",
    )
    fields.update(overrides)
    return log.record(**fields)


def _process_writer(path: str, worker: int, rows: int) -> None:
    log = AuditLog(Path(path))  # every process opens (and may create) the database itself
    for i in range(rows):
        _record(log, f"p{worker}-{i}", probability=(i % 10) / 10)


def test_concurrent_processes_and_threads_lose_no_rows(tmp_path):
    path = tmp_path / "audit.sqlite3"
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    processes = [ctx.Process(target=_process_writer, args=(str(path), w, 50)) for w in range(4)]
    for process in processes:
        process.start()

    log = AuditLog(path)
    errors: list[BaseException] = []

    def thread_writer(worker: int) -> None:
        try:
            for i in range(25):
                _record(log, f"t{worker}-{i}")
        except BaseException as exc:  # surfaced below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=thread_writer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    assert not errors, errors
    assert len(log) == 4 * 50 + 4 * 25
    hashes = {row["file_sha256"] for row in log.recent(limit=1000)}
    assert hashes == {sha256_hex(f"p{w}-{i}".encode()) for w in range(4) for i in range(50)} | {
        sha256_hex(f"t{w}-{i}".encode()) for w in range(4) for i in range(25)
    }
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_record_and_recent(tmp_path):
    log = AuditLog(tmp_path / "a.sqlite3")
    first = _record(log, "one", probability=0.2)
    second = _record(log, "two", probability=0.9, note="urgent")
    assert second > first
    newest, oldest = log.recent()
    assert newest["id"] == second and oldest["id"] == first
    assert newest["reviewer_note"] == "urgent" and oldest["reviewer_note"] is None
    assert oldest["decision"] == "benign" and oldest["probability"] == pytest.approx(0.2)
    assert newest["file_sha256"] == sha256_hex(b"two") and newest["model_sha256"] == MODEL_SHA
    assert newest["time"].endswith("+00:00")  # UTC ISO 8601
    assert [row["id"] for row in log.recent(limit=1)] == [second]


def test_notes_update(tmp_path):
    log = AuditLog(tmp_path / "a.sqlite3")
    row = _record(log, "x")
    log.set_note(row, "second reader agrees")
    assert log.recent()[0]["reviewer_note"] == "second reader agrees"
    log.set_note(row, None)
    assert log.recent()[0]["reviewer_note"] is None
    with pytest.raises(KeyError, match="999"):
        log.set_note(999, "no such row")


def test_csv_export_has_header_and_rows(tmp_path):
    log = AuditLog(tmp_path / "a.sqlite3", keep_file_names=True)
    _record(log, "a", probability=0.1)
    _record(log, "b,with \"quotes\"", probability=0.95, note="line one\nline two")
    rows = list(csv.reader(io.StringIO(log.to_csv())))
    assert tuple(rows[0]) == COLUMNS
    assert len(rows) == 3
    by_name = {row[COLUMNS.index("file_name")]: row for row in rows[1:]}
    assert by_name["a.png"][COLUMNS.index("decision")] == "benign"
    tricky = by_name['b,with "quotes".png']
    assert tricky[COLUMNS.index("reviewer_note")] == "line one\nline two"
    assert float(tricky[COLUMNS.index("probability")]) == pytest.approx(0.95)


def test_csv_export_neutralises_spreadsheet_formulas(tmp_path):
    log = AuditLog(tmp_path / "a.sqlite3", keep_file_names=True)
    _record(log, "c", file_name="=HYPERLINK(\"http://x\").png", note="@SUM(A1)")
    row = list(csv.reader(io.StringIO(log.to_csv())))[1]
    assert row[COLUMNS.index("file_name")] == "'=HYPERLINK(\"http://x\").png"
    assert row[COLUMNS.index("reviewer_note")] == "'@SUM(A1)"
    assert log.recent()[0]["file_name"].startswith("=")  # stored as given; only the export is guarded


def test_file_name_is_kept_as_given_when_the_site_asks(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMMO_AUDIT_KEEP_FILE_NAMES", "1")
    log = AuditLog(tmp_path / "a.sqlite3")
    _record(log, "x", file_name=None)
    _record(log, "y", file_name="  odd name (1).PNG ")
    names = [row["file_name"] for row in log.recent()]
    assert names == ["  odd name (1).PNG ", None]


@pytest.mark.parametrize("given,stored", [
    ("Smith^Anna_ID12345.dcm", "***^***_ID#.dcm"),
    ("DOE_JOHN_19700101_LCC.dcm", "***_***_#_LCC.dcm"),
    ("scan.png", "scan.png"),
    ("müller-özgür 2024 left MLO.tiff", "***-*** # left MLO.tiff"),
    ("scan![t](https:HOST)[Re-login](https:HOST).png", "scan![t](***:***)[***-***](***:***).png"),
    ("no_extension_12", "***_***_#"),
])
def test_file_names_are_masked_by_default(tmp_path, monkeypatch, given, stored):
    monkeypatch.delenv("MAMMO_AUDIT_KEEP_FILE_NAMES", raising=False)
    log = AuditLog(tmp_path / "a.sqlite3")
    _record(log, "x", file_name=given)
    assert mask_file_name(given) == stored
    assert log.recent()[0]["file_name"] == stored
    assert log.recent()[0]["file_sha256"] == sha256_hex(b"x")  # the file stays identifiable by content
    exported = log.to_csv()
    for secret in ("Smith", "Anna", "12345", "DOE", "JOHN", "19700101", "müller", "HOST"):
        assert secret not in exported


def test_database_file_is_private(tmp_path):
    path = tmp_path / "audit" / "a.sqlite3"
    log = AuditLog(path)
    _record(log, "x")
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    for extra in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if extra.exists():
            assert extra.stat().st_mode & 0o077 == 0, extra
    loose = tmp_path / "old.sqlite3"
    AuditLog(loose)
    loose.chmod(0o644)
    AuditLog(loose)  # an older, world-readable log is tightened when opened
    assert loose.stat().st_mode & 0o777 == 0o600


def test_users_see_and_export_only_their_own_rows(tmp_path):
    log = AuditLog(tmp_path / "a.sqlite3")
    alice, bob, admin = log.scoped("alice"), log.scoped("bob"), log.scoped("root", all_users=True)
    a = alice.record(file_sha256=sha256_hex(b"a"), file_name="a.png", model_name="m", model_sha256=MODEL_SHA,
                     probability=0.2, threshold=0.5, decision="benign")
    bob.record(file_sha256=sha256_hex(b"b"), file_name="b.png", model_name="m", model_sha256=MODEL_SHA,
               probability=0.9, threshold=0.5, decision="malignant", user="alice")  # cannot pose as alice
    assert [r["user"] for r in alice.recent()] == ["alice"]
    assert [r["user"] for r in bob.recent()] == ["bob"]
    assert sorted(r["user"] for r in admin.recent()) == ["alice", "bob"]
    alice_csv = list(csv.DictReader(io.StringIO(alice.to_csv())))
    assert [r["user"] for r in alice_csv] == ["alice"] and alice_csv[0]["file_sha256"] == sha256_hex(b"a")
    assert len(list(csv.DictReader(io.StringIO(admin.to_csv())))) == 2
    with pytest.raises(KeyError):
        bob.set_note(a, "not my row")
    alice.set_note(a, "mine")
    assert log.recent(user="alice")[0]["reviewer_note"] == "mine"


def test_an_older_log_without_users_is_upgraded(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE scores (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, "
                     "file_sha256 TEXT NOT NULL, file_name TEXT, model_name TEXT NOT NULL, model_sha256 TEXT NOT NULL, "
                     "probability REAL NOT NULL, threshold REAL NOT NULL, decision TEXT NOT NULL, reviewer_note TEXT)")
        conn.execute("INSERT INTO scores (time, file_sha256, file_name, model_name, model_sha256, probability, "
                     "threshold, decision) VALUES ('t', ?, 'old.png', 'm', ?, 0.5, 0.5, 'malignant')",
                     (sha256_hex(b"o"), MODEL_SHA))
    log = AuditLog(path)
    _record(log, "new", user="carol")
    assert [(r["file_name"], r["user"]) for r in log.recent()] == [("***.png", "carol"), ("old.png", None)]


@pytest.mark.parametrize(
    "override,match",
    [
        ({"probability": 1.5}, "probability"),
        ({"probability": float("nan")}, "probability"),
        ({"threshold": -0.1}, "threshold"),
        ({"file_sha256": "abc"}, "file_sha256"),
        ({"model_sha256": "z" * 64}, "model_sha256"),
        ({"decision": ""}, "decision"),
    ],
)
def test_bad_values_are_refused(tmp_path, override, match):
    log = AuditLog(tmp_path / "a.sqlite3")
    with pytest.raises(ValueError, match=match):
        _record(log, "x", **override)
    assert len(log) == 0


def test_no_patient_identifier_columns(tmp_path):
    path = tmp_path / "a.sqlite3"
    AuditLog(path)
    with sqlite3.connect(path) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(scores)")]
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    assert set(columns) == set(COLUMNS) and len(columns) == len(COLUMNS)
    assert set(tables) <= {"scores", "sqlite_sequence"}
    for column in columns:
        assert not any(word in column.lower() for word in ("patient", "birth", "accession", "mrn", "dob"))


def test_default_path(monkeypatch, tmp_path):
    monkeypatch.delenv("MAMMO_AUDIT_DB", raising=False)
    assert default_audit_path() == config.REPO_ROOT / "audit" / "audit.sqlite3"
    monkeypatch.setenv("MAMMO_AUDIT_DB", str(tmp_path / "x.db"))
    assert default_audit_path() == tmp_path / "x.db"
