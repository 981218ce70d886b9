"""The bench's physical reference and report (issue 18): FLOPs per image, the fraction of peak, the
single member cut from an ensemble, and the report naming the default model. No timings asserted."""

from __future__ import annotations

import numpy as np
import pytest

from bench import scoring
from bench.__main__ import report


def test_flops_per_image_counts_multiply_adds_of_convolutions_and_dense():
    import keras

    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inp)  # 64 positions x 3*3*3*4
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(x)  # 16 positions x 3*3*4
    inner = keras.Model(inp, x)
    outer_in = keras.Input((8, 8, 3))
    y = keras.layers.GlobalAveragePooling2D()(inner(outer_in))
    y = keras.layers.Dense(2)(y)  # 4*2
    flops = scoring.flops_per_image(keras.Model(outer_in, y))
    assert flops["by_type"] == {"Conv2D": 2 * 64 * 108, "DepthwiseConv2D": 2 * 16 * 36, "Dense": 2 * 8}
    assert flops["total"] == 2 * (64 * 108 + 16 * 36 + 8)


def test_efficientnet_lite0_flops_are_the_published_figure():
    """EfficientNet-Lite0 is about 0.4 G multiply-adds (0.8 GFLOP) at 224x224 with 3-channel input."""
    from mammo_core.models.efficientnet_lite import build_efficientnet_lite0

    flops = scoring.flops_per_image(build_efficientnet_lite0(input_shape=(224, 224, 3), weights=None))["total"]
    assert 0.7e9 < flops < 0.85e9


def test_peak_gflops_is_positive():
    assert scoring.peak_gflops("float32", n=256, seconds=0.05) > 0


def test_single_member_scores_like_its_ensemble_member():
    from mammo_core.inference.predict import Predictor
    from mammo_core.training import finetune

    _, core = finetune.build_parts("block6a")
    members = [finetune.build_member(core, finetune.Recipe(), i) for i in range(2)]
    whiten = (np.eye(112, dtype=np.float32), np.zeros(112, np.float32))
    card = {"name": "ens", "ensemble": {"members": 2, "temperatures": [1.0, 2.0]}, "input_pipeline": "breast-crop-v1"}
    predictor = Predictor(finetune.build_ensemble(members, "block6a", whiten), card)
    one = scoring.single_member(predictor, 1)
    assert one.ensemble is not None and one.ensemble.temperatures.tolist() == [2.0]
    images = np.random.default_rng(0).integers(0, 255, (2, 224, 224), dtype=np.uint8)
    both, _, _ = predictor.ensemble(images, with_cam=False)
    alone, _, _ = one.ensemble(images, with_cam=False)
    np.testing.assert_allclose(alone[:, 0], both[:, 1], atol=1e-5)
    full, trunk = scoring.flops_per_image(predictor.model)["total"], scoring.flops_per_image(one.model)["total"]
    assert trunk < full < 2 * trunk  # the trunk is shared: two members cost less than two models


def _facts(name, flops, cam):
    return {"model": name, "flops": flops, "flops_cam": cam, "precision": "float32"}


def test_report_names_the_default_model_and_shows_fraction_of_peak():
    results = {
        "peak": {"float32": 400.0, "bfloat16": 800.0},
        "latency:default": {"ours_p50": 20.0, "ours_p95": 25.0, "base_p50": 400.0, "base_p95": 500.0, "n": 10,
                            "n_base": 5, "note": "n", "first_s": 1.0, **_facts("ens", 2e9, 4e9)},
        "latency:paper": {"ours_p50": 5.0, "ours_p95": 6.0, "base_p50": 50.0, "base_p95": 60.0, "n": 10,
                          "n_base": 5, "note": "n", "first_s": 0.2, **_facts("paper-cnn-grouped-split", 0.35e9, 0.35e9)},
        "folder:default": {"ours": 100.0, "ours_cam": 50.0, "base": 10.0, "n": 64, "n_base": 8, **_facts("ens", 2e9, 4e9)},
        "cli:default": {"seconds": 20.0, "n": 1908, "errors": 0, "rss_gb": 1.2, "images_per_s": 95.4, "model": "ens",
                        "command": "python -m mammo_core predict $MAMMO_DATA_DIR/test --model ens --json"},
    }
    text = report(results, "python -m bench", "2 cores", "ens")
    assert "Default (active) model: `ens`" in text
    # 100 images/s x 2 GFLOP = 200 GFLOP/s = 50 % of a 400 GFLOP/s peak; latency 50/s x 4 GFLOP = 50 %
    assert "| 2 | folder scoring, probability only (images/s) | default | 100 | 10.0 | 10.0x | 50.0% |" in text
    assert "| 1 | single image, probability + Grad-CAM, p50 (ms) | default | 20.0 | 400.0 | 20.0x faster | 50.0% |" in text
    assert "1,908 test images" in text and "≥ 300 images/s" in text
    assert "paper-cnn = `paper-cnn-grouped-split`" in text


@pytest.mark.parametrize("precision,expected", [("float32", "50.0%"), ("bfloat16", "25.0%")])
def test_fraction_of_peak_uses_the_arithmetic_the_model_ran_in(precision, expected):
    from bench.__main__ import _pct, _peak_for

    results = {"peak": {"float32": 400.0, "bfloat16": 800.0}}
    assert _pct(100.0, 2e9, _peak_for(results, {"precision": precision})) == expected


def test_profile_pieces_cover_the_scoring_call(tmp_path):
    from mammo_core.inference.predict import Predictor
    from mammo_core.training import finetune
    from tests.factories import png_bytes, synthetic_mammogram

    _, core = finetune.build_parts("block6a")
    members = [finetune.build_member(core, finetune.Recipe(), i) for i in range(2)]
    whiten = (np.eye(112, dtype=np.float32), np.zeros(112, np.float32))
    predictor = Predictor(finetune.build_ensemble(members, "block6a", whiten),
                          {"name": "ens", "ensemble": {"members": 2, "temperatures": [1.0, 1.0]}})
    files = []
    for s in range(2):
        files.append(tmp_path / f"{s}.png")
        files[-1].write_bytes(png_bytes(synthetic_mammogram(s, malignant=True)))
    images = np.stack([synthetic_mammogram(s, malignant=True) for s in range(2)])
    out = scoring.profile_pieces(predictor, images, files, runs=1)
    pieces = out["pieces"]
    trunk = scoring.flops_per_image(predictor.model.get_layer(finetune.TRUNK_NAME))["total"]
    assert pieces["trunk forward"]["flops"] == trunk
    assert pieces["members forward"]["flops"] + trunk == scoring.flops_per_image(predictor.model)["total"]
    assert all(row["b1_ms_per_image"] > 0 and row["b32_ms_per_image"] > 0 for row in pieces.values())
    assert out["prepare_ms"] > 0


def test_cli_profile_rows_give_seconds_share_and_fraction_of_peak():
    from bench.__main__ import cli_profile_lines

    row = {"wall_s": 2.0, "user_s": 3.0, "sys_s": 0.5, "images_per_s": 100.0, "page_faults_per_image": 12.0}
    results = {"peak": {"float32": 400.0}, "folder:default": {"flops": 2e9},
               "cliprofile": {"n": 200, "startup": {"Python start and exit": 1.0, "import TensorFlow and Keras": 3.0},
                              "startup_s": 3.0, "steady": {"model call alone, batches of 32 (both cores)": row},
                              "pipelines": {"new": {**row, "all_images_per_s": [100.0]},
                                            "old": {**row, "wall_s": 4.0, "images_per_s": 50.0, "all_images_per_s": [50.0]}}}}
    text = "\n".join(cli_profile_lines(results))
    # end to end = 1 + 3 + 2 s (the best pipeline); the model alone at 100 images/s x 2 GFLOP = 50 % of 400
    assert "= 6.0 s" in text and "| start-up: import TensorFlow and Keras | 3.00 | 50% | |" in text
    assert "| alone: model call alone, batches of 32 (both cores) | 2.00 (user 3.0, sys 0.5) | 33% | 50% |" in text
    assert "old, 50 images/s" in text and cli_profile_lines({}) == []


def test_app_trace_pieces_split_one_upload(tmp_path):
    import json

    from bench.app import _pieces

    trace = tmp_path / "trace.jsonl"
    rows = [{"piece": "script run (whole page)", "t": 100.2, "s": 0.2},
            {"piece": "model call + Grad-CAM", "t": 100.25, "s": 0.05},
            {"piece": "st.plotly_chart (serialise, send)", "t": 100.3, "s": 0.01, "json_bytes": 1234},
            {"piece": "model call + Grad-CAM", "t": 200.0, "s": 9.0}]  # another upload's
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    marks = [{"start": 100.0, "uploaded": 100.1, "metric": 100.35, "plot": 100.5, "end": 100.6}]
    got = _pieces(trace, marks)
    assert got["model call + Grad-CAM"] == pytest.approx(0.05)
    assert got["Plotly figure JSON (bytes)"] == 1234 and got["script runs in this span"] == 1
    assert got["browser: file sent (HTTP upload finished)"] == pytest.approx(0.1)
    assert got["browser and websocket: total - upload - script runs"] == pytest.approx(0.6 - 0.1 - 0.2)
    assert got["browser: panels drawn to app idle (status widget gone)"] == pytest.approx(0.1)
    assert got["median upload"]["model call + Grad-CAM"] == pytest.approx(0.05)
