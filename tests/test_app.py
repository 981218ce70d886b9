"""The Streamlit app driven headlessly with streamlit.testing (AppTest): every page renders without
an exception, Review scores uploads, Metrics follows the threshold, Models activates (with a
confirmation for a worse or leaky model) and deletes, Retrain trains and activates."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from mammo_core.config import REPO_ROOT
from mammo_core.store import jobs, registry
from mammo_core.store.card import read_card, write_card

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

    for name in ("MAMMO_AUTH_FILE", "MAMMO_NETWORK", "MAMMO_DATA_ROOTS", "MAMMO_AUDIT_KEEP_FILE_NAMES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(st_config, "get_option", _loopback(st_config.get_option))
    monkeypatch.setenv("MAMMO_DATA_DIR", str(tiny_dataset))
    monkeypatch.setenv("MAMMO_AUDIT_DB", str(tmp_path / "audit" / "audit.sqlite3"))

    def use(weights):
        monkeypatch.setenv("MAMMO_WEIGHTS_DIR", str(weights))
        return weights

    return use


PAGES = {"review": "pages/1_Review.py", "metrics": "pages/2_Metrics.py", "models": "pages/3_Models.py",
         "retrain": "pages/4_Retrain.py"}


def start(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    if page:
        at.switch_page(PAGES[page]).run()
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
    assert any("Grouped split by source" in c.value for c in at.caption)
    auc = json.loads((tiny_weights / "tiny-grouped" / "card.json").read_text())["metrics"]["test"]["auc"]
    assert metric(at, "Single split: test AUC") == f"{auc:.3f}"
    assert metric(at, "Cross-validated AUC, by source image") == "—"  # the tiny card has no cross-validation
    assert [link.label.split(":")[0] for link in at.sidebar.get("page_link")] == [
        "Home", "Review", "Metrics", "Models", "Retrain"]  # local mode: admin
    assert any("Grouped split" in i.value for i in at.info)  # the card's honest-evaluation note
    assert at.sidebar.selectbox[0].value == "tiny-grouped"


def _home_links(at: AppTest) -> list[str]:
    return [link.label.split(":")[0] for link in at.main.get("page_link")]


def test_home_lists_the_pages_of_the_navigation(app_env, tiny_weights, monkeypatch):
    from appkit import shared
    from mammo_core import auth

    app_env(tiny_weights)
    at = start()
    assert _home_links(at) == ["Review", "Metrics", "Models", "Retrain"]  # local mode: admin
    review = at.main.get("page_link")[0]
    assert review.label == "Review: score uploaded mammograms, with Grad-CAM" and review.icon == ":material/search:"

    # A page declared once, in shared.PAGES, shows on Home too.
    monkeypatch.setattr(shared, "PAGES", [*shared.PAGES, ("pages/2_Metrics.py", "Extra", ":material/star:", False)])
    at = start()
    assert _home_links(at) == ["Review", "Metrics", "Models", "Retrain", "Extra"]
    assert at.main.get("page_link")[-1].icon == ":material/star:"

    # Readers do not see admin pages on Home either.
    monkeypatch.setattr(auth, "local_user", lambda: auth.User("rita", "reader", "local"))
    assert _home_links(start()) == ["Review", "Metrics", "Models", "Extra"]


def test_review_scores_uploads_and_threshold_does_not_rescore(app_env, tiny_weights, sample_png, monkeypatch):
    from mammo_core.inference.predict import Predictor

    app_env(tiny_weights)
    calls = []
    original = Predictor.score_many

    def counting(self, items, **kwargs):
        items = list(items)
        calls.append(len(items))
        return original(self, items, **kwargs)

    monkeypatch.setattr(Predictor, "score_many", counting)
    from streamlit.runtime.memory_uploaded_file_manager import MemoryUploadedFileManager

    held: dict[str, int] = {}  # the file manager's files: id -> bytes
    add, remove = MemoryUploadedFileManager.add_file, MemoryUploadedFileManager.remove_file
    monkeypatch.setattr(MemoryUploadedFileManager, "add_file",
                        lambda self, sid, rec: (held.__setitem__(rec.file_id, len(rec.data)), add(self, sid, rec))[1])
    monkeypatch.setattr(MemoryUploadedFileManager, "remove_file",
                        lambda self, session_id, file_id: (held.pop(file_id, None),
                                                          remove(self, session_id, file_id))[1])
    at = start("review")
    at.file_uploader[0].set_value([("scan.png", sample_png, "image/png"),
                                   ("broken.dcm", b"not an image at all", "application/dicom")]).run()
    no_exception(at)
    assert not held, "the uploaded files' bytes are still held after scoring"
    prob = float(metric(at, "Probability of malignancy"))
    assert 0.0 <= prob <= 1.0
    assert metric(at, "Decision at threshold 0.50") == ("malignant" if prob >= 0.5 else "benign")
    # by default the panels are plain images: original (outlined), model input, Grad-CAM, its colour scale
    assert not at.get("plotly_chart")
    captions = [c for img in at.get("image") for c in img.captions]
    assert captions[:3] == ["Original, breast outlined", "What the model saw", "Grad-CAM on the original"]
    assert captions[3].startswith("Grad-CAM scale")
    at.toggle(key="review_zoom").set_value(True).run()  # the interactive figure, zoom linked
    charts = at.get("plotly_chart")
    assert len(charts) == 1 and not at.get("image")
    import json as _json

    traces = _json.loads(charts[0].proto.spec)["data"]
    assert [t["type"] for t in traces][:3] == ["image", "image", "image"]
    at.toggle(key="review_zoom").set_value(False).run()
    assert any("2 · broken.dcm could not be scored" in e.value for e in at.error)
    worklist = at.dataframe[0].value
    assert list(worklist.columns) == ["image", "probability", "decision", "check", "threshold", "model"]
    assert worklist["image"].tolist() == ["1 · scan.png"] and worklist["model"].tolist() == ["tiny-grouped"]
    assert calls == [2]

    slider = at.slider(key="threshold_widget::review::tiny-grouped")
    slider.set_value(0.0).run()
    assert metric(at, "Decision at threshold 0.00") == "malignant"
    at.slider(key="review_alpha").set_value(0.9).run()
    at.slider(key="threshold_widget::review::tiny-grouped").set_value(1.0).run()
    no_exception(at)
    assert metric(at, "Decision at threshold 1.00") == "benign"
    assert calls == [2], "moving the threshold or the opacity re-ran the model"

    from mammo_core.store.audit import AuditLog, default_audit_path

    rows = AuditLog(default_audit_path()).recent()
    # One row per scored image and model, at the threshold it was first shown with; views at other thresholds are not scores.
    assert [(r["file_name"], r["threshold"], r["decision"]) for r in rows] == [
        ("scan.png", 0.5, "malignant" if prob >= 0.5 else "benign")]
    # the uploader was emptied and the file's bytes dropped after scoring: another model needs the file again
    assert not at.file_uploader[0].value
    at.file_uploader[0].set_value([("same-again.png", sample_png, "image/png")]).run()  # the same image again
    assert any("already in the worklist" in i.value for i in at.info)
    assert calls == [2]  # nothing was scored again
    assert [r["file_name"] for r in AuditLog(default_audit_path()).recent()] == ["scan.png"]  # not logged twice
    at.sidebar.selectbox[0].set_value("tiny-paper").run()
    no_exception(at)
    assert any("scored with another model" in c.value and "upload them again" in c.value for c in at.caption)
    at.file_uploader[0].set_value([("scan.png", sample_png, "image/png")]).run()
    assert [r["model_name"] for r in AuditLog(default_audit_path()).recent()] == ["tiny-paper", "tiny-grouped"]
    at.sidebar.selectbox[0].set_value("tiny-grouped").run()
    at.text_input[0].input("second reader agrees").run()
    [row] = [r for r in AuditLog(default_audit_path()).recent() if r["model_name"] == "tiny-grouped"]
    assert row["reviewer_note"] == "second reader agrees"


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
    # masked names (img#.png for all four): the session number tells them apart
    assert sorted(worklist["image"]) == [f"{i + 1} · img#.png" for i in range(4)]
    assert worklist["probability"].is_monotonic_decreasing
    top = worklist["image"].iloc[0]
    assert at.selectbox(key="review_pick").value is not None
    from appkit.shared import plain

    assert at.subheader[-1].value == plain(top)  # the most suspicious image is shown first (escaped Markdown)


def _rendered(at) -> str:
    """Every element the page sent to the browser, as text: its protobuf messages (tables included, as
    their Arrow bytes), walked from the root."""
    out, stack = [], [at._tree]
    while stack:
        node = stack.pop()
        if getattr(node, "proto", None) is not None:
            out.append(str(node.proto))
        stack.extend(getattr(node, "children", {}).values())
    return "\n".join(out)


def test_review_never_shows_an_identifying_file_name(app_env, tiny_weights, sample_png, monkeypatch):
    """A file name can carry the patient's name and ID: the page, the worklist (whose CSV is the same table),
    error messages and the audit log get it masked, numbered in the session; a site that keeps file names
    (MAMMO_AUDIT_KEEP_FILE_NAMES=1) sees them as given."""
    from mammo_core.store.audit import AuditLog, default_audit_path

    app_env(tiny_weights)
    at = start("review")
    at.file_uploader[0].set_value([("Smith^Anna_ID12345.png", sample_png, "image/png"),
                                   ("Doe^Jane_98765.dcm", b"not an image", "application/dicom")]).run()
    no_exception(at)
    page = _rendered(at)
    for secret in ("Smith", "Anna", "12345", "Doe", "Jane", "98765"):
        assert secret not in page, f"{secret!r} reached the page"
    assert at.dataframe[0].value["image"].tolist() == ["1 · ***^***_ID#.png"]
    from appkit.shared import plain

    assert any(f"{plain('2 · ***^***_#.dcm')} could not be scored" in e.value for e in at.error)
    assert [r["file_name"] for r in AuditLog(default_audit_path()).recent()] == ["***^***_ID#.png"]

    monkeypatch.setenv("MAMMO_AUDIT_KEEP_FILE_NAMES", "1")
    at = start("review")
    at.file_uploader[0].set_value([("Smith^Anna_ID12345.png", sample_png, "image/png")]).run()
    assert at.dataframe[0].value["image"].tolist() == ["1 · Smith^Anna_ID12345.png"]


def _chart_kinds(at) -> list[str]:
    """What each Plotly chart on the page is, read from its figure: roc, confusion, histogram <title>,
    reliability or history."""
    kinds = []
    for chart in at.get("plotly_chart"):
        fig = json.loads(chart.proto.spec)
        layout, traces = fig.get("layout", {}), fig.get("data", [])
        x_title = ((layout.get("xaxis") or {}).get("title") or {}).get("text", "")
        annotations = [a.get("text") for a in layout.get("annotations", [])]
        if x_title.startswith("False-positive rate"):
            kinds.append("roc")
        elif traces and all(tr.get("type") == "heatmap" for tr in traces):
            kinds.append("confusion")
        elif x_title == "Predicted probability of malignancy":
            kinds.append(f"histogram {(layout.get('title') or {}).get('text', '')}")
        elif x_title == "Mean predicted probability":
            kinds.append("reliability")
        elif annotations[:2] == ["Loss", "Accuracy"]:
            kinds.append("history")
        else:
            kinds.append(f"unknown {x_title!r}")
    return kinds


def test_metrics_threshold_changes_confusion_matrix_and_compares_models(app_env, tiny_weights):
    app_env(tiny_weights)
    at = start("metrics")
    assert at.multiselect(key="metrics_models").value == ["tiny-grouped", "tiny-paper"]
    assert any("not comparable with the others: leaky copies flatter the paper split" in m.value for m in at.markdown)
    honest = at.table[0].value
    assert list(honest.index) == ["tiny-grouped", "tiny-paper"]
    assert honest.columns[1].startswith("cross-validated AUC by source image")
    assert any("tiny-paper" in w.value and "memorised copies" in w.value for w in at.warning)
    roc = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    assert any(t["name"].startswith("tiny-paper — paper split, LEAKY") for t in roc)
    assert any("paper's reported Table 1" in c.value for c in at.caption)
    assert sorted(_chart_kinds(at)) == sorted([
        "roc", "confusion", "confusion", "histogram tiny-grouped", "histogram tiny-paper", "reliability",
        "history", "history"])  # one ROC and one reliability plot for both models; the rest per model

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
    [table1] = [t.value for t in at.table if "support" in t.value.columns][:1]
    assert table1.loc["malignant", "recall"] == "0.00"
    # The dataset is available (MAMMO_DATA_DIR), so the Figure-4-like grid of test images shows.
    assert len(at.image) == 12


def test_metrics_shows_card_extras_and_operating_points(app_env, tiny_weights_copy):
    app_env(tiny_weights_copy)
    card_path = tiny_weights_copy / "tiny-grouped" / "card.json"
    card = json.loads(card_path.read_text())
    card["operating_points"] = [{"name": "high sensitivity", "threshold": 0.2, "sensitivity": 0.95,
                                 "specificity": 0.4, "test_sensitivity": 0.9, "test_specificity": 0.3,
                                 "computed_on": "validation split"}]
    card["calibration"] = {"method": "temperature", "temperature": 1.7, "brier_test_before": 0.24,
                           "brier_test_after": 0.2, "computed_on": "validation split"}
    card["cross_validation"] = {"protocol": "grouped", "k": 5, "group_by": "source",
                                "folds": [{"fold": i, "auc": 0.6, "accuracy": 0.6, "sensitivity": 0.5,
                                           "specificity": 0.7, "n_images": 10, "n_groups": 2} for i in range(5)],
                                "pooled": {"auc": 0.6, "auc_ci": [0.5, 0.7], "accuracy": 0.6, "accuracy_ci": [0.5, 0.7],
                                           "sensitivity": 0.5, "sensitivity_ci": [0.3, 0.7], "specificity": 0.7,
                                           "specificity_ci": [0.5, 0.9]}}
    write_card(card_path.parent, card)
    preds_path = card_path.parent / registry.PREDICTIONS_FILE
    preds = pd.read_csv(preds_path)
    preds["probability_uncalibrated"] = preds["probability"]
    preds.to_csv(preds_path, index=False)
    at = start("metrics")
    assert any("before calibration" in chart.proto.spec for chart in at.get("plotly_chart"))
    assert any("Cross-validation" in m.value and "k = 5" in m.value for m in at.markdown)
    assert any("Calibration in the card" in m.value and "temperature" in m.value for m in at.markdown)
    assert at.table[0].value.loc["tiny-grouped", "cross-validated AUC by source image [95 % CI]"] == "0.600 [0.500, 0.700]"
    op = at.selectbox(key="op::metrics::tiny-grouped")
    op.set_value(0).run()
    no_exception(at)
    assert at.slider(key="threshold_widget::metrics::tiny-grouped").value == pytest.approx(0.2)
    assert any(c.value.startswith("At threshold 0.20") for c in at.caption)
    # both figures of the point: where it was chosen and on the test split
    assert any(c.value.startswith("high sensitivity (0.20): validation sens 0.95 / spec 0.40 · test sens 0.90 / spec 0.30")
               for c in at.caption), [c.value for c in at.caption]
    at.slider(key="threshold_widget::metrics::tiny-grouped").set_value(0.37).run()
    op = at.selectbox(key="op::metrics::tiny-grouped")
    assert op.value == -2 and op.options[-1].startswith("Custom (0.37")  # "Custom" once the slider moved
    folds = next(d.value for d in at.dataframe if "test groups" in d.value.columns)
    assert "n_groups" not in folds.columns and "AUC" in folds.columns


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
    at.switch_page(PAGES["review"]).run()
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
    card = read_card(root / "dropped")
    card["name"], card["created"] = "dropped", "2999-01-01T00:00:00+00:00"
    write_card(root / "dropped", card)
    at = start()
    assert "dropped" not in at.sidebar.selectbox[0].options
    at.switch_page(PAGES["models"]).run()
    no_exception(at)
    assert any("not shipped with the app nor trained here" in w.value for w in at.warning)
    assert at.table[0].value.loc["dropped", "status"] == "unverified"
    at.checkbox(key="models_confirm::dropped").check().run()
    [button] = [b for b in at.button if b.label == "Confirm dropped and make it active"]
    button.click().run()
    no_exception(at)
    assert registry.active_model_name(root) == "dropped"
    assert registry.local_models(root)["dropped"]["source"] == registry.TRUST_CONFIRMED


def test_pages_without_any_model_explain_instead_of_failing(app_env, tmp_path):
    app_env(tmp_path / "empty-weights")
    at = start()
    assert any("No usable model" in i.value for i in at.info)
    at.switch_page(PAGES["review"]).run()
    no_exception(at)
    assert any("No trained model yet" in i.value for i in at.info)
    at.switch_page(PAGES["metrics"]).run()
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
    start_button = lambda: next(b for b in at.button if b.label == "Start training")  # noqa: E731
    assert at.selectbox(key="retrain_arch").value == "efficientnet-lite0-ft"  # the recommended recipe by default
    at.selectbox(key="retrain_arch").set_value("paper-cnn")
    start_button().click().run()
    no_exception(at)
    assert any("ui-model" in s.value and "started" in s.value for s in at.success), [e.value for e in at.error]

    # A second start while the first runs is refused with an explanation.
    at.text_input(key="retrain_name").set_value("ui-model-2")
    start_button().click().run()
    assert any("already in progress" in e.value for e in at.error)

    run = jobs.current_run(root)
    assert run.model == "ui-model"
    done = jobs.wait(run, timeout=300)
    assert done.state == "finished", jobs.log_tail(done)
    at.run()
    no_exception(at)
    assert metric(at, "Test AUC")  # the new model's card and test metrics are shown
    assert read_card(root / "ui-model")["training"]["computation"]["precision"] == "float32"
    make_active = [b for b in at.button if b.label == "Make ui-model the active model"]
    assert make_active, [b.label for b in at.button]
    if make_active[0].disabled:  # its grouped-split AUC is below the active model's: confirm first
        at.checkbox(key="retrain_confirm_worse::ui-model").check().run()
        make_active = [b for b in at.button if b.label == "Make ui-model the active model"]
    make_active[0].click().run()
    no_exception(at)
    assert registry.active_model_name(root) == "ui-model"
    assert at.session_state["model_choice"] == "ui-model"  # the sidebar's model selectbox
    assert start().subheader[0].value == "Model in use: ui-model"  # a new session starts on the new default
    assert (root / "tiny-grouped").is_dir(), "the previous model must stay on disk"
    # A reload (new session) remembers the last run's settings.
    fresh = start("retrain")
    assert fresh.selectbox(key="retrain_arch").value == "paper-cnn"
    assert fresh.number_input(key="retrain_epochs").value == 1 and fresh.number_input(key="retrain_batch").value == 8


# --- both kinds of card, and the Models page --------------------------------------------------------------


def _cv(auc: float, lo: float, hi: float, by: str = "source") -> dict:
    return {"protocol": f"5-fold CV grouped by {by}", "k": 5, "group_by": by,
            "folds": [{"fold": i, "auc": auc, "accuracy": 0.6, "n_images": 10, "n_groups": 2, "minutes": 1.0,
                       "l2": 0.001, "candidates": [{"l2": 0.001}]} for i in range(5)],
            "pooled": {"auc": auc, "auc_ci": [lo, hi], "accuracy": 0.6, "n_groups": 10}}


def add_model(root, name: str, *, like: str = "tiny-grouped", **card_fields) -> dict:
    """A copy of a tiny model under a new name, its card changed, recorded as trained here."""
    import shutil

    shutil.copytree(root / like, root / name)
    card = read_card(root / name)
    card.update(name=name, created=f"2030-01-0{len(list(root.iterdir())) % 9 + 1}T00:00:00+00:00", **card_fields)
    write_card(root / name, card)
    registry.record_model(root, name, card["model_sha256"])
    return card


def add_ensemble_like(root, name: str = "tiny-ensemble") -> dict:
    """A model directory with the card of a cross-validated ensemble (`mammo_core.training.ensemble.train_ensemble_into`):
    no single split, out-of-fold metrics and predictions (with a fold column), per-member temperatures, OOD."""
    preds = pd.read_csv(root / "tiny-grouped" / registry.PREDICTIONS_FILE)
    card = add_model(root, name, split={"protocol": "cross-validation", "group_by": "source", "seed": 0, "k": 5},
                     ensemble={"members": 5, "temperatures": [1.1] * 5, "interval": "range of the members"},
                     ood={"threshold": 50.0},
                     calibration={"method": "temperature per member", "temperatures": [1.1] * 5,
                                  "computed_on": "each member's validation part", "brier_oof_before": 0.25,
                                  "brier_oof_after": 0.22},
                     operating_points=[{"name": "Youden's J", "threshold": 0.45, "sensitivity": 0.7,
                                        "specificity": 0.6, "test_sensitivity": None, "test_specificity": None,
                                        "computed_on": "out-of-fold predictions"}],
                     evaluation={"note": "Out-of-fold: every image was scored by the member that never saw it."},
                     cross_validation=_cv(0.81, 0.7, 0.9), cross_validation_patient=_cv(0.72, 0.6, 0.84, "patient"))
    preds["fold"] = [i % 5 for i in range(len(preds))]
    preds.to_csv(root / name / registry.PREDICTIONS_FILE, index=False)
    return card


def test_every_page_handles_a_cross_validated_ensemble_card(app_env, tiny_weights_copy, sample_png):
    root = app_env(tiny_weights_copy)
    add_ensemble_like(root)
    registry.set_active_model("tiny-ensemble", root)
    at = start()
    assert metric(at, "Cross-validated AUC, by source image") == "0.810 [0.700, 0.900]"
    assert metric(at, "Cross-validated AUC, by patient") == "0.720 [0.600, 0.840]"
    assert metric(at, "Single split") == "none"
    assert any("5-fold cross-validation by source image" in c.value and "out-of-fold" in c.value for c in at.caption)
    at.switch_page(PAGES["review"]).run()
    no_exception(at)
    assert any("cross-validated AUC by source image 0.810 [0.700, 0.900]" in c.value for c in at.caption)
    at.selectbox(key="op::review::tiny-ensemble").set_value(0).run()
    assert any(c.value == "Youden's J (0.45): out-of-fold sens 0.70 / spec 0.60" for c in at.caption)
    at.file_uploader[0].set_value(("scan.png", sample_png, "image/png")).run()
    no_exception(at)
    assert metric(at, "Decision at threshold 0.45") in ("benign", "malignant")
    at.switch_page(PAGES["metrics"]).run()
    no_exception(at)
    roc = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    assert any(t["name"].startswith("tiny-ensemble — out-of-fold") for t in roc)
    assert at.table[0].value.loc["tiny-ensemble", "single split test AUC"] == "none (cross-validated)"
    assert any("out-of-fold Brier before 0.250" in m.value for m in at.markdown)
    at.switch_page(PAGES["models"]).run()
    no_exception(at)
    row = at.table[0].value.loc["tiny-ensemble (active)"]
    assert row["CV AUC by patient [95 % CI]"] == "0.720 [0.600, 0.840]" and row["status"] == "verified (trained here)"
    at.switch_page(PAGES["retrain"]).run()
    no_exception(at)


def test_models_page_confirms_a_worse_or_leaky_model_and_deletes_only_user_models(app_env, tiny_weights_copy,
                                                                                monkeypatch):
    root = app_env(tiny_weights_copy)
    card = read_card(root / "tiny-grouped")
    card["cross_validation"] = _cv(0.70, 0.6, 0.8)
    write_card(root / "tiny-grouped", card)  # the active model
    add_model(root, "worse", cross_validation=_cv(0.55, 0.45, 0.65))
    add_model(root, "better", cross_validation=_cv(0.80, 0.7, 0.9))
    at = start("models")
    no_exception(at)
    assert set(at.table[0].value.index) == {"tiny-grouped (active)", "tiny-paper", "worse", "better"}

    def activate_button():
        return next(b for b in at.button if b.label.startswith("Make ") and b.label.endswith("the active model"))

    # A worse model: its numbers beside the active model's, and the button waits for a confirmation.
    at.selectbox(key="models_pick").set_value("worse").run()
    assert any("lower than 0.700 for the active model tiny-grouped" in w.value for w in at.warning)
    assert activate_button().disabled
    at.checkbox(key="models_confirm_worse::worse").check().run()
    activate_button().click().run()
    no_exception(at)
    assert registry.active_model_name(root) == "worse"
    assert at.session_state["model_choice"] == "worse"
    # The leaky paper-split model always asks.
    at.selectbox(key="models_pick").set_value("tiny-paper").run()
    assert any("paper split" in w.value and "memorised copies" in w.value for w in at.warning)
    assert activate_button().disabled
    # A better one does not; and back to the first model.
    at.selectbox(key="models_pick").set_value("better").run()
    assert not activate_button().disabled
    at.selectbox(key="models_pick").set_value("tiny-grouped").run()
    activate_button().click().run()
    assert registry.active_model_name(root) == "tiny-grouped"

    # Delete: a model trained here goes; the active one and shipped ones (pinned in MANIFEST.json) cannot.
    at.selectbox(key="models_pick").set_value("worse").run()
    next(b for b in at.button if b.label == "Delete worse").click().run()
    no_exception(at)
    assert not (root / "worse").exists() and "worse" not in registry.local_models(root)
    assert any("worse was deleted" in s.value for s in at.success)
    monkeypatch.setattr(registry, "pinned_models", lambda: {"tiny-paper": {"model_sha256": "x"}})
    at.selectbox(key="models_pick").set_value("tiny-paper").run()
    assert not any(b.label == "Delete tiny-paper" for b in at.button)
    assert any("cannot be deleted" in c.value for c in at.caption)
    with pytest.raises(registry.ModelDirError, match="shipped"):
        registry.delete_model("tiny-paper", root)
    with pytest.raises(registry.ModelDirError, match="active model"):
        registry.delete_model("tiny-grouped", root)
    # Compare: the cards side by side.
    at.multiselect(key="models_compare").set_value(["tiny-grouped", "better"]).run()
    compared = at.table[-1].value
    assert list(compared.columns) == ["tiny-grouped", "better"]
    assert compared.loc["CV AUC by source image [95 % CI]", "better"] == "0.800 [0.700, 0.900]"


def test_reader_sees_models_but_cannot_change_them(app_env, tiny_weights, monkeypatch):
    from mammo_core import auth

    app_env(tiny_weights)
    monkeypatch.setattr(auth, "local_user", lambda: auth.User("rita", "reader", "local"))
    at = start("models")
    no_exception(at)
    assert at.table[0].value.shape[0] == 2
    assert not any(b.label.startswith("Make ") or b.label.startswith("Delete") for b in at.button)
    at.switch_page(PAGES["retrain"]).run()
    assert any("for administrators" in e.value for e in at.error) and not at.get("form")


# --- figure builders used by the pages (appkit.plots) ---------------------------------------


def test_reliability_table_and_brier_score():
    from appkit import plots

    table = plots.reliability_table([0, 0, 1, 1], [0.05, 0.15, 0.85, 0.95], n_bins=10)
    assert table["count"].tolist() == [1, 1, 1, 1]
    assert table["fraction_malignant"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert table["mean_predicted"].tolist() == pytest.approx([0.05, 0.15, 0.85, 0.95])
    assert plots.reliability_table([1], [1.0])["bin"].tolist() == ["0.9-1.0"]  # p = 1 lands in the last bin
    from mammo_core.evaluation.calibration import brier

    assert brier([0, 1], [0.0, 1.0]) == 0.0
    assert brier([0, 1], [0.5, 0.5]) == pytest.approx(0.25)


def test_fit_for_display_downscales_keeping_aspect_and_never_upscales():
    import numpy as np

    from appkit import plots

    big = np.zeros((4000, 3000), dtype=np.uint8)
    small = plots.fit_for_display(big, 1000)
    assert small.shape == (1000, 750) and small.dtype == np.uint8
    tiny = np.zeros((100, 80), dtype=np.uint8)
    assert plots.fit_for_display(tiny, 1000) is tiny


def test_image_pair_figure_links_zoom_of_both_views():
    import numpy as np

    from appkit import plots

    gray = np.zeros((50, 40), dtype=np.uint8)
    rgb = np.zeros((50, 40, 3), dtype=np.uint8)
    fig = plots.image_pair_figure(gray, rgb)
    assert [t.type for t in fig.data] == ["image", "image"]
    assert all(t.source.startswith("data:image/png;base64,") for t in fig.data)
    assert fig.layout.xaxis2.matches == "x" and fig.layout.yaxis2.matches == "y"


def test_review_writes_to_the_log_that_mammo_audit_url_names(app_env, tiny_weights, tmp_path, monkeypatch, sample_png):
    """Review follows MAMMO_AUDIT_URL (here a SQLite URL; PostgreSQL goes through the same open_audit_log)."""
    from mammo_core.store.audit import AuditLog

    app_env(tiny_weights)
    target = tmp_path / "shared" / "log.sqlite3"
    monkeypatch.setenv("MAMMO_AUDIT_URL", f"sqlite:///{target}")
    at = start("review")
    at.file_uploader[0].set_value([("scan.png", sample_png, "image/png")]).run()
    no_exception(at)
    rows = AuditLog(target).recent(limit=10)
    assert len(rows) == 1 and rows[0]["model_name"] == "tiny-grouped"
