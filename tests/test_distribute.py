"""Training under tf.distribute (mammo_core.training.distribute): mirrored over 2 logical CPUs, multi-worker with
2 real worker processes on free 127.0.0.1 ports, and resuming from a checkpoint.

Strategies must exist before any other TensorFlow operation, so the mirrored and multi-worker runs
are fresh processes (`python -m mammo_core train ...`); each takes about 15-40 s on a busy 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    return {**env, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _fields(value, prefix=""):
    """Every key path of a nested dict (lists of dicts by their first item)."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return _fields(value[0], prefix + "[]")
    if not isinstance(value, dict):
        return {prefix}
    return set().union(*[_fields(v, f"{prefix}.{k}") for k, v in value.items()]) | {prefix}


def test_multi_worker_two_processes_train_one_model(tiny_dataset, tmp_path):
    weights = tmp_path / "weights"
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mammo_core", "--weights", str(weights), "train", "--data", str(tiny_dataset),
             "--name", "mw", "--epochs", "2", "--batch-size", "8", "--strategy", "multi-worker"],
            env=_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path))
    logs = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, err[-3000:]
        logs.append(err)
    digests = [re.search(r"final weights sha256 ([0-9a-f]{64})", log).group(1) for log in logs]
    assert digests[0] == digests[1]  # both workers end with identical weights
    assert sorted(p.name for p in weights.iterdir() if not p.name.startswith(".") and p.is_dir()) == ["mw"]
    assert not list(weights.glob(".worker-*")) and not (weights / ".checkpoints").exists()
    card = json.loads((weights / "mw" / "card.json").read_text())
    assert card["training"]["computation"]["distribution"] == {"requested": "multi-worker",
                                                              "used": "MultiWorkerMirroredStrategy", "replicas": 2}
    assert card["config"]["strategy"] == "multi-worker"
    history = (weights / "mw" / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch") and "val_loss" in history[0] and len(history) == 3


MIRRORED = """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from mammo_core import cli
for name, strategy in (("m", "mirrored"), ("n", "none")):
    code = cli.main(["--weights", sys.argv[1], "train", "--data", sys.argv[2], "--name", name, "--epochs", "1",
                     "--batch-size", "8", "--strategy", strategy])
    assert code == 0, code
"""


def test_mirrored_over_two_logical_cpus_gives_the_same_card_fields_as_none(tiny_dataset, tmp_path):
    weights = tmp_path / "weights"
    done = subprocess.run([sys.executable, "-c", MIRRORED, str(weights), str(tiny_dataset)], env=_env(),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    mirrored, none = (json.loads((weights / n / "card.json").read_text()) for n in ("m", "n"))
    assert _fields(mirrored) == _fields(none)
    assert mirrored["training"]["computation"]["distribution"] == {"requested": "mirrored",
                                                                  "used": "MirroredStrategy", "replicas": 2}
    assert none["training"]["computation"]["distribution"]["replicas"] == 1
    assert 0.0 <= mirrored["metrics"]["test"]["auc"] <= 1.0


def test_custom_loop_resumes_from_its_checkpoint(tmp_path):
    import keras
    import tensorflow as tf

    from mammo_core.training.distribute import fit_custom, weights_digest

    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
        model.compile(optimizer=keras.optimizers.RMSprop(1e-2), loss="binary_crossentropy")
        return model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    ckpt = tmp_path / "weights" / ".checkpoints" / "run"

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("worker lost")

    first = build()
    with pytest.raises(RuntimeError, match="worker lost"):
        fit_custom(None, first, ds, epochs=4, global_batch_size=8, callbacks=[Crash()], checkpoints=ckpt, log=print)
    assert tf.train.latest_checkpoint(str(ckpt))  # two epochs saved before the crash
    saved = weights_digest(first)

    seen, messages = [], []

    class Epochs(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(epoch)

    restarted = build()
    assert weights_digest(restarted) != saved
    start = fit_custom(None, restarted, ds, epochs=4, global_batch_size=8, callbacks=[Epochs()], checkpoints=ckpt,
                       log=messages.append)
    assert start == 2 and seen == [2, 3] and "resuming after epoch 2" in messages[0]
    assert not ckpt.parent.exists()  # removed once training completed


def test_strategy_is_checked_before_training(tiny_dataset, tmp_path, monkeypatch, capsys):
    from mammo_core import cli

    monkeypatch.delenv("TF_CONFIG", raising=False)
    code = cli.main(["--weights", str(tmp_path / "w"), "train", "--data", str(tiny_dataset), "--name", "x",
                     "--strategy", "multi-worker"])
    assert code == 1 and "TF_CONFIG" in capsys.readouterr().err
    code = cli.main(["--weights", str(tmp_path / "w"), "train", "--data", str(tiny_dataset), "--name", "x",
                     "--arch", "efficientnet-lite0", "--channels", "3", "--strategy", "mirrored"])
    assert code == 1 and "--strategy none" in capsys.readouterr().err
