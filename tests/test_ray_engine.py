"""predict --engine ray (mammo_core.inference.ray_engine) against the local engine, on a real local Ray.

One local Ray (2 actors) is started per test and shut down at its end; each costs about 10-30 s on
a busy 2-core machine (Ray start-up, then TensorFlow and the model in every actor).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.data", reason="Ray missing: pip install -r requirements-cluster.txt (scripts/install_cluster.sh)")

from .factories import synthetic_mammogram, write_png  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def archive(tmp_path) -> list[str]:
    """Ten synthetic mammograms, an unreadable file, a non-image and a missing path."""
    paths = [str(write_png(tmp_path / "in" / f"scan{i:02d}.png", synthetic_mammogram(i, malignant=bool(i % 2))))
             for i in range(10)]
    (tmp_path / "in" / "truncated.png").write_bytes(Path(paths[0]).read_bytes()[:200])
    (tmp_path / "in" / "notes.png").write_bytes(b"not an image at all")
    return [*paths[:5], str(tmp_path / "in" / "truncated.png"), *paths[5:], str(tmp_path / "in" / "notes.png"),
            str(tmp_path / "in" / "missing.png")]


def _local_rows(model_dir: Path, paths: list[str]) -> list[dict]:
    from mammo_core.inference.predict import Predictor, score_paths

    predictor = Predictor.load(model_dir)
    return [p.to_json(predictor.name) for p in score_paths(predictor, paths, with_cam=False, batch_size=4)]


def test_ray_scores_equal_local_scores_and_errors_are_the_same_rows(tiny_weights, archive):
    from mammo_core.inference.ray_engine import score_paths_ray

    model_dir = tiny_weights / "tiny-grouped"
    local = _local_rows(model_dir, archive)
    out = list(score_paths_ray(archive, model_dir, workers=2, batch_size=4))
    rows = [row for row, _ in out]
    assert [r["path"] for r in rows] == archive  # every input once, in input order
    for mine, theirs in zip(rows, local):
        assert set(mine) == set(theirs)
        if "error" in theirs:
            assert mine == theirs  # the same message for the same unreadable file
        else:
            assert mine["probability"] == pytest.approx(theirs["probability"], abs=1e-5)
            assert {k: v for k, v in mine.items() if k != "probability"} == \
                   {k: v for k, v in theirs.items() if k != "probability"}
    assert sum("error" in r for r in rows) == 3
    assert all(len(sha) == 64 for row, sha in out if "error" not in row)


def test_cli_ray_engine_streams_json_and_parquet(tiny_weights, archive, tmp_path):
    import pandas as pd

    out_file = tmp_path / "scores.parquet"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-m", "mammo_core", "--weights", str(tiny_weights), "predict", *archive,
                           "--engine", "ray", "--workers", "2", "--batch-size", "4", "--json", "--out", str(out_file)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]  # three inputs rejected, the rest scored
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    table = pd.read_parquet(out_file)
    assert list(table["path"]) == [r["path"] for r in printed] == archive
    scored = table[table["error"].isna()]
    assert len(scored) == 10 and scored["model"].eq("tiny-grouped").all()
    local = {r["path"]: r for r in _local_rows(tiny_weights / "tiny-grouped", archive)}
    np.testing.assert_allclose(scored["probability"], [local[p]["probability"] for p in scored["path"]], atol=1e-5)
    assert table.loc[table["path"].str.endswith("missing.png"), "error"].item() == local[archive[-1]]["error"]


def test_local_engine_writes_the_same_csv_columns(tiny_weights, archive, tmp_path, capsys):
    import pandas as pd

    from mammo_core import cli
    from mammo_core.inference.results_out import COLUMNS

    out_file = tmp_path / "scores.csv"
    code = cli.main(["--weights", str(tiny_weights), "predict", *archive, "--out", str(out_file), "--no-progress"])
    assert code == 2
    table = pd.read_csv(out_file)
    assert tuple(table.columns) == COLUMNS and list(table["path"]) == archive
    assert table["error"].notna().sum() == 3 and table["probability"].notna().sum() == 10


def test_ray_engine_refuses_local_only_options(tiny_weights, archive, capsys):
    from mammo_core import cli

    code = cli.main(["--weights", str(tiny_weights), "predict", *archive, "--engine", "ray", "--gradcam", "x"])
    assert code == 1 and "--engine local" in capsys.readouterr().err
