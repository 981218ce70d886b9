"""Review page: upload mammograms, get the probability of malignancy, the decision at a threshold and
a Grad-CAM overlay; a triage worklist of the session's images; every scored image goes to the audit log
once per model (at the threshold in use when it was first scored; moving the threshold is not logged).

Uploads are read in memory, never written to disk; once scored, the server's copy of the file is
dropped and the uploader emptied (a new widget key, drawn in the old one's place in the same run). The
session keeps display-size predictions per (file sha256, model): the worklist, so moving the threshold
or the opacity never re-runs the model. The uploader takes any file: whether it is an image the model
can read is for `mammo_core.imaging` to say, with its message.

File names can carry patient identifiers (`Smith^Anna_12345.dcm`), so the page never shows them as given:
each image is labelled by its number in the session and its name masked as the audit log masks it
(`shared.upload_name`); the worklist CSV and the audit log carry the same masked name.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from typing import Any

import pandas as pd
import streamlit as st

from appkit import cards, shared
from mammo_core.errors import ModelDirError

shared.setup("Review")

CACHE_KEY = "review_predictions"  # (file sha256, model) -> display-size Prediction: the session's worklist
CACHE_LIMIT = 48  # predictions kept; the oldest go first, the batch just uploaded never
UPLOADER_GEN = "review_uploader_gen"  # part of the uploader's key: a new key is an empty uploader
FAILED_KEY = "review_failed"  # [(label, reason)] of the last upload that could not be scored
NUMBER_KEY = "review_numbers"  # file sha256 -> its number in this session: with masked names, what tells images apart
KNOWN_KEY = "review_known"  # how many files of the last upload were already in the worklist
PANELS_CAPTION = ("Left: the original with the breast the model found. Middle: the model's own input (cropped, "
                  "chest wall to the left, intensities normalised). Right: Grad-CAM drawn back onto the original. ")
SCORED_THIS_RUN: list[int] = []  # images scored by this run of the page (each run executes the file anew)


def _model_key(predictor) -> str:
    """The worklist's key for a model and how it scores (plain, or over the 8 views)."""
    return (predictor.model_sha256 or predictor.name) + ("" if predictor.tta == "none" else f"+{predictor.tta}")


def scored_by(predictor) -> str:
    """The model as the worklist and the audit log name it (with the 8 views when they are on)."""
    return predictor.name + ("" if predictor.tta == "none" else " (8 views)")


def score_uploads(predictor, uploads: list[tuple[str, bytes]]) -> list[tuple[str, object]]:
    """[(label, prediction)] for (name, bytes) uploads, in order, scoring only what this session has not
    scored with this model before; the readable ones join the session's worklist (the cache).
    Shows a progress bar for a multi-file batch."""
    cache: OrderedDict = st.session_state.setdefault(CACHE_KEY, OrderedDict())
    model_key = _model_key(predictor)
    keys = [(hashlib.sha256(data).hexdigest(), model_key) for _, data in uploads]
    numbers: dict = st.session_state.setdefault(NUMBER_KEY, {})
    for sha, _ in keys:
        numbers.setdefault(sha, len(numbers) + 1)
    todo = [(i, key) for i, key in enumerate(keys) if key not in cache]
    st.session_state[KNOWN_KEY] = len({key for key in keys if key in cache})
    fresh: dict = {}
    if todo:
        bar = st.progress(0.0, text=f"Scoring {len(todo)} image(s)…") if len(todo) > 1 else None

        def progress(done: int) -> None:
            if bar is not None:
                bar.progress(done / len(todo), text=f"Scored {done} of {len(todo)} image(s)…")

        with st.spinner("Scoring…") if bar is None else contextlib.nullcontext():
            items = [(uploads[i][1], uploads[i][0]) for i, _ in todo]
            for (i, key), pred in zip(todo, predictor.score_many(items, with_cam=True, batch_size=8, progress=progress)):
                fresh[key] = shared.for_session(pred)  # display-size pixels only in session state
                if pred.error is None:
                    cache[key] = fresh[key]
        if bar is not None:
            bar.empty()
        SCORED_THIS_RUN.append(len(todo))
    current = set(keys)
    for key in list(cache):
        if len(cache) <= CACHE_LIMIT:
            break
        if key not in current:
            del cache[key]
    return [(label(key[0], name), fresh.get(key) or cache[key]) for (name, _), key in zip(uploads, keys)]


def label(sha256: str | None, name: str) -> str:
    """How the page, the worklist and its CSV name an uploaded image: its number in the session and its
    (masked) file name."""
    number = (st.session_state.get(NUMBER_KEY) or {}).get(sha256)
    return f"{number} · {name}" if number else name


def add_uploads(predictor, uploads: list[Any]) -> None:
    """Score the uploaded files into the worklist, note the unreadable ones, then free the files' bytes
    and move to a new uploader key (the caller draws the empty uploader in the old one's place)."""
    results = score_uploads(predictor, [(shared.upload_name(f.name), f.getvalue()) for f in uploads])
    st.session_state[FAILED_KEY] = [(shown, pred.error.removeprefix(f"{pred.name}: ")) for shown, pred in results
                                    if pred.error is not None]  # the message already names the file
    shared.drop_uploaded_files(uploads)
    st.session_state[UPLOADER_GEN] = st.session_state.get(UPLOADER_GEN, 0) + 1


def worklist_items(predictor) -> list[tuple[str, Any]]:
    """The session's scored images for this model, oldest first: [(label, prediction)]."""
    cache: OrderedDict = st.session_state.get(CACHE_KEY) or OrderedDict()
    model_key = _model_key(predictor)
    other = sum(1 for key in cache if key[1] != model_key)
    if other:
        st.caption(f"{other} image(s) of this session were scored with another model (or with the 8 views "
                   "switched the other way); upload them again to score them this way.")
    return [(label(pred.sha256, pred.name), pred) for key, pred in cache.items() if key[1] == model_key]


@st.cache_resource(show_spinner=False)
def _open_audit_log(url: str, default_path: str):
    """One log per configuration: MAMMO_AUDIT_URL (shared PostgreSQL or a SQLite file), else the embedded
    SQLite default. Both are cache keys, so a changed setting opens the new log."""
    from mammo_core.store.audit import open_audit_log

    return open_audit_log(url or None)


def _audit_log():
    """The audit log (MAMMO_AUDIT_URL, else MAMMO_AUDIT_DB or audit/audit.sqlite3), or None with a warning
    when it cannot be opened."""
    import os

    from mammo_core.store.audit import AUDIT_URL_ENV, default_audit_path

    try:
        log = _open_audit_log(os.environ.get(AUDIT_URL_ENV, "").strip(), str(default_audit_path()))
        return shared.audit_view(log)  # readers: their own rows
    except Exception as exc:  # noqa: BLE001 - the log must never stop scoring
        st.warning(f"Audit log unavailable ({shared.plain(exc)}); results are not being recorded.")
        return None


def record_in_audit(log, predictor, pred, threshold: float, decision: str) -> int | None:
    """Record a scored image once per image (its sha256) and model, at the threshold in use when it was
    first shown; returns its row id. Later threshold changes are views, not new scores: not logged."""
    if log is None:
        return None
    recorded = st.session_state.setdefault("review_audited", {})
    key = (pred.sha256, _model_key(predictor))
    if key not in recorded:
        try:
            recorded[key] = log.record(file_sha256=pred.sha256, file_name=pred.name, model_name=scored_by(predictor),
                                       model_sha256=predictor.model_sha256, probability=float(pred.probability),
                                       threshold=float(threshold), decision=decision)
        except Exception as exc:  # noqa: BLE001
            st.warning(f"Could not write to the audit log ({exc}).")
            return None
    return recorded[key]


def audit_section(log) -> None:
    with st.expander("Audit log (recent entries)"):
        if log is None:
            st.caption("The audit log is not available in this installation.")
            return
        try:
            recent = log.recent(limit=50)
        except Exception as exc:  # noqa: BLE001
            st.warning(f"Could not read the audit log ({exc}).")
            return
        if recent:
            st.dataframe(pd.DataFrame(recent), hide_index=True)
        else:
            st.caption("No entries yet.")
        full = getattr(log, "all_users", True)
        st.download_button("Download the full audit log (CSV)" if full else "Download your audit entries (CSV)",
                           log.to_csv, file_name="audit_log.csv" if full else "my_audit_entries.csv", mime="text/csv",
                           key="audit_csv")


# --- the PACS source (shown only when a PACS is configured: appkit.pacs) ----------------------------------

PACS_KEY = "review_pacs"  # session state: found study UIDs, the scored study, pushed results


def pacs_source(predictor, threshold: float, config) -> None:
    """Search the PACS by accession number or date, score one study by image, breast and exam, and push the
    SR and Secondary Captures back with one button."""
    from mammo_core.pacs import PacsError
    from mammo_core.pacs.roundtrip import result_objects
    from mammo_core.pacs.scoring import score_study

    from appkit import pacs as pacs_app

    state = st.session_state.setdefault(PACS_KEY, {})
    st.caption(f"PACS: {shared.plain(config.shown)} (DICOMweb). Exact values only: Orthanc's DICOMweb search "
               "does not decode escaped characters, so there are no wildcards.")
    by = st.radio("Search by", ["accession number", "study date"], horizontal=True, key="pacs_by")
    value = st.text_input("Accession number" if by == "accession number" else "Study date (YYYYMMDD or YYYYMMDD-YYYYMMDD)",
                          key="pacs_value").strip()
    try:
        if st.button("Search", key="pacs_search", disabled=not value):
            key = {"accession": value} if by == "accession number" else {"date": value}
            state.clear()
            pacs = pacs_app.client(config)
            pacs.check()
            state["found"] = pacs.find_studies(**key)
            if not state["found"]:
                st.info("No study matches.")
        found = state.get("found") or []
        if not found:
            return
        uid = st.selectbox("Study", found, key="pacs_study", format_func=lambda u: f"Study {u}")
        if st.button("Score this study", key="pacs_score", type="primary"):
            with st.spinner("Retrieving and scoring the study…"):
                images, skipped = pacs_app.client(config).fetch_study(uid)
                state.pop("pushed", None)
                state["skipped"] = skipped
                state["score"] = score_study(predictor, uid, images, with_cam=True) if images else None
        score = state.get("score")
        if score is None or score.study_uid != uid:
            if "skipped" in state and score is None:
                st.error("This study has no for-presentation MG image to score.")
            return
        study_results(predictor, score, threshold)
        if state.get("pushed"):
            st.success(state["pushed"])
        elif st.button("Push results to the PACS (SR + Secondary Captures)", key="pacs_push"):
            with st.spinner("Storing the report and the captures…"):
                sr, captures = result_objects(score)
                pacs_app.client(config).store([*captures, sr], uid)
            state["pushed"] = (f"Stored a Comprehensive SR and {len(captures)} Secondary Captures into the study "
                               "(RESEARCH USE ONLY - NOT FOR DIAGNOSIS).")
            st.success(state["pushed"])
    except PacsError as exc:  # unreachable, refused credentials, rejected store: one line, no secrets
        st.error(shared.plain(exc))


def study_results(predictor, score, threshold: float) -> None:
    """A scored study's images, breasts and exam with their decisions at `threshold`."""
    from mammo_core.pacs.scoring import json_records

    for s in score.errors:
        st.error(shared.plain(s.prediction.error))
    records = json_records(score)
    images_rows = [{"image": r.get("path") or r.get("sop_instance_uid"), "laterality": r["laterality"] or "?",
                    "view": r["view"] or "?", "probability": round(r["probability"], 4),
                    "decision": predictor.decision(r["probability"], threshold)}
                   for r in records if r["level"] == "image" and r.get("probability") is not None]
    st.subheader(f"Study: {len(images_rows)} images scored")
    st.dataframe(pd.DataFrame(images_rows), hide_index=True, key="pacs_images")
    breasts = [{"breast": {"R": "right", "L": "left"}[r["laterality"]], "views": ", ".join(r["views"]),
                "probability": round(r["probability"], 4), "decision": predictor.decision(r["probability"], threshold)}
               for r in records if r["level"] == "breast"]
    if breasts:
        st.table(pd.DataFrame(breasts).set_index("breast"))
    if score.exam_probability is not None:
        st.metric("Exam (higher breast)", f"{score.exam_probability:.3f}",
                  predictor.decision(score.exam_probability, threshold), delta_color="off")
    st.caption(f"Breast = {score.rule} of its views; exam = the higher breast. Decisions here at threshold "
               f"{threshold:.2f}; the pushed report records the card's threshold ({predictor.threshold:.2f}).")


def main() -> None:
    st.title("Review")
    st.caption("Research tool, not a diagnostic device. Uploaded files are read in memory, never saved to disk, "
               "and dropped once scored.")
    if not shared.usable_models():
        st.info("No trained model yet. Train one on the Retrain page.")
        return
    name = shared.chosen_model_name()
    try:
        with st.spinner("Loading the model…"):
            predictor, warnings = shared.get_predictor(name)
    except ModelDirError as exc:  # no other model is used in its place: the user picks one
        st.error(f"{shared.plain(exc)} Nothing was scored; choose a model in the sidebar.")
        return
    shared.show_warnings(warnings)
    model_header(predictor.card, predictor.name)
    if predictor.ensemble is not None and views_toggle(predictor.card):
        with st.spinner("Preparing the 8-view scoring…"):
            predictor, _ = shared.get_predictor(name, tta="dihedral8")
    threshold, alpha, floor = display_controls(predictor.card, predictor.name)

    from appkit import pacs as pacs_app

    config = pacs_app.settings()
    if config is not None and st.radio("Source", ["Upload", "PACS"], horizontal=True, key="review_source") == "PACS":
        pacs_source(predictor, threshold, config)
        return

    slot = st.empty()
    uploads = uploader(slot)
    log = _audit_log()
    if uploads:
        add_uploads(predictor, uploads)
        uploader(slot)  # an empty one in its place, in this same run: the worklist below has the images
    for fname, reason in st.session_state.get(FAILED_KEY, []):
        st.error(f"{shared.plain(fname)} could not be scored: {shared.plain(reason)}")
    if known := st.session_state.get(KNOWN_KEY):
        st.info(f"{known} of the files just added {'was' if known == 1 else 'were'} already in the worklist "
                "(the same image, by content), so nothing new was scored for it.")
    scored = worklist_items(predictor)
    if not scored:
        st.info("Upload one or more images to score them.")
        audit_section(log)
        return
    ok, rows = record_and_rows(predictor, scored, threshold, log)
    fname, pred, decision, row_id = ok[worklist(ok, rows)]
    show_prediction(fname, pred, decision, threshold, alpha, floor)
    if row_id is not None and log is not None:
        note_input(log, row_id)
    audit_section(log)


def uploader(slot) -> list[Any]:
    """The file uploader, drawn in `slot` under the session's current key (a new key is an empty uploader)."""
    return slot.file_uploader(
        "Mammograms, one or many: PNG, JPEG, TIFF, BMP or DICOM (a DICOM file may have no extension, e.g. "
        "IM00001). Scored images join the worklist below; the files themselves are not kept.", type=None,
        accept_multiple_files=True, key=f"review_uploads::{st.session_state.get(UPLOADER_GEN, 0)}")


def model_header(card: dict, name: str) -> None:
    """The model in use with its honest numbers, and the leaky-split banner when it applies."""
    honest = " · ".join(f"cross-validated AUC by {v['by']} {v['text']}" for v in cards.cross_validated(card).values())
    single = cards.single_split(card)
    st.caption(f"Model **{shared.plain(name)}** · {cards.protocol_short(card)} · created {cards.created_date(card)}"
               + (f" · {honest}" if honest else "") + (f" · single split test AUC {single['text']}" if single else ""))
    if cards.is_leaky(card):
        st.warning(shared.LEAKY_BANNER, icon=":material/warning:")


def views_toggle(card: dict) -> bool:
    """Whether to average the ensemble over the 8 flips and 90° rotations of each image."""
    measured = cards.views_text(card)
    return st.toggle("Average over 8 views (flips and 90° rotations)", key="review_tta", help=(
        "Each member's score is averaged over the image flipped and rotated 8 ways. "
        + (f"For this model: {measured}. " if measured else "Not measured for this model. ")
        + "About 4x the scoring time per image. Grad-CAM stays that of the plain view. The cross-validated "
        "figures shown elsewhere describe the plain view."))


def display_controls(card: dict, name: str) -> tuple[float, float, float]:
    """The decision threshold and the Grad-CAM opacity and floor: (threshold, alpha, floor)."""
    left, right = st.columns([2, 1])
    with left:
        threshold = shared.threshold_control(card, name, where="review")
    with right:
        alpha = st.slider("Grad-CAM opacity", 0.0, 1.0, 0.5, 0.05, key="review_alpha")
        floor = st.slider("Grad-CAM drawn above (share of its peak)", 0.0, 0.95, 0.5, 0.05, key="review_floor",
                          help="Only the upper part of the heat map is coloured; below it the grey image shows.")
    return threshold, alpha, floor


def record_and_rows(predictor, scored: list[tuple[str, Any]], threshold: float, log: Any
                    ) -> tuple[list[tuple[str, Any, str, Any]], list[dict[str, Any]]]:
    """Decide each scored image at `threshold` and record it in the audit log (once per image and model).

    Returns ([(file name, prediction, decision, audit row id)], [worklist row]).
    """
    ok, rows = [], []
    for fname, pred in scored:
        decision = predictor.decision(pred.probability, threshold)
        row_id = record_in_audit(log, predictor, pred, threshold, decision)
        ok.append((fname, pred, decision, row_id))
        interval = getattr(pred, "probability_interval", None)
        rows.append({"image": fname, "probability": round(pred.probability, 4),
                     **({"members' range": f"{interval[0]:.3f}–{interval[1]:.3f}"} if interval else {}),
                     "decision": decision,
                     "check": "in distribution" if not pred.warnings else "⚠ " + pred.warnings[0].split(";")[0],
                     "threshold": round(threshold, 4), "model": scored_by(predictor)})
    return ok, rows


def worklist(ok: list[tuple[str, Any, str, Any]], rows: list[dict[str, Any]]) -> int:
    """The worklist, most suspicious first, with its CSV download; returns the index of the image to inspect."""
    order = sorted(range(len(ok)), key=lambda i: -ok[i][1].probability)
    st.subheader(f"Worklist ({len(ok)} scored, most suspicious first)")
    table = pd.DataFrame([rows[i] for i in order])
    st.dataframe(table, hide_index=True, column_config={
        "probability": st.column_config.ProgressColumn("probability of malignancy", format="%.3f",
                                                       min_value=0.0, max_value=1.0)})
    left, right = st.columns([1, 1])
    left.download_button("Download the worklist (CSV)", table.to_csv(index=False), file_name="worklist.csv",
                         mime="text/csv", key="worklist_csv")
    if right.button("Clear the worklist", key="worklist_clear", help="Forget this session's scored images "
                    "(the audit log keeps its records)."):
        for key in (CACHE_KEY, FAILED_KEY, KNOWN_KEY, NUMBER_KEY):
            st.session_state.pop(key, None)
        st.rerun()
    if len(ok) == 1:
        return 0
    return st.selectbox("Image to inspect", order, key="review_pick",
                        format_func=lambda i: f"{ok[i][0]} — {ok[i][1].probability:.3f} ({ok[i][2]})")


def note_input(log: Any, row_id: Any) -> None:
    """A reviewer's note for the image's audit row, saved when it changes."""
    def save_note(row=row_id, key=f"note::{row_id}") -> None:
        try:
            log.set_note(row, st.session_state[key])
        except Exception as exc:  # noqa: BLE001
            st.session_state["review_note_error"] = str(exc)

    st.text_input("Note for the audit log (no patient identifiers)", key=f"note::{row_id}", on_change=save_note)
    if err := st.session_state.pop("review_note_error", None):
        st.warning(f"The note was not saved ({err}).")


def show_prediction(fname: str, pred, decision: str, threshold: float, alpha: float, floor: float) -> None:
    """Probability (with the ensemble members' range), decision, warnings, and three panels: the original
    with the breast outline, the model's own input, the Grad-CAM overlay on the original."""
    from mammo_core.inference.explain import overlay
    from appkit.plots import fit_for_display

    st.subheader(shared.plain(fname))
    for warning in pred.warnings:
        st.warning(shared.plain(warning))
    cols = st.columns(3)
    interval = getattr(pred, "probability_interval", None)
    cols[0].metric("Probability of malignancy", f"{pred.probability:.3f}",
                   help=f"Members' range {interval[0]:.3f}–{interval[1]:.3f}" if interval else None)
    cols[1].metric(f"Decision at threshold {threshold:.2f}", decision)
    meta = getattr(pred.image, "metadata", {}) or {}
    h, w = meta.get("height") or pred.image.pixels.shape[0], meta.get("width") or pred.image.pixels.shape[1]
    cols[2].metric("Image size", f"{w}×{h}", help=", ".join(f"{k}: {v}" for k, v in meta.items()
                                                            if isinstance(v, (str, int, float))) or None)
    if interval:
        st.caption(f"Range across the ensemble's members: **{interval[0]:.3f} – {interval[1]:.3f}**. Each member "
                   "was trained on different source images; a wide range means they disagree. It is not a "
                   "confidence interval for this patient.")
    pixels = fit_for_display(pred.image.pixels)
    model_view = pred.model_input if pred.model_input is not None else fit_for_display(pred.image.pixels, 224)
    overlaid = overlay(pixels, pred.heatmap_on_original(pixels.shape), alpha=alpha, floor=floor)
    outline = pred.outline_on(pixels.shape)
    if st.toggle("Zoom and pan", key="review_zoom",
                 help="Draw the panels as an interactive chart: drag to zoom, the original and the Grad-CAM "
                      "follow each other. The browser loads a charting library the first time (a few MB)."):
        interactive_panels(pixels, model_view, overlaid, outline, floor)
    else:
        static_panels(pixels, model_view, overlaid, outline, floor)


def static_panels(pixels, model_view, overlaid, outline, floor: float) -> None:
    """The three panels as plain images (no charting library in the browser): quick to draw anywhere; each
    opens full screen from its corner button."""
    from appkit.plots import colour_bar, outlined

    cols = st.columns([2, 1, 2])
    cols[0].image(outlined(pixels, outline), caption="Original, breast outlined", width="stretch", output_format="PNG")
    cols[1].image(model_view, caption="What the model saw", width="stretch", output_format="PNG")
    cols[2].image(overlaid, caption="Grad-CAM on the original", width="stretch", output_format="PNG")
    cols[2].image(colour_bar(floor), caption=f"Grad-CAM scale: 0 (left) to its peak (right); grey below {floor:.0%} "
                  "is not drawn", width="stretch", output_format="PNG")
    st.caption(PANELS_CAPTION + "Grad-CAM shows where the network responded; it is not a lesion outline. Turn on "
               "*Zoom and pan* to inspect details side by side.")


def interactive_panels(pixels, model_view, overlaid, outline, floor: float) -> None:
    """The three panels as one Plotly figure whose original and Grad-CAM panels zoom together."""
    from appkit.plots import image_triplet_figure

    ph, pw = pixels.shape
    fig = image_triplet_figure(pixels, model_view, overlaid, outline=outline,
                               height=int(min(640, max(360, 420 * ph / pw))))
    add_colour_bar(fig, floor)
    st.plotly_chart(fig, key="review_figure",
                    config={"scrollZoom": True, "displaylogo": False})
    st.caption(PANELS_CAPTION + "Drag to zoom (left and right follow each other), double-click to reset. Grad-CAM "
               f"shows where the network responded (coloured where it reaches {floor:.0%} of its peak); it is not a "
               "lesion outline.")


def add_colour_bar(fig, floor: float) -> None:
    """The Grad-CAM scale beside the figure: an invisible marker trace carrying the jet colour bar over the
    drawn range [floor, 1] (Plotly images have no colour bar of their own)."""
    import plotly.graph_objects as go

    from mammo_core.inference.explain import JET_STOPS

    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", hoverinfo="skip", showlegend=False,
                             marker=dict(colorscale=JET_STOPS, cmin=0.0, cmax=1.0, color=[floor], showscale=True,
                                         colorbar=dict(title=dict(text=f"Grad-CAM (drawn ≥ {floor:.0%})", side="right"),
                                                       thickness=12, len=0.9, tickvals=sorted({0.0, round(floor, 2), 1.0}),
                                                       tickformat=".0%"))),
                  row=1, col=3)


main()
if SCORED_THIS_RUN:
    # The run's full-size decodes, overlays and figure are garbage now; glibc would keep their heap
    # (80-megapixel uploads from 4 sessions left the server 1 GB above idle).
    shared.release_freed_memory()
