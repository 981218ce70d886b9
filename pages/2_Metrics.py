"""Metrics page: the honest numbers first (cross-validated AUC with its interval, by source image and by
patient), then ROC, confusion matrix and the paper's Table 1 for one or more models, from their cards and
recorded test (or out-of-fold) predictions, following a threshold slider. No dataset and no TensorFlow
needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from appkit import cards, plots, shared
from mammo_core.config import CLASS_NAMES, REPO_ROOT, data_dir
from mammo_core.evaluation import metrics as evaluate
from mammo_core.evaluation.calibration import brier
from mammo_core.store.registry import HISTORY_FILE

shared.setup("Metrics")

GRID_SIZE = 12
UNCALIBRATED = "probability_uncalibrated"  # column kept by mammo_core.evaluation.calibration beside the calibrated one


def table1(m: dict[str, Any]) -> pd.DataFrame:
    """The paper's Table 1 layout: benign, malignant, macro avg, weighted avg x precision, recall, f1, support."""
    rows = {**m["per_class"], "macro avg": m["macro_avg"], "weighted avg": m["weighted_avg"]}
    return pd.DataFrame({k: {"precision": v["precision"], "recall": v["recall"], "f1-score": v["f1"],
                             "support": int(v["support"])} for k, v in rows.items()}).T


def paper_table1() -> pd.DataFrame:
    rows = {k: {"precision": p, "recall": r, "f1-score": f} for k, (p, r, f) in shared.PAPER_TABLE1["rows"].items()}
    return pd.DataFrame(rows).T


def shown(table: pd.DataFrame) -> pd.DataFrame:
    """Numbers as text with two decimals (support as a count): st.table draws HTML that wraps instead of
    clipping at narrow widths."""
    return table.apply(lambda col: col.map(lambda v: f"{int(v)}" if col.name == "support" else cards.fmt(v, ".2f")))


def honest_table(data: list[tuple[str, dict]]) -> pd.DataFrame:
    """One row per model: the cross-validated AUCs with their intervals, then the single split."""
    rows = []
    for name, card in data:
        cv = cards.cross_validated(card)
        single = cards.single_split(card)
        rows.append({"model": name, "evaluated by": cards.protocol_short(card),
                     "cross-validated AUC by source image [95 % CI]": cv.get("cross_validation", {}).get("text", "—"),
                     "cross-validated AUC by patient [95 % CI]": cv.get("cross_validation_patient", {}).get("text", "—"),
                     "single split test AUC": single["text"] if single else "none (cross-validated)"})
    return pd.DataFrame(rows).set_index("model")


def default_selection(names: list[str], card_of: dict[str, dict], chosen: str | None) -> list[str]:
    """The chosen model, plus the newest model with the other split protocol (to compare)."""
    first = chosen if chosen in names else names[0]
    protocol = cards.protocol(card_of[first])
    other = next((n for n in names if cards.protocol(card_of[n]) not in (None, protocol)), None)
    return [first] + ([other] if other else [])


def why_they_differ(selected: list[tuple[str, dict]]) -> str:
    """One plain sentence per model on what its test set shares with training, and why that matters."""
    parts = []
    leaky = [n for n, c in selected if cards.is_leaky(c)]
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
        elif cards.is_cross_validated(card):
            parts.append(f"**{shared.plain(name)}** ({cards.protocol_short(card)}) is scored out-of-fold: every image "
                         "by the member that never saw its group. Its numbers estimate performance on unseen "
                         "mammograms and use every image.")
    if leaky and len(leaky) < len(selected):
        which = "the paper-split model's numbers are" if len(leaky) == 1 else "the paper-split models' numbers are"
        parts.append(f"So {which} not comparable with the others: leaky copies flatter the paper split, and only "
                     "grouped splits and grouped cross-validation estimate how a model does on new mammograms.")
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
    from mammo_core.io.images import load_image
    from appkit.plots import fit_for_display

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
        table = cards.fold_table(folds)
        st.dataframe(table, hide_index=True, column_config={
            c: st.column_config.NumberColumn(format="%.3f") for c in ("AUC", "accuracy", "sensitivity", "specificity",
                                                                       "validation AUC", "temperature")})
    if cv.get("validation"):
        st.caption(f"Validation: {cv['validation']}.")
    pooled = cv.get("pooled") or {}
    if pooled:
        rows = []
        for metric in ("auc", "accuracy", "sensitivity", "specificity"):
            ci = pooled.get(f"{metric}_ci") or [None, None]
            rows.append({"metric": "AUC" if metric == "auc" else metric, "pooled out-of-fold": shared.fmt(pooled.get(metric)),
                         "95 % CI": f"{shared.fmt(ci[0])} – {shared.fmt(ci[1])}" if len(ci) == 2 else "—"})
        st.table(pd.DataFrame(rows).set_index("metric"))


def calibration_info(card: dict[str, Any]) -> None:
    cal = card.get("calibration")
    if not isinstance(cal, dict):
        return
    params = ", ".join(f"{k} = {shared.fmt(cal[k])}" for k in ("temperature", "a", "b") if k in cal)
    if "temperatures" in cal and isinstance(cal["temperatures"], list):
        params = "temperatures " + ", ".join(shared.fmt(t, ".2f") for t in cal["temperatures"])
    where = "out-of-fold" if "brier_oof_before" in cal else "test"
    st.markdown(f"**Calibration in the card** — method: {cal.get('method', '?')}{' (' + params + ')' if params else ''}; "
                f"{where} Brier before {shared.fmt(cal.get('brier_test_before', cal.get('brier_oof_before')))}, "
                f"after {shared.fmt(cal.get('brier_test_after', cal.get('brier_oof_after')))}; "
                f"computed on {cal.get('computed_on', '?')}.")


def breast_level(data: list[tuple[str, dict]]) -> None:
    """Breast- and exam-level AUC from the cards' `breast_level` blocks (`python -m mammo_core breast-level`)."""
    shown_any = False
    for name, card in data:
        rows = cards.breast_level_rows(card)
        if not rows:
            continue
        if not shown_any:
            st.subheader("By breast and by exam")
            shown_any = True
        block = card["breast_level"]
        image = block.get("image_level") or {}
        st.markdown(f"**{shared.plain(name)}** · source-image AUC {cards.fmt_ci(image.get('auc'), image.get('auc_ci'))}")
        st.table(pd.DataFrame(rows).set_index("rule"))
        st.caption(f"{shared.plain(block.get('choice_note', ''))} A breast is malignant when any of its views is; "
                   "the exam takes the higher breast score. From the out-of-fold predictions of patient-grouped "
                   "cross-validation; 95 % intervals resample patients.")


Scored = tuple[str, dict, pd.DataFrame, dict]  # (model name, card, test predictions, metrics at the threshold)


def main() -> None:
    st.title("Metrics")
    entries = shared.usable_models()
    if not entries:
        st.info("No trained model yet. Train one on the Retrain page.")
        return
    cards_ = {e.name: e.card for e in entries}
    dirs = {e.name: e.path for e in entries}
    selected = st.multiselect("Models to compare", list(cards_),
                              default=default_selection(list(cards_), cards_, shared.chosen_model_name()),
                              key="metrics_models", help="All figures show every selected model.")
    if not selected:
        st.info("Choose at least one model.")
        return
    threshold = shared.threshold_control(cards_[selected[0]], selected[0], where="metrics")
    st.caption("The threshold applies to every model shown. Everything here is computed from each model's "
               "recorded test predictions (test_predictions.csv: out-of-fold predictions for cross-validated "
               "models); nothing is re-scored.")
    honest_numbers([(n, cards_[n]) for n in selected])
    data = scored(selected, cards_, dirs, threshold)
    if not data:
        return
    threshold_summary(data, threshold)
    roc_section(data, threshold)
    confusion_section(data, threshold)
    histogram_section(data, threshold)
    calibration_section(data)
    training_curves(data, dirs)
    test_images(data, threshold)


def honest_numbers(models: list[tuple[str, dict]]) -> None:
    st.subheader("Honest numbers first")
    st.table(honest_table(models))
    st.caption("Cross-validated AUC: pooled out-of-fold predictions of grouped k-fold cross-validation, with a 95 % "
               "bootstrap interval that resamples source images (or patients), not copies. These estimate performance "
               "on new mammograms; a single split rests on few source images, and the paper split is leaky.")
    for n, card in models:
        if cards.is_leaky(card):
            st.warning(f"{shared.plain(n)}: " + shared.LEAKY_BANNER, icon=":material/warning:")
    breast_level(models)


def scored(selected: list[str], cards_: dict[str, dict], dirs: dict[str, Path], threshold: float) -> list[Scored]:
    """Each selected model's recorded test predictions and their metrics at `threshold`; unusable ones are
    left out with a warning."""
    data: list[Scored] = []
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
        data.append((name, cards_[name], table, m))
    return data


def threshold_summary(data: list[Scored], threshold: float) -> None:
    st.subheader(f"At threshold {threshold:.2f}")

    def count(value: Any) -> str:
        return "—" if value is None else str(value)

    summary = pd.DataFrame([{
        "model": n, "evaluated on": f"{cards.test_label(c)} · {shared.protocol_short(c)}", "images": count(m["n"]),
        "test source images": count(((c.get("split") or {}).get("test") or {}).get("source_images")),
        "shared with training": count(((c.get("split") or {}).get("shared_source_images") or {}).get("train-test")),
        **{k: cards.fmt(m[key]) for k, key in (("accuracy", "accuracy"), ("loss", "loss"), ("AUC", "auc"),
                                                ("sensitivity", "sensitivity"), ("specificity", "specificity"))},
    } for n, c, _, m in data]).set_index("model")
    st.table(summary)
    sentence = why_they_differ([(n, c) for n, c, _, _ in data])
    if sentence:
        st.markdown(sentence)


def roc_section(data: list[Scored], threshold: float) -> None:
    st.subheader("ROC curve")
    curves = []
    for n, c, t, m in data:
        roc = evaluate.roc_points(t["label"], t["probability"])
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        mark = " — paper split, LEAKY" if cards.is_leaky(c) else (" — out-of-fold" if cards.is_cross_validated(c) else "")
        curves.append({"label": n + mark, "fpr": roc["fpr"], "tpr": roc["tpr"], "auc": m["auc"],
                       "point": (fp / (fp + tn) if fp + tn else 0.0, tp / (tp + fn) if tp + fn else 0.0)})
    st.plotly_chart(plots.roc_figure(curves, threshold=threshold), key="roc")


def confusion_section(data: list[Scored], threshold: float) -> None:
    st.subheader("Confusion matrix and Table 1")
    for n, c, t, m in data:
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        st.markdown(f"**{shared.plain(n)}** · {shared.protocol_short(c)} · accuracy {m['accuracy']:.2%} · loss {m['loss']:.3f} · "
                    f"AUC {shared.fmt(m['auc'])}")
        is_paper = (c.get("split") or {}).get("protocol") == "paper"
        cols = st.columns([1, 1.3])
        with cols[0]:
            st.plotly_chart(plots.confusion_figure(m["confusion_matrix"]), key=f"cm_{n}")
            st.caption(f"At threshold {threshold:.2f}: TN {tn} · FP {fp} · FN {fn} · TP {tp}")
        with cols[1]:
            st.table(shown(table1(m)))
            st.caption(f"This model at threshold {threshold:.2f}, on its {cards.test_label(c)} predictions.")
            if is_paper:
                st.table(shown(paper_table1()))
                p = shared.PAPER_TABLE1
                st.caption(f"The paper's reported Table 1 (paper split): accuracy {p['accuracy']:.2%}, "
                           f"loss {p['loss']:.2f}, AUC {p['auc']:.3f}. For reference only.")


def histogram_section(data: list[Scored], threshold: float) -> None:
    st.subheader("Predicted probabilities by true class")
    cols = st.columns(min(len(data), 2))
    for i, (n, _, t, _) in enumerate(data):
        with cols[i % len(cols)]:
            st.plotly_chart(plots.probability_histogram(t, threshold=threshold, title=n), key=f"hist_{n}")


def calibration_section(data: list[Scored]) -> None:
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
                operating_points_table(c)


def operating_points_table(card: dict) -> None:
    points = shared.operating_points(card)
    if not points:
        return
    st.markdown("**Operating points**")
    rows = []
    for op in points:
        row = {"operating point": op["name"], "threshold": cards.fmt(op["threshold"], ".2f")}
        for where, sens, spec in cards.operating_point_figures(op):
            row[f"{where} sensitivity"] = cards.fmt(sens, ".2f")
            row[f"{where} specificity"] = cards.fmt(spec, ".2f")
        rows.append(row)
    st.table(pd.DataFrame(rows).set_index("operating point"))
    st.caption(f"Chosen on {points[0].get('computed_on', 'validation')}.")


def training_curves(data: list[Scored], dirs: dict[str, Path]) -> None:
    with st.expander("Training curves"):
        for n, c, _, _ in data:
            st.markdown(f"**{shared.plain(n)}**")
            if cards.is_cross_validated(c):
                st.caption("Trained by cross-validation, one member per fold: the per-fold results are in the "
                           "cross-validation table above.")
                continue
            try:
                rows = pd.read_csv(dirs[n] / HISTORY_FILE).to_dict("records")
            except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
                st.caption(f"{shared.plain(n)}: no history.csv")
                continue
            st.plotly_chart(plots.history_figure(rows), key=f"history_{n}")


def test_images(data: list[Scored], threshold: float) -> None:
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
