"""The Streamlit app driven headlessly with streamlit.testing (AppTest): every page renders without
an exception, Review scores uploads, Metrics follows the threshold, Retrain trains and activates."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from mammo_core import jobs, registry
from mammo_core.config import REPO_ROOT

APP = str(REPO_ROOT / "app.py")
TIMEOUT = 90  # the first Review run imports TensorFlow and loads the model; the machine may be busy


def _loopback(get_option):
    def get(key):
        return "127.0.0.1" if key == "server.address" else get_option(key)
    return get


@pytest.fixture
def app_env(monkeypatch, tmp_path, tiny_dataset):
    """Point the app at tmp folders: weights (set per test), dataset and audit database; local mode
    (loopback address, no login configured)."""
    from streamlit import config as st_config

    for name in ("MAMMO_AUTH_FILE", "MAMMO_NETWORK", "MAMMO_DATA_ROOTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(st_config, "get_option", _loopback(st_config.get_option))
    monkeypatch.setenv("MAMMO_DATA_DIR", str(tiny_dataset))
    monkeypatch.setenv("MAMMO_AUDIT_DB", str(tmp_path / "audit" / "audit.sqlite3"))

    def use(weights):
        monkeypatch.setenv("MAMMO_WEIGHTS_DIR", str(weights))
        return weights

    return use


def start(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    if page:
        at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def metric(at: AppTest, label_start: str) -> str:
    found = [m.value for m in at.metric if m.label.startswith(label_start)]
    assert found, f"no metric labelled {label_start!r}: {[m.label for m in at.metric]}"
    return found[0]


def test_home_shows_intended_use_and_model_in_use(app_env, tiny_weights):
    app_env(tiny_weights)
    at = start()
    assert any("not a diagnostic device" in e.value for e in at.error)
    assert at.subheader[0].value == "Model in use: tiny-grouped"
    assert metric(at, "Split protocol") == "grouped"
    assert any("Grouped split by source" in c.value for c in at.caption)
    auc = json.loads((tiny_weights / "tiny-grouped" / "card.json").read_text())["metrics"]["test"]["auc"]
    assert metric(at, "Test AUC") == f"{auc:.3f}"
    assert any("Grouped split" in i.value for i in at.info)  # the card's honest-evaluation note
    assert at.sidebar.selectbox[0].value == "tiny-grouped"


def test_review_scores_uploads_and_threshold_does_not_rescore(app_env, tiny_weights, sample_png, monkeypatch):
    from mammo_core.predict import Predictor

    app_env(tiny_weights)
    calls = []
    original = Predictor.score_many

    def counting(self, items, **kwargs):
        items = list(items)
        calls.append(len(items))
        return original(self, items, **kwargs)

    monkeypatch.setattr(Predictor, "score_many", counting)
    at = start("review")
    at.file_uploader[0].set_value([("scan.png", sample_png, "image/png"),
                                   ("broken.dcm", b"not an image at all", "application/dicom")]).run()
    no_exception(at)
    prob = float(metric(at, "Probability of malignancy"))
    assert 0.0 <= prob <= 1.0
    assert metric(at, "Decision at threshold 0.50") == ("malignant" if prob >= 0.5 else "benign")
    charts = at.get("plotly_chart")
    assert len(charts) == 1  # original, model input, Grad-CAM on the original
    import json as _json

    traces = _json.loads(charts[0].proto.spec)["data"]
    assert [t["type"] for t in traces][:3] == ["image", "image", "image"]
    assert any("broken.dcm" in e.value and "could not be scored" in e.value for e in at.error)
    worklist = at.dataframe[0].value
    assert list(worklist.columns) == ["file", "probability", "decision", "check", "threshold", "model"]
    assert worklist["file"].tolist() == ["scan.png"] and worklist["model"].tolist() == ["tiny-grouped"]
    assert calls == [2]

    slider = at.slider(key="threshold_widget::review::tiny-grouped")
    slider.set_value(0.0).run()
    assert metric(at, "Decision at threshold 0.00") == "malignant"
    at.slider(key="review_alpha").set_value(0.9).run()
    at.slider(key="threshold_widget::review::tiny-grouped").set_value(1.0).run()
    no_exception(at)
    assert metric(at, "Decision at threshold 1.00") == "benign"
    assert calls == [2], "moving the threshold or the opacity re-ran the model"

    from mammo_core.audit import AuditLog, default_audit_path

    rows = AuditLog(default_audit_path()).recent()
    assert {(r["file_name"], r["threshold"], r["decision"]) for r in rows} == {
        ("scan.png", 0.5, "malignant" if prob >= 0.5 else "benign"), ("scan.png", 0.0, "malignant"),
        ("scan.png", 1.0, "benign")}
    at.text_input[0].input("second reader agrees").run()
    assert AuditLog(default_audit_path()).recent(limit=1)[0]["reviewer_note"] == "second reader agrees"


def test_reruns_keep_keras_and_the_tensorflow_kernel_cache(app_env, tiny_weights, sample_png, monkeypatch):
    """Streamlit calls keras.backend.clear_session() after each script run, which empties TensorFlow's
    kernel cache and makes the first model call of every rerun re-optimise the Grad-CAM graph; the
    app turns that clean-up off (it builds each model once, in st.cache_resource)."""
    import keras
    from streamlit.runtime.scriptrunner import script_runner

    app_env(tiny_weights)
    streamlit_cleanup = getattr(script_runner._clean_problem_modules, "__wrapped__", script_runner._clean_problem_modules)
    monkeypatch.setattr(script_runner, "_clean_problem_modules", streamlit_cleanup)  # as if never patched
    cleared = []
    monkeypatch.setattr(keras.backend, "clear_session", lambda *a, **k: cleared.append(1))
    streamlit_cleanup()
    assert cleared == [1], "Streamlit's own clean-up no longer clears the Keras session; the patch may be obsolete"
    cleared.clear()

    at = start("review")
    at.file_uploader[0].set_value([("scan.png", sample_png, "image/png")]).run()
    at.slider[0].set_value(0.3).run()
    no_exception(at)
    assert metric(at, "Probability of malignancy")
    assert cleared == []
    assert script_runner._clean_problem_modules.keeps_keras


def test_review_batch_worklist_is_sorted_by_probability(app_env, tiny_weights):
    from tests.factories import png_bytes, synthetic_mammogram

    app_env(tiny_weights)
    at = start("review")
    files = [(f"img{i}.png", png_bytes(synthetic_mammogram(100 + i, malignant=bool(i % 2))), "image/png")
             for i in range(4)]
    at.file_uploader[0].set_value(files).run()
    no_exception(at)
    worklist = at.dataframe[0].value
    assert sorted(worklist["file"]) == [f[0] for f in files]
    assert worklist["probability"].is_monotonic_decreasing
    top = worklist["file"].iloc[0]
    assert at.selectbox(key="review_pick").value is not None
    assert at.subheader[-1].value == top  # the most suspicious image is shown first


def test_metrics_threshold_changes_confusion_matrix_and_compares_models(app_env, tiny_weights):
    app_env(tiny_weights)
    at = start("metrics")
    assert at.multiselect(key="metrics_models").value == ["tiny-grouped", "tiny-paper"]
    assert any("not comparable: leaky copies flatter the paper split" in m.value for m in at.markdown)
    assert any("paper's reported Table 1" in c.value for c in at.caption)
    assert len(at.get("plotly_chart")) >= 5  # ROC, 2 confusion matrices, 2 histograms, reliability

    def counts() -> list[str]:
        return [c.value for c in at.caption if c.value.startswith("At threshold")]

    before = counts()
    assert len(before) == 2
    at.slider(key="threshold_widget::metrics::tiny-grouped").set_value(0.0).run()
    no_exception(at)
    at_zero = counts()
    assert all(re.search(r"TN 0 · FP \d+ · FN 0 · TP \d+", c) for c in at_zero), at_zero
    at.slider(key="threshold_widget::metrics::tiny-grouped").set_value(1.0).run()
    at_one = counts()
    assert all(re.search(r"FP 0 · FN \d+ · TP 0", c) for c in at_one), at_one
    assert at_zero != at_one
    # Table 1 follows the threshold too: at 1.0 nothing is called malignant, so its recall is 0.
    assert at.dataframe[1].value.loc["malignant", "recall"] == 0.0
    # The dataset is available (MAMMO_DATA_DIR), so the Figure-4-like grid of test images shows.
    assert len(at.image) == 12


def test_metrics_shows_card_extras_and_operating_points(app_env, tiny_weights_copy):
    app_env(tiny_weights_copy)
    card_path = tiny_weights_copy / "tiny-grouped" / "card.json"
    card = json.loads(card_path.read_text())
    card["operating_points"] = [{"name": "high sensitivity", "threshold": 0.2, "sensitivity": 0.95,
                                 "specificity": 0.4, "computed_on": "validation split"}]
    card["calibration"] = {"method": "temperature", "temperature": 1.7, "brier_test_before": 0.24,
                           "brier_test_after": 0.2, "computed_on": "validation split"}
    card["cross_validation"] = {"protocol": "grouped", "k": 5, "group_by": "source",
                                "folds": [{"fold": i, "auc": 0.6, "accuracy": 0.6, "sensitivity": 0.5,
                                           "specificity": 0.7, "n_images": 10, "n_groups": 2} for i in range(5)],
                                "pooled": {"auc": 0.6, "auc_ci": [0.5, 0.7], "accuracy": 0.6, "accuracy_ci": [0.5, 0.7],
                                           "sensitivity": 0.5, "sensitivity_ci": [0.3, 0.7], "specificity": 0.7,
                                           "specificity_ci": [0.5, 0.9]}}
    registry.write_card(card_path.parent, card)
    preds_path = card_path.parent / registry.PREDICTIONS_FILE
    preds = pd.read_csv(preds_path)
    preds["probability_uncalibrated"] = preds["probability"]
    preds.to_csv(preds_path, index=False)
    at = start("metrics")
    assert any("before calibration" in chart.proto.spec for chart in at.get("plotly_chart"))
    assert any("Cross-validation" in m.value and "k = 5" in m.value for m in at.markdown)
    assert any("Calibration in the card" in m.value and "temperature" in m.value for m in at.markdown)
    op = at.selectbox(key="op::metrics::tiny-grouped")
    op.set_value(0).run()
    no_exception(at)
    assert at.slider(key="threshold_widget::metrics::tiny-grouped").value == pytest.approx(0.2)
    assert any(c.value.startswith("At threshold 0.20") for c in at.caption)


def test_broken_model_is_reported_and_never_swapped(app_env, tiny_weights_copy, sample_png):
    """The active model fails its integrity check: the app says so and asks the user to pick; it does not
    use another model (here the leaky paper-split one) by itself."""
    app_env(tiny_weights_copy)
    with open(tiny_weights_copy / "tiny-grouped" / registry.MODEL_FILE, "ab") as fh:
        fh.write(b"tampered")
    at = start()
    assert any("tiny-grouped cannot be used" in w.value and "does not match" in w.value
               and "Pick another model" in w.value for w in at.warning), [w.value for w in at.warning]
    assert at.subheader[0].value == "Model in use"
    assert not any("tiny-paper" in s.value for s in at.subheader)
    at.switch_page("app_pages/review.py").run()
    no_exception(at)
    assert any("tiny-grouped" in e.value and "choose a model in the sidebar" in e.value for e in at.error)
    assert not at.file_uploader  # nothing is scored with a model the user did not choose
    assert registry.active_model_name(tiny_weights_copy) == "tiny-grouped"  # nothing promoted
    at.sidebar.selectbox[0].set_value("tiny-paper").run()  # the user picks
    no_exception(at)
    at.file_uploader[0].set_value(("scan.png", sample_png, "image/png")).run()
    assert at.dataframe[0].value["model"].tolist() == ["tiny-paper"]


def test_review_explains_when_no_model_loads(app_env, tiny_weights_copy):
    app_env(tiny_weights_copy)
    for name in ("tiny-grouped", "tiny-paper"):
        (tiny_weights_copy / name / registry.MODEL_FILE).write_bytes(b"not a keras archive")
    at = start("review")
    assert any("tiny-grouped cannot be used" in e.value and "choose a model" in e.value for e in at.error)
    assert not at.file_uploader


def test_unverified_model_is_not_offered_until_an_admin_confirms_it(app_env, tiny_weights_copy):
    import shutil

    root = app_env(tiny_weights_copy)
    shutil.copytree(root / "tiny-paper", root / "dropped")
    card = registry.read_card(root / "dropped")
    card["name"], card["created"] = "dropped", "2999-01-01T00:00:00+00:00"
    registry.write_card(root / "dropped", card)
    at = start()
    assert "dropped" not in at.sidebar.selectbox[0].options
    at.switch_page("app_pages/retrain.py").run()
    no_exception(at)
    assert any("not shipped with the app nor trained here" in w.value for w in at.warning)
    at.checkbox(key="retrain_confirm::dropped").check().run()
    [button] = [b for b in at.button if b.label == "Confirm dropped and make it active"]
    button.click().run()
    no_exception(at)
    assert registry.active_model_name(root) == "dropped"
    assert registry.local_models(root)["dropped"]["source"] == registry.TRUST_CONFIRMED


def test_pages_without_any_model_explain_instead_of_failing(app_env, tmp_path):
    app_env(tmp_path / "empty-weights")
    at = start()
    assert any("No usable model" in i.value for i in at.info)
    at.switch_page("app_pages/review.py").run()
    no_exception(at)
    assert any("No trained model yet" in i.value for i in at.info)
    at.switch_page("app_pages/metrics.py").run()
    no_exception(at)
    assert any("No trained model yet" in i.value for i in at.info)


def test_retrain_form_trains_in_background_and_make_active(app_env, tiny_weights_copy, tiny_dataset):
    root = app_env(tiny_weights_copy)
    at = start("retrain")
    assert at.text_input(key="retrain_data").value == str(tiny_dataset)
    at.number_input(key="retrain_epochs").set_value(1)
    at.number_input(key="retrain_batch").set_value(8)
    assert at.selectbox(key="retrain_precision").value == "auto"
    at.selectbox(key="retrain_precision").set_value("float32")
    at.text_input(key="retrain_name").set_value("ui-model")
    at.button[0].click().run()  # the form's Start button
    no_exception(at)
    assert any("ui-model" in s.value and "started" in s.value for s in at.success), [e.value for e in at.error]

    # A second start while the first runs is refused with an explanation.
    at.text_input(key="retrain_name").set_value("ui-model-2")
    at.button[0].click().run()
    assert any("already in progress" in e.value for e in at.error)

    run = jobs.current_run(root)
    assert run.model == "ui-model"
    done = jobs.wait(run, timeout=300)
    assert done.state == "finished", jobs.log_tail(done)
    at.run()
    no_exception(at)
    assert metric(at, "Test AUC")  # the new model's card and test metrics are shown
    assert registry.read_card(root / "ui-model")["training"]["computation"]["precision"] == "float32"
    make_active = [b for b in at.button if b.label == "Make ui-model the active model"]
    assert make_active, [b.label for b in at.button]
    make_active[0].click().run()
    no_exception(at)
    assert registry.active_model_name(root) == "ui-model"
    assert at.session_state["model_choice"] == "ui-model"  # the sidebar's model selectbox
    assert start().subheader[0].value == "Model in use: ui-model"  # a new session starts on the new default
    assert (root / "tiny-grouped").is_dir(), "the previous model must stay on disk"


# --- figure builders used by the pages (mammo_core.plots) ---------------------------------------

def test_reliability_table_and_brier_score():
    from mammo_core import plots

    table = plots.reliability_table([0, 0, 1, 1], [0.05, 0.15, 0.85, 0.95], n_bins=10)
    assert table["count"].tolist() == [1, 1, 1, 1]
    assert table["fraction_malignant"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert table["mean_predicted"].tolist() == pytest.approx([0.05, 0.15, 0.85, 0.95])
    assert plots.reliability_table([1], [1.0])["bin"].tolist() == ["0.9-1.0"]  # p = 1 lands in the last bin
    from mammo_core.calibration import brier

    assert brier([0, 1], [0.0, 1.0]) == 0.0
    assert brier([0, 1], [0.5, 0.5]) == pytest.approx(0.25)


def test_fit_for_display_downscales_keeping_aspect_and_never_upscales():
    import numpy as np

    from mammo_core import plots

    big = np.zeros((4000, 3000), dtype=np.uint8)
    small = plots.fit_for_display(big, 1000)
    assert small.shape == (1000, 750) and small.dtype == np.uint8
    tiny = np.zeros((100, 80), dtype=np.uint8)
    assert plots.fit_for_display(tiny, 1000) is tiny


def test_image_pair_figure_links_zoom_of_both_views():
    import numpy as np

    from mammo_core import plots

    gray = np.zeros((50, 40), dtype=np.uint8)
    rgb = np.zeros((50, 40, 3), dtype=np.uint8)
    fig = plots.image_pair_figure(gray, rgb)
    assert [t.type for t in fig.data] == ["image", "image"]
    assert all(t.source.startswith("data:image/png;base64,") for t in fig.data)
    assert fig.layout.xaxis2.matches == "x" and fig.layout.yaxis2.matches == "y"
