"""Metrics page: ROC, confusion matrix and the paper's Table 1 for one or more models, from their cards
and recorded test predictions (no dataset and no TensorFlow needed), following a threshold slider."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from mammo_core import evaluate, plots
from mammo_core.calibration import brier
from mammo_core.config import CLASS_NAMES, REPO_ROOT, data_dir
from mammo_core.registry import HISTORY_FILE
from app_pages import _shared as shared

GRID_SIZE = 12
UNCALIBRATED = "probability_uncalibrated"  # column kept by mammo_core.calibration beside the calibrated one


def table1(m: dict[str, Any]) -> pd.DataFrame:
    """The paper's Table 1 layout: benign, malignant, macro avg, weighted avg x precision, recall, f1, support."""
    rows = {**m["per_class"], "macro avg": m["macro_avg"], "weighted avg": m["weighted_avg"]}
    return pd.DataFrame({k: {"precision": v["precision"], "recall": v["recall"], "f1-score": v["f1"],
                             "support": int(v["support"])} for k, v in rows.items()}).T


def paper_table1() -> pd.DataFrame:
    rows = {k: {"precision": p, "recall": r, "f1-score": f} for k, (p, r, f) in shared.PAPER_TABLE1["rows"].items()}
    return pd.DataFrame(rows).T


def default_selection(names: list[str], cards: dict[str, dict], chosen: str | None) -> list[str]:
    """The chosen model, plus the newest model with the other split protocol (to compare)."""
    first = chosen if chosen in names else names[0]
    protocol = (cards[first].get("split") or {}).get("protocol")
    other = next((n for n in names if (cards[n].get("split") or {}).get("protocol") not in (None, protocol)), None)
    return [first] + ([other] if other else [])


def why_they_differ(selected: list[tuple[str, dict]]) -> str:
    """One plain sentence per model on what its test set shares with training, and why that matters."""
    parts = []
    for name, card in selected:
        split = card.get("split") or {}
        test = split.get("test") or {}
        shared_n = (split.get("shared_source_images") or {}).get("train-test")
        if split.get("protocol") == "paper":
            parts.append(f"**{shared.plain(name)}** (paper split) is tested on {test.get('images', '?')} augmented copies of "
                         f"{test.get('source_images', '?')} source mammograms, {shared_n if shared_n is not None else '?'} "
                         "of which also have copies in its training set: it is largely recognising images it has "
                         "already seen, so its numbers are inflated.")
        elif split.get("protocol") == "grouped":
            parts.append(f"**{shared.plain(name)}** (grouped split by {split.get('group_by') or 'source'}) is tested on "
                         f"{test.get('images', '?')} images of {test.get('source_images', '?')} source mammograms, "
                         f"{shared_n if shared_n is not None else '?'} of which are in its training set: its numbers "
                         "estimate performance on unseen mammograms, and rest on few of them.")
    protocols = {(c.get("split") or {}).get("protocol") for _, c in selected}
    if {"paper", "grouped"} <= protocols:
        parts.append("So the two sets of numbers are not comparable: leaky copies flatter the paper split, "
                     "and only the grouped split estimates how the model does on new mammograms.")
    return " ".join(parts)


def resolve_dataset(card: dict[str, Any], table: pd.DataFrame) -> Path | None:
    """A dataset folder where the recorded test paths exist: MAMMO_DATA_DIR first, then the card's path."""
    candidates = []
    if data_dir() is not None:
        candidates.append(data_dir())
    card_path = (card.get("dataset") or {}).get("path")
    if card_path:
        p = Path(card_path)
        candidates += [p] if p.is_absolute() else [REPO_ROOT / p, Path.cwd() / p]
    sample = table["path"].head(3).tolist() if "path" in table else []
    for base in candidates:
        if sample and all((base / rel).is_file() for rel in sample):
            return base
    return None


@st.cache_data(show_spinner=False, max_entries=64)
def _thumbnail(path: str) -> np.ndarray | None:
    from mammo_core.errors import ImageReadError
    from mammo_core.imaging import load_image
    from mammo_core.plots import fit_for_display

    try:
        return fit_for_display(load_image(path).pixels, 224)
    except (ImageReadError, OSError):
        return None


def image_grid(table: pd.DataFrame, base: Path, threshold: float) -> None:
    """Like the paper's Figure 4: test images with true label, predicted label and probability."""
    seed = st.session_state.get("grid_seed", 0)
    per_class = GRID_SIZE // 2
    sample = pd.concat([part.sample(min(per_class, len(part)), random_state=seed)
                        for _, part in table.groupby("label")]).reset_index(drop=True)
    cols = st.columns(6)
    for i, row in sample.iterrows():
        pixels = _thumbnail(str(base / row["path"]))
        pred = CLASS_NAMES[int(row["probability"] >= threshold)]
        truth = CLASS_NAMES[int(row["label"])]
        mark = "✓" if pred == truth else "✗"
        with cols[i % 6]:
            if pixels is None:
                st.caption(f"{shared.plain(row['path'])}: unreadable")
            else:
                st.image(pixels, width="stretch")
            st.caption(f"{mark} true **{truth}** · pred. **{pred}** ({row['probability']:.2f})")
    if st.button("Show other images", key="grid_shuffle"):
        st.session_state["grid_seed"] = seed + 1
        st.rerun()


def cross_validations(card: dict[str, Any]) -> list[dict[str, Any]]:
    """`cross_validation` and any variant the card carries (e.g. `cross_validation_patient`)."""
    return [v for k, v in card.items() if k.startswith("cross_validation") and isinstance(v, dict)]


def cross_validation(cv: dict[str, Any]) -> None:
    st.markdown(f"**Cross-validation** — protocol: {cv.get('protocol', '?')}, k = {cv.get('k', '?')}, "
                f"grouped by {cv.get('group_by', '?')}")
    folds = cv.get("folds") or []
    if folds:
        st.dataframe(pd.DataFrame(folds), hide_index=True)
    pooled = cv.get("pooled") or {}
    if pooled:
        rows = []
        for metric in ("auc", "accuracy", "sensitivity", "specificity"):
            ci = pooled.get(f"{metric}_ci") or [None, None]
            rows.append({"metric": metric, "pooled": shared.fmt(pooled.get(metric)),
                         "95% CI": f"{shared.fmt(ci[0])} – {shared.fmt(ci[1])}" if len(ci) == 2 else "—"})
        st.dataframe(pd.DataFrame(rows), hide_index=True)


def calibration_info(card: dict[str, Any]) -> None:
    cal = card.get("calibration")
    if not isinstance(cal, dict):
        return
    params = ", ".join(f"{k} = {shared.fmt(cal[k])}" for k in ("temperature", "a", "b") if k in cal)
    st.markdown(f"**Calibration in the card** — method: {cal.get('method', '?')}{' (' + params + ')' if params else ''}; "
                f"Brier before {shared.fmt(cal.get('brier_test_before', cal.get('brier_oof_before')))}, after {shared.fmt(cal.get('brier_test_after', cal.get('brier_oof_after')))}; "
                f"computed on {cal.get('computed_on', '?')}.")


def main() -> None:
    st.title("Metrics")
    entries = shared.usable_models()
    if not entries:
        st.info("No trained model yet. Train one on the Retrain page.")
        return
    names = [e.name for e in entries]
    cards = {e.name: e.card for e in entries}
    dirs = {e.name: e.path for e in entries}
    chosen = shared.chosen_model_name()
    selected = st.multiselect("Models to compare", names, default=default_selection(names, cards, chosen),
                              key="metrics_models", help="All figures show every selected model.")
    if not selected:
        st.info("Choose at least one model.")
        return
    first = selected[0]
    threshold = shared.threshold_control(cards[first], first, where="metrics")
    st.caption("The threshold applies to every model shown. Everything here is computed from each model's "
               "recorded test predictions (test_predictions.csv); nothing is re-scored.")

    data: list[tuple[str, dict, pd.DataFrame, dict]] = []
    for name in selected:
        table = shared.test_predictions(dirs[name])
        if table is None:
            st.warning(f"{shared.plain(name)}: no readable test_predictions.csv; it is left out.")
            continue
        try:
            m = evaluate.compute_metrics(table["label"], table["probability"], threshold=threshold)
        except ValueError as exc:
            st.warning(f"{shared.plain(name)}: test predictions are unusable ({shared.plain(exc)}); it is left out.")
            continue
        data.append((name, cards[name], table, m))
    if not data:
        return

    summary = pd.DataFrame([{
        "model": n, "split": shared.protocol_short(c), "test images": m["n"],
        "test source images": ((c.get("split") or {}).get("test") or {}).get("source_images"),
        "shared with training": ((c.get("split") or {}).get("shared_source_images") or {}).get("train-test"),
        "accuracy": m["accuracy"], "loss": m["loss"], "AUC": m["auc"],
        "sensitivity": m["sensitivity"], "specificity": m["specificity"]} for n, c, _, m in data])
    st.dataframe(summary, hide_index=True, column_config={
        k: st.column_config.NumberColumn(format="%.3f") for k in ("accuracy", "loss", "AUC", "sensitivity", "specificity")})
    sentence = why_they_differ([(n, c) for n, c, _, _ in data])
    if sentence:
        st.markdown(sentence)

    st.subheader("ROC curve")
    curves = []
    for n, _, t, m in data:
        roc = evaluate.roc_points(t["label"], t["probability"])
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        curves.append({"label": n, "fpr": roc["fpr"], "tpr": roc["tpr"], "auc": m["auc"],
                       "point": (fp / (fp + tn) if fp + tn else 0.0, tp / (tp + fn) if tp + fn else 0.0)})
    st.plotly_chart(plots.roc_figure(curves, threshold=threshold), key="roc")

    st.subheader("Confusion matrix and Table 1")
    for n, c, t, m in data:
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        st.markdown(f"**{shared.plain(n)}** · {shared.protocol_short(c)} · accuracy {m['accuracy']:.2%} · loss {m['loss']:.3f} · "
                    f"AUC {shared.fmt(m['auc'])}")
        is_paper = (c.get("split") or {}).get("protocol") == "paper"
        cols = st.columns([1, 1.5, 1.2])
        with cols[0]:
            st.plotly_chart(plots.confusion_figure(m["confusion_matrix"]), key=f"cm_{n}")
            st.caption(f"At threshold {threshold:.2f}: TN {tn} · FP {fp} · FN {fn} · TP {tp}")
        with cols[1]:
            st.dataframe(table1(m), column_config={k: st.column_config.NumberColumn(format="%.2f")
                                                   for k in ("precision", "recall", "f1-score")})
            st.caption(f"This model at threshold {threshold:.2f}, on its test split.")
        if is_paper:
            with cols[2]:
                st.dataframe(paper_table1(), column_config={k: st.column_config.NumberColumn(format="%.2f")
                                                            for k in ("precision", "recall", "f1-score")})
                p = shared.PAPER_TABLE1
                st.caption(f"The paper's reported Table 1 (paper split): accuracy {p['accuracy']:.2%}, "
                           f"loss {p['loss']:.2f}, AUC {p['auc']:.3f}. For reference only.")

    st.subheader("Predicted probabilities by true class")
    cols = st.columns(min(len(data), 2))
    for i, (n, _, t, _) in enumerate(data):
        with cols[i % len(cols)]:
            st.plotly_chart(plots.probability_histogram(t, threshold=threshold, title=n), key=f"hist_{n}")

    st.subheader("Calibration")
    st.caption("Reliability diagram of the test probabilities in test_predictions.csv, as the app reports them "
               "(after calibration when the card has one; before it too when recorded), in 10 equal-width bins. "
               "Brier score: mean squared error of the probability (lower is better).")
    curves = []
    for n, _, t, _ in data:
        columns = [("probability", n)]
        if UNCALIBRATED in t:
            columns = [(UNCALIBRATED, f"{n} before calibration"), ("probability", f"{n} calibrated")]
        for column, label in columns:
            curves.append({"label": label, "table": plots.reliability_table(t["label"], t[column]),
                           "brier": brier(t["label"], t[column])})
    st.plotly_chart(plots.reliability_figure(curves), key="reliability")
    for n, c, _, _ in data:
        if c.get("calibration") or cross_validations(c) or c.get("operating_points"):
            with st.container(border=True):
                st.markdown(f"**{shared.plain(n)}**")
                calibration_info(c)
                for cv in cross_validations(c):
                    cross_validation(cv)
                points = shared.operating_points(c)
                if points:
                    st.markdown("**Operating points**")
                    st.dataframe(pd.DataFrame(points), hide_index=True)

    with st.expander("Training curves"):
        for n, _, _, _ in data:
            try:
                rows = pd.read_csv(dirs[n] / HISTORY_FILE).to_dict("records")
            except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
                st.caption(f"{shared.plain(n)}: no history.csv")
                continue
            st.plotly_chart(plots.history_figure(rows), key=f"history_{n}")
            st.caption(shared.plain(n))

    st.subheader("Test images")
    n, c, t, _ = data[0]
    base = resolve_dataset(c, t)
    if base is None:
        st.info("The dataset is not available here (set MAMMO_DATA_DIR to the dataset folder to see test images "
                f"of {n}).")
    else:
        st.caption(f"{GRID_SIZE} test images of {shared.plain(n)} from {shared.plain(base)}, with the decision at threshold {threshold:.2f}.")
        image_grid(t, base, threshold)


main()
