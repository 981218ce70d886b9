"""The command line: help, predict on good and bad files, models, evaluate, and clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

from mammo_core.cli import main  # noqa: E402

from .factories import png_bytes, synthetic_mammogram  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    good = png_bytes(synthetic_mammogram(3, malignant=True))
    (folder / "a_good.png").write_bytes(good)
    (folder / "b_empty.png").write_bytes(b"")
    (folder / "c_truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "d_text.png").write_text("this is not an image\n")
    (folder / "e_good.png").write_bytes(png_bytes(synthetic_mammogram(4, malignant=False)))
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return folder


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "models"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"python -m mammo_core {command}" in capsys.readouterr().out


def test_predict_scores_good_files_and_rejects_bad_ones(tiny_weights, mixed_folder, tmp_path, capsys):
    outdir = tmp_path / "cams"
    code = main(["--weights", str(tiny_weights), "predict", str(mixed_folder), "--json", "--gradcam", str(outdir)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 2
    by_name = {Path(r["path"]).name: r for r in lines}
    assert sorted(by_name) == ["a_good.png", "b_empty.png", "c_truncated.png", "d_text.png", "e_good.png"]
    for name in ("a_good.png", "e_good.png"):
        r = by_name[name]
        assert set(r) == {"path", "probability", "label", "threshold", "model", "in_distribution", "warnings"}
        assert r["in_distribution"] is True and r["warnings"] == []  # a synthetic breast on black
        assert 0.0 <= r["probability"] <= 1.0 and r["model"] == "tiny-grouped"
        assert r["label"] == ("malignant" if r["probability"] >= r["threshold"] else "benign")
    assert "empty" in by_name["b_empty.png"]["error"]
    assert "truncated" in by_name["c_truncated.png"]["error"] or "damaged" in by_name["c_truncated.png"]["error"]
    assert "not a readable image" in by_name["d_text.png"]["error"]
    assert sorted(p.name for p in outdir.iterdir()) == ["a_good_gradcam.png", "e_good_gradcam.png"]


def test_predict_all_good_exits_zero(tiny_weights, tmp_path, capsys):
    f = tmp_path / "x.png"
    f.write_bytes(png_bytes(synthetic_mammogram(5, malignant=False)))
    assert main(["--weights", str(tiny_weights), "predict", str(f), "--model", "tiny-paper"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(str(f)) and out.strip().split("\t")[2] in ("benign", "malignant")


def test_predict_unknown_model_is_a_clear_error(tiny_weights, tmp_path, capsys):
    f = tmp_path / "x.png"
    f.write_bytes(png_bytes(synthetic_mammogram(5, malignant=False)))
    assert main(["--weights", str(tiny_weights), "predict", str(f), "--model", "nope"]) == 1
    assert "model 'nope' not found" in capsys.readouterr().err


def test_models_lists_active(tiny_weights, capsys):
    assert main(["--weights", str(tiny_weights), "models", "--json"]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["tiny-grouped"]["active"] and not rows["tiny-paper"]["active"]
    assert rows["tiny-paper"]["protocol"] == "paper"


def test_models_table_columns_line_up_with_long_names(tiny_weights, tmp_path, capsys):
    import shutil

    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    long = "a-model-name-longer-than-thirty-two-characters"
    shutil.copytree(weights / "tiny-paper", weights / long)
    assert main(["--weights", str(weights), "models"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("  ", "* "))]
    rows = [line for line in lines if "paper-cnn" in line or "architecture" in line]
    assert any(long in line for line in rows) and len(rows) >= 3
    # the architecture column starts at the same offset on every row, the header's included
    assert len({line.index("architecture") if "architecture" in line and "name" in line else line.index("paper-cnn")
                for line in rows}) == 1


def test_evaluate_reads_recorded_predictions(tiny_weights, capsys):
    assert main(["--weights", str(tiny_weights), "evaluate", "--model", "tiny-paper", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    card = json.loads((tiny_weights / "tiny-paper" / "card.json").read_text())
    assert result["metrics"]["confusion_matrix"] == card["metrics"]["test"]["confusion_matrix"]
    assert main(["--weights", str(tiny_weights), "evaluate", "--model", "tiny-paper", "--threshold", "0"]) == 0
    text = capsys.readouterr().out
    assert "threshold=0.000" in text and "Paper split" in text


def test_evaluate_rescoring_matches_recorded(tiny_weights, tiny_dataset, capsys):
    assert main(["--weights", str(tiny_weights), "evaluate", "--model", "tiny-grouped", "--json"]) == 0
    recorded = json.loads(capsys.readouterr().out)["metrics"]
    assert main(["--weights", str(tiny_weights), "evaluate", "--model", "tiny-grouped", "--json",
                 "--data", str(tiny_dataset)]) == 0
    rescored = json.loads(capsys.readouterr().out)["metrics"]
    assert rescored["n"] == recorded["n"]
    assert rescored["auc"] == pytest.approx(recorded["auc"], abs=1e-6)


def test_corrupted_model_and_bad_dataset_give_messages_not_tracebacks(tiny_weights, tmp_path):
    weights = tmp_path / "w"
    shutil.copytree(tiny_weights / "tiny-paper", weights / "broken")
    (weights / "broken" / "model.keras").write_bytes(b"garbage")
    img = tmp_path / "x.png"
    img.write_bytes(png_bytes(synthetic_mammogram(1, malignant=True)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "mammo_core", *a], cwd=REPO, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    r = run("--weights", str(weights), "predict", str(img), "--model", "broken")
    assert r.returncode == 1 and "does not match" in r.stderr and "Traceback" not in r.stderr
    r = run("--weights", str(weights), "train", "--data", str(tmp_path / "missing"), "--name", "m")
    assert r.returncode == 1 and "dataset folder not found" in r.stderr and "Traceback" not in r.stderr
    assert not (weights / "m").exists()
