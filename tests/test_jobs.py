"""Background training runs (mammo_core.store.jobs): start, find again from disk, one at a time, cancel."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from mammo_core.errors import DatasetError, TrainingBusyError
from mammo_core.store import jobs, registry
from mammo_core.training.train import TrainConfig


def _forget_children() -> None:
    """Simulate another process (a reloaded server) that did not start the runs itself."""
    for proc in list(jobs._CHILDREN.values()):
        proc.poll()
    jobs._CHILDREN.clear()


def test_start_training_finishes_in_background_and_registers_model(tiny_dataset, tmp_path):
    root = tmp_path / "weights"
    config = TrainConfig(data_dir=str(tiny_dataset), name="bg-model", epochs=1, batch_size=8)
    run = jobs.start_training(config, root)
    assert run.active, run.state
    record = json.loads((run.run_dir / jobs.RUN_FILE).read_text())
    assert record["pid"] == run.pid and record["model"] == "bg-model"
    assert "--progress-file" in record["args"]

    # A second start while the first runs is refused with a message naming the run.
    with pytest.raises(TrainingBusyError, match="bg-model"):
        jobs.start_training(TrainConfig(data_dir=str(tiny_dataset), name="other", epochs=1, batch_size=8), root)

    done = jobs.wait(run, timeout=300)
    assert done.state == "finished", jobs.log_tail(done)
    assert done.progress["model"] == "bg-model"
    assert "auc" in done.progress["metrics"]
    assert [e.name for e in registry.list_models(root)] == ["bg-model"]
    assert jobs.history_rows(done)[0]["epoch"] == 1

    _forget_children()
    again = jobs.current_run(root)
    assert again is not None and again.run_id == run.run_id and again.state == "finished"
    assert [r.run_id for r in jobs.list_runs(root)] == [run.run_id]


def test_cancel_stops_the_run_and_writes_no_model(tiny_dataset, tmp_path):
    root = tmp_path / "weights"
    config = TrainConfig(data_dir=str(tiny_dataset), name="to-cancel", epochs=500, batch_size=8)
    run = jobs.start_training(config, root)
    deadline = time.monotonic() + 240
    while (now := jobs.load_run(run.run_dir)).state != "running":
        assert now.active, f"run ended before it could be cancelled: {now.state} {jobs.log_tail(now)}"
        assert time.monotonic() < deadline, "training never reported progress"
        time.sleep(0.5)
    assert 0.0 <= now.fraction_done() < 1.0
    cancelled = jobs.cancel(now, timeout=60)
    assert cancelled.state == "cancelled"
    assert not cancelled.active
    assert not (root / "to-cancel").exists()
    assert not list(root.glob(".tmp-*")), "the temporary model folder was not cleaned up"
    # The lock is free again: a new start is accepted up to the dataset check.
    from mammo_core.store.run_safety import training_in_progress

    assert not training_in_progress(root)


def test_start_rejects_bad_options_before_launching(tiny_dataset, tmp_path):
    root = tmp_path / "weights"
    with pytest.raises(ValueError, match="model name"):
        jobs.start_training(TrainConfig(data_dir=str(tiny_dataset), name="bad name!", epochs=1), root)
    with pytest.raises(DatasetError, match="not found"):
        jobs.start_training(TrainConfig(data_dir=str(tmp_path / "nowhere"), name="x", epochs=1), root)
    (root / "taken").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="taken"):
        jobs.start_training(TrainConfig(data_dir=str(tiny_dataset), name="taken", epochs=1), root)
    assert jobs.list_runs(root) == []


def test_a_run_whose_process_vanished_is_reported_died(tmp_path):
    root = tmp_path / "weights"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    run_dir = jobs.runs_dir(root) / "20200101T000000-ghost"
    run_dir.mkdir(parents=True)
    (run_dir / jobs.LOG_FILE).write_text("Killed\n")
    (run_dir / jobs.RUN_FILE).write_text(json.dumps({
        "run_id": "20200101T000000-ghost", "pid": proc.pid, "model": "ghost", "args": [], "config": {},
        "started": "2020-01-01T00:00:00+00:00", "log_path": str(run_dir / jobs.LOG_FILE),
        "progress_path": str(run_dir / jobs.PROGRESS_FILE), "root": str(root)}))
    (run_dir / jobs.PROGRESS_FILE).write_text(json.dumps({"state": "running", "epoch": 1, "epochs": 2,
                                                          "step": 1, "steps": 2}))
    run = jobs.current_run(root)
    assert run.state == "died"
    assert "Killed" in run.error
    assert run.fraction_done() == pytest.approx(0.25)


@pytest.fixture(autouse=True)
def _data_roots(monkeypatch, tiny_dataset, tmp_path):
    """Training data may come from the tiny dataset's folder and this test's tmp folder."""
    import os

    monkeypatch.setenv(jobs.DATA_ROOTS_ENV, os.pathsep.join([str(tiny_dataset.parent), str(tmp_path)]))


def test_training_data_only_from_configured_roots(tiny_dataset, tmp_path, monkeypatch):
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    (outside / ".ssh").mkdir(parents=True, exist_ok=True)
    (outside / "id_rsa").write_text("secret")
    roots = [tiny_dataset.parent]
    assert jobs.resolve_training_data(str(tiny_dataset), roots) == tiny_dataset.resolve()
    assert jobs.resolve_training_data(tiny_dataset.name, roots) == tiny_dataset.resolve()  # relative: in the first root
    for typed in (str(outside), "/root", "/", f"{tiny_dataset}/../../{outside.name}"):
        with pytest.raises(DatasetError) as info:
            jobs.resolve_training_data(typed, roots)
        assert str(info.value).startswith(typed) and "not inside" in str(info.value)
        assert ".ssh" not in str(info.value) and "id_rsa" not in str(info.value)
    link = tiny_dataset.parent / "escape-link"
    link.symlink_to(outside, target_is_directory=True)
    try:
        with pytest.raises(DatasetError, match="not inside"):  # a link inside a root that leads out of it
            jobs.resolve_training_data(str(link), roots)
    finally:
        link.unlink()
    with pytest.raises(DatasetError, match="no training data folders are configured"):
        jobs.resolve_training_data(str(tiny_dataset), [])
    monkeypatch.delenv(jobs.DATA_ROOTS_ENV)
    monkeypatch.delenv("MAMMO_DATA_DIR", raising=False)
    with pytest.raises(DatasetError, match="no training data folders"):
        jobs.start_training(TrainConfig(data_dir=str(tiny_dataset), name="x", epochs=1), tmp_path / "w")
    assert not (tmp_path / "w" / jobs.RUNS_DIR).exists()


def test_a_bad_dataset_layout_never_lists_the_folder(tmp_path):
    folder = tmp_path / "home"
    for name in (".ssh", "private-notes", "Smith_Anna"):
        (folder / name).mkdir(parents=True)
    with pytest.raises(DatasetError) as info:
        jobs.start_training(TrainConfig(data_dir=str(folder), name="x", epochs=1), tmp_path / "w")
    message = str(info.value)
    assert str(folder) in message
    assert not any(name in message for name in (".ssh", "private-notes", "Smith_Anna")), message


def test_read_only_or_full_weights_folder_is_refused_before_launching(tiny_dataset, tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    from mammo_core.errors import ModelDirError

    root = tmp_path / "weights"
    root.mkdir()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(ModelDirError, match="only 0 MB free"):
        jobs.start_training(TrainConfig(data_dir=str(tiny_dataset), name="x", epochs=1), root)
    monkeypatch.undo()
    monkeypatch.setenv(jobs.DATA_ROOTS_ENV, str(tiny_dataset.parent))
    real_write_bytes = type(root).write_bytes

    def read_only(self, data):
        if self.name.startswith(".write-check"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write_bytes(self, data)

    monkeypatch.setattr(type(root), "write_bytes", read_only)
    with pytest.raises(ModelDirError) as info:
        jobs.start_training(TrainConfig(data_dir=str(tiny_dataset), name="x", epochs=1), root)
    assert "read-only" in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in root.iterdir()) == []  # nothing left behind
