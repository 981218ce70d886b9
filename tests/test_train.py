"""Training writes complete model directories and never loses or overwrites an existing one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("tensorflow")

from mammo_core.errors import ModelDirError, TrainingBusyError  # noqa: E402
from mammo_core.store import registry  # noqa: E402
from mammo_core.store.card import read_card, write_card  # noqa: E402
from mammo_core.store.files import atomic_write_text, sha256_file  # noqa: E402
from mammo_core.models.fast_training import resolve_precision  # noqa: E402
from mammo_core.store.run_safety import Cancelled, training_in_progress, training_lock  # noqa: E402
from mammo_core.training.train import TrainConfig, train  # noqa: E402

from .factories import sigterm_and_wait  # noqa: E402


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tiny_weights):
    """The session's tiny paper-split model (conftest: 1 epoch on the 72-image tiny dataset), read-only."""
    return tiny_weights / "tiny-paper", tiny_weights


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def test_model_directory_is_complete(trained):
    model_dir, root = trained
    assert {"model.keras", "card.json", "history.csv", "test_predictions.csv"} <= {p.name for p in model_dir.iterdir()}
    card = read_card(model_dir)
    for key in ("name", "created", "architecture", "input_shape", "dataset", "split", "training", "threshold",
                "model_sha256", "metrics", "evaluation"):
        assert key in card, key
    assert card["model_sha256"] == sha256_file(model_dir / "model.keras")
    assert card["dataset"]["n_files"] == 72 and len(card["dataset"]["sha256"]) == 64
    assert card["split"]["protocol"] == "paper"
    assert card["split"]["shared_source_images"]["train-test"] == 8  # the paper layout leaks by construction
    test = card["metrics"]["test"]
    for key in ("loss", "accuracy", "auc", "per_class", "macro_avg", "weighted_avg", "confusion_matrix"):
        assert key in test
    assert set(test["per_class"]) == {"benign", "malignant"}
    computation = card["training"]["computation"]  # paper-cnn trains through fast_training.FastPaperCNN
    assert card["config"]["precision"] == "auto"  # conftest trains with the default
    # "auto" is bfloat16 on a CPU with native bfloat16 and no GPU, float32 elsewhere: what this machine resolves
    assert computation["block_order"].startswith("conv -> max-pool")
    assert computation["precision"] == resolve_precision("auto")
    history = pd.read_csv(model_dir / "history.csv")
    assert history["epoch"].tolist() == [1] and "val_loss" in history
    preds = pd.read_csv(model_dir / "test_predictions.csv")
    assert list(preds.columns) == ["path", "group", "patient", "label", "probability"]
    assert len(preds) == test["n"] == 24
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())
    assert registry.active_model_name(root) == "tiny-grouped"


def test_recorded_predictions_match_reloaded_model(trained, tiny_dataset):
    from mammo_core.inference.predict import Predictor

    model_dir, _ = trained
    preds = pd.read_csv(model_dir / "test_predictions.csv")
    predictor = Predictor.load(model_dir)
    results = list(predictor.score_many([(tiny_dataset / p, None) for p in preds["path"]], with_cam=False))
    got = [r.probability for r in results]
    assert got == pytest.approx(preds["probability"].tolist(), abs=1e-5)


def test_existing_model_is_never_overwritten(trained, tiny_dataset):
    model_dir, root = trained
    before = snapshot(model_dir)
    cfg = TrainConfig(data_dir=str(tiny_dataset), name="tiny-paper", protocol="paper", epochs=1, batch_size=8)
    with pytest.raises(FileExistsError, match="never overwritten"):
        train(cfg, root=root, log=lambda m: None)
    assert snapshot(model_dir) == before


def test_bad_options_are_refused(tiny_dataset, tmp_path):
    for kwargs, match in [({"name": "../evil"}, "model name"), ({"name": "ok", "epochs": 0}, "epochs"),
                          ({"name": "ok", "protocol": "random"}, "protocol"),
                          ({"name": "ok", "group_by": "patient"}, "patient map")]:
        with pytest.raises(ValueError, match=match):
            train(TrainConfig(data_dir=str(tiny_dataset), **kwargs), root=tmp_path, log=lambda m: None)


def test_one_training_at_a_time(tiny_dataset, tmp_path):
    with training_lock(tmp_path):
        assert training_in_progress(tmp_path)
        with pytest.raises(TrainingBusyError, match="already in progress"):
            train(TrainConfig(data_dir=str(tiny_dataset), name="second", epochs=1), root=tmp_path, log=lambda m: None)
    assert not training_in_progress(tmp_path)


def test_corrupted_model_is_detected_and_never_swapped(trained, tmp_path):
    import shutil

    model_dir, _ = trained
    root = tmp_path / "w"
    shutil.copytree(model_dir, root / "good")
    shutil.copytree(model_dir, root / "bad")
    card = read_card(root / "bad")
    card["created"] = "2999-01-01T00:00:00+00:00"  # newest, so it would be preferred
    write_card(root / "bad", card)
    data = bytearray((root / "bad" / "model.keras").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "bad" / "model.keras").write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="does not match"):
        registry.load_model(root / "bad")
    atomic_write_text(root / "ACTIVE", "bad\n")
    # No silent swap: the active model is still "bad", and loading it says why instead of using "good".
    assert registry.active_model_name(root) == "bad"
    with pytest.raises(ModelDirError, match="does not match"):
        registry.load_model(registry.resolve_model_dir(None, root=root))
    assert not hasattr(registry, "load_model_with_fallback")


def _start_training(weights: Path, dataset: Path, name: str, progress: Path, epochs: int = 20000):
    # Far more epochs than the tiny run could finish before the signal, however slow or starved the test
    # process is (with 200 epochs a loaded CI machine once finished training before SIGTERM arrived).
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(
        [sys.executable, "-m", "mammo_core", "--weights", str(weights), "train", "--data", str(dataset),
         "--name", name, "--protocol", "paper", "--epochs", str(epochs), "--batch-size", "8",
         "--progress-file", str(progress)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _wait_running(proc, progress: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        if progress.exists() and json.loads(progress.read_text()).get("state") == "running":
            return
        time.sleep(0.2)
    raise AssertionError("training did not start in time")


def test_sigterm_is_reported_as_cancelled_even_when_library_code_wraps_it(tmp_path, tiny_dataset, monkeypatch):
    """SIGTERM raises Cancelled wherever the main thread is; if TensorFlow/Keras code there turns it
    into an error of its own, train() must still report a cancellation and leave nothing behind."""
    from mammo_core.training import train as train_mod

    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises Cancelled here ...
        raise AssertionError("not reached")

    def library_wrapping(*args, **kwargs):
        try:
            wrapped()
        except Exception as exc:  # ... and library code re-raises it as something else
            raise RuntimeError("tensorflow: UnknownError in py_func") from exc

    monkeypatch.setattr(train_mod, "_train_into", library_wrapping)
    progress = tmp_path / "progress.json"
    with pytest.raises(Cancelled):
        train(TrainConfig(data_dir=str(tiny_dataset), name="x", epochs=1), root=tmp_path / "w",
              progress_path=progress, log=lambda m: None)
    assert json.loads(progress.read_text())["state"] == "cancelled"
    assert not (tmp_path / "w" / "x").exists() and not list((tmp_path / "w").glob(".tmp-*"))
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is restored


def test_sigterm_during_the_fit_is_raised_at_a_batch_boundary(tmp_path, tiny_dataset):
    """During Keras' fit the SIGTERM handler only records the request (raising from wherever the main thread
    is, with TensorFlow mid-step, once ended a run in a segmentation fault); the fit's cancel callback
    raises Cancelled at the next batch boundary, and nothing is written."""
    from mammo_core.store import run_safety

    seen: list[str] = []

    def on_progress(state):
        seen.append(f"epoch {state['epoch']} step {state['step']}")
        if len(seen) == 1:  # the first report: the beginning of epoch 1, inside the fit
            sigterm_and_wait(run_safety._ACTIVE[-1])  # the handler runs in here, and must not raise
            seen.append("handled, not raised")

    progress = tmp_path / "progress.json"
    with pytest.raises(Cancelled):
        train(TrainConfig(data_dir=str(tiny_dataset), name="x", protocol="paper", epochs=50, batch_size=8),
              root=tmp_path / "w", progress_path=progress, on_progress=on_progress, log=lambda m: None)
    assert seen == ["epoch 1 step 0", "handled, not raised"]  # raised at the end of the first batch
    assert json.loads(progress.read_text())["state"] == "cancelled"
    assert not (tmp_path / "w" / "x").exists() and not list((tmp_path / "w").glob(".tmp-*"))


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_killed_or_cancelled_training_loses_nothing(trained, tiny_dataset, tmp_path, how):
    import shutil

    model_dir, _ = trained
    root = tmp_path / "w"
    shutil.copytree(model_dir, root / "tiny")
    atomic_write_text(root / "ACTIVE", "tiny\n")
    before = snapshot(root / "tiny")
    progress = tmp_path / "progress.json"
    proc = _start_training(root, tiny_dataset, "new", progress)
    try:
        _wait_running(proc, progress)
        proc.send_signal(getattr(signal, how))
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # the signal was not obeyed: never leave a long training behind
            proc.kill()
            proc.wait()
    if how == "SIGTERM":
        assert code == 130, proc.stderr.read().decode()[-3000:]
        assert json.loads(progress.read_text())["state"] == "cancelled"
        assert not list(root.glob(".tmp-*"))
    assert not (root / "new").exists()
    assert snapshot(root / "tiny") == before
    assert registry.active_model_name(root) == "tiny"
    assert not training_in_progress(root)
    # a new run starts, cleans any half-written directory and completes
    new_dir = train(TrainConfig(data_dir=str(tiny_dataset), name="new", protocol="paper", epochs=1, batch_size=8),
                    root=root, log=lambda m: None)
    assert registry.verify_model_dir(new_dir)["name"] == "new"
    assert not list(root.glob(".tmp-*"))
