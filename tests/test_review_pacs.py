"""The Review page's PACS source against the real Orthanc that tests/test_pacs.py starts: search by accession
number, score a four-view study by image, breast and exam, push the SR and Secondary Captures."""

from __future__ import annotations

import pytest

from mammo_core.pacs.vocabulary import ENV_PASSWORD, ENV_URL, ENV_USERNAME

from .test_app import app_env, start  # noqa: F401  (fixture)
from .test_pacs import four_view_study, orthanc  # noqa: F401  (the session Orthanc fixture)


def test_review_hides_the_pacs_source_when_none_is_configured(app_env, tiny_weights, monkeypatch):
    for name in (ENV_URL, ENV_USERNAME, ENV_PASSWORD):
        monkeypatch.delenv(name, raising=False)
    app_env(tiny_weights)
    at = start("review")
    assert not [r for r in at.radio if r.key == "review_source"]
    assert len(at.get("file_uploader")) == 1


def test_review_scores_a_pacs_study_and_pushes_the_results(app_env, tiny_weights, orthanc, monkeypatch):
    study = four_view_study(seed=31)
    for ds in study:
        ds.AccessionNumber = "REVIEWAPP1"  # unique to this test: other tests share theirs
    orthanc.upload(study)
    uid = str(study[0].StudyInstanceUID)
    monkeypatch.setenv(ENV_URL, orthanc.dicomweb)
    monkeypatch.setenv(ENV_USERNAME, orthanc.username)
    monkeypatch.setenv(ENV_PASSWORD, orthanc.password)
    app_env(tiny_weights)
    at = start("review")
    source = at.radio(key="review_source")
    assert source.value == "Upload"  # the upload source stays the default
    source.set_value("PACS").run()
    at.text_input(key="pacs_value").input("REVIEWAPP1").run()
    at.button(key="pacs_search").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="pacs_study").value == uid
    at.button(key="pacs_score").click().run()
    assert not at.exception, [e.value for e in at.exception]
    images = at.dataframe[0].value
    assert len(images) == 4 and set(images["laterality"]) == {"L", "R"}
    breasts = next(t.value for t in at.table if "views" in t.value.columns)
    assert set(breasts.index) == {"left", "right"}
    exam = next(m for m in at.metric if m.label.startswith("Exam"))
    assert float(exam.value) == pytest.approx(breasts["probability"].max(), abs=1e-3)
    at.button(key="pacs_push").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Comprehensive SR and 4 Secondary Captures" in s.value for s in at.success)
    modalities = {s["00080060"]["Value"][0] for s in orthanc.client().search_for_series(study_instance_uid=uid)}
    assert {"MG", "SR", "OT"} <= modalities
    page = " ".join(str(e.value) for kind in ("markdown", "caption", "error", "success") for e in at.get(kind))
    assert orthanc.password not in page and "SECRETNAME" not in page


def test_review_reports_refused_credentials_in_one_line(app_env, tiny_weights, orthanc, monkeypatch):
    monkeypatch.setenv(ENV_URL, orthanc.dicomweb)
    monkeypatch.setenv(ENV_USERNAME, orthanc.username)
    monkeypatch.setenv(ENV_PASSWORD, "wrong-" + orthanc.password)
    app_env(tiny_weights)
    at = start("review")
    at.radio(key="review_source").set_value("PACS").run()
    at.text_input(key="pacs_value").input("20240101").run()
    at.radio(key="pacs_by").set_value("study date").run()
    at.button(key="pacs_search").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1 and orthanc.password not in at.error[0].value
