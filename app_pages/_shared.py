"""Helpers shared by the app's pages: the model choice, the cached model, the threshold control,
cached tables and small card-reading utilities. Streamlit glue only; the work is in mammo_core."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from mammo_core import registry
from mammo_core.config import DEFAULT_THRESHOLD, weights_dir
from mammo_core.errors import ModelDirError

MODEL_KEY = "model_choice"  # the chosen model name (plain session state, kept across pages)
PAPER_TABLE1 = {  # the paper's reported Table 1 (paper split), for reference only
    "accuracy": 0.9024, "loss": 0.57, "auc": 0.947,
    "rows": {"benign": (0.93, 0.76, 0.84), "malignant": (0.89, 0.97, 0.93)},
}


def keep_keras_state_between_reruns() -> None:
    """Stop Streamlit from calling `keras.backend.clear_session()` after every script run.

    Streamlit does that (in `script_runner._clean_problem_modules`) for apps that build a new model on
    each rerun. Ours builds each model once, in `st.cache_resource`, so the clean-up frees nothing;
    but it also empties TensorFlow's kernel cache, so the first model call of every rerun
    re-optimises the compiled probability + Grad-CAM graph: about 0.2 s per upload with the
    EfficientNet model, in every session, whenever any session finishes a run. The matplotlib part of
    the clean-up is kept. Idempotent; does nothing if Streamlit's internals change (pinned version).
    """
    try:
        from streamlit.runtime.scriptrunner import script_runner
    except ImportError:  # pragma: no cover - a Streamlit without this module does no such clean-up
        return
    original = getattr(script_runner, "_clean_problem_modules", None)
    if original is None or getattr(original, "keeps_keras", False):
        return

    def clean_problem_modules_but_keras() -> None:
        import sys

        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")

    clean_problem_modules_but_keras.keeps_keras = True  # type: ignore[attr-defined]
    clean_problem_modules_but_keras.__wrapped__ = original  # type: ignore[attr-defined]
    script_runner._clean_problem_modules = clean_problem_modules_but_keras


def weights_root() -> Path:
    return weights_dir()


def usable_models() -> list[registry.ModelEntry]:
    """Model directories with a readable card, newest first (read fresh: new models appear at once)."""
    return [e for e in registry.list_models(weights_root()) if e.problem is None]


def chosen_model_name() -> str | None:
    """The sidebar's choice, else the active model (weights/ACTIVE or the newest)."""
    name = st.session_state.get(MODEL_KEY)
    if name and (weights_root() / name).is_dir():
        return name
    return registry.active_model_name(weights_root())


def choose_model(name: str) -> None:
    """Callback-safe: make the sidebar select `name` on the next run."""
    st.session_state[MODEL_KEY] = name


def model_selector() -> str | None:
    """The sidebar model selectbox; returns the chosen model name (None when there is no model).

    The widget's key changes with the list of models and their labels: a keyed selectbox whose
    options or labels change keeps showing the old ones in the browser, and a newly trained model
    must appear at once. The choice itself lives in MODEL_KEY.
    """
    entries = usable_models()
    if not entries:
        st.sidebar.info("No trained model yet. Train one on the Retrain page.")
        return None
    names = [e.name for e in entries]
    active = registry.active_model_name(weights_root())
    current = st.session_state.get(MODEL_KEY)
    if current not in names:  # first run, or the chosen model was removed
        current = active if active in names else names[0]
        st.session_state[MODEL_KEY] = current
    labels = {e.name: f"{e.name}{' (active)' if e.name == active else ''} · {protocol_short(e.card)}" for e in entries}
    widget = "model_select::" + hashlib.sha1("|".join(labels[n] for n in names).encode()).hexdigest()[:12]
    st.session_state[widget] = current

    def remember() -> None:
        st.session_state[MODEL_KEY] = st.session_state[widget]

    st.sidebar.selectbox("Model", names, key=widget, format_func=labels.__getitem__, on_change=remember,
                         help="Models in the weights folder. 'Make active' on the Retrain page changes the default.")
    return current


def _signature(model_dir: Path) -> tuple:
    """Changes when the model file or card is replaced, so caches reload."""
    sig = []
    for name in (registry.MODEL_FILE, registry.CARD_FILE, registry.PREDICTIONS_FILE):
        try:
            stat = (model_dir / name).stat()
            sig.append((name, stat.st_mtime_ns, stat.st_size))
        except OSError:
            sig.append((name, None, None))
    return tuple(sig)


@st.cache_data(show_spinner=False, max_entries=32)
def _verified(model_dir: str, signature: tuple) -> tuple[dict[str, Any] | None, str | None]:  # noqa: ARG001
    try:
        return registry.verify_model_dir(model_dir), None
    except ModelDirError as exc:
        return None, str(exc)


def model_in_use(name: str | None) -> tuple[Path | None, dict[str, Any], list[str]]:
    """The model the app will use for `name` without loading TensorFlow: the chosen model if its
    files check out (sha256 against the card), else the newest that does. Returns
    (model_dir or None, card, warnings) in the same spirit as registry.load_model_with_fallback."""
    root = weights_root()
    warnings: list[str] = []
    candidates = []
    if name:
        candidates.append(root / name)
    candidates += [e.path for e in registry.list_models(root) if e.problem is None and e.name != name]
    for i, path in enumerate(candidates):
        card, problem = _verified(str(path), _signature(path))
        if card is not None:
            if i > 0:
                warnings.append(f"Using {path.name} instead.")
            return path, card, warnings
        warnings.append(problem or f"{path}: unusable")
    return None, {}, warnings


@st.cache_resource(show_spinner=False, max_entries=2)
def _load_predictor(name: str | None, root: str, signature: tuple):  # noqa: ARG001
    # Imported here so that TensorFlow loads only when a page needs the model, not at first paint.
    from mammo_core.predict import Predictor

    model, card, model_dir, warnings = registry.load_model_with_fallback(name, root=root)
    predictor = Predictor(model, card, model_dir)
    predictor.warm_up()
    return predictor, list(warnings)


def get_predictor(name: str | None):
    """(Predictor, warnings) for the chosen model, loaded once per process; raises ModelDirError
    when no model loads at all."""
    root = weights_root()
    sig = _signature(root / name) if name else ()
    return _load_predictor(name, str(root), sig)


@st.cache_data(show_spinner=False, max_entries=16)
def _read_predictions(path: str, signature: tuple) -> pd.DataFrame | None:  # noqa: ARG001
    try:
        table = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    if not {"label", "probability"} <= set(table.columns) or table.empty:
        return None
    return table


def test_predictions(model_dir: Path) -> pd.DataFrame | None:
    """The model's recorded test predictions (path, group, patient, label, probability), or None."""
    return _read_predictions(str(model_dir / registry.PREDICTIONS_FILE), _signature(model_dir))


def card_threshold(card: dict[str, Any]) -> float:
    try:
        t = float(card.get("threshold", DEFAULT_THRESHOLD))
    except (TypeError, ValueError):
        return DEFAULT_THRESHOLD
    return t if 0.0 <= t <= 1.0 else DEFAULT_THRESHOLD


def operating_points(card: dict[str, Any]) -> list[dict[str, Any]]:
    points = []
    for op in card.get("operating_points") or []:
        try:
            t = float(op["threshold"])
        except (KeyError, TypeError, ValueError):
            continue
        if 0.0 <= t <= 1.0:
            points.append({**op, "threshold": t, "name": str(op.get("name", f"t={t:.2f}"))})
    return points


def threshold_control(card: dict[str, Any], model_name: str, *, where: str) -> float:
    """Operating-point selectbox (when the card has operating points) and a threshold slider.

    The value is remembered per model across pages; it starts at the card's threshold.
    """
    keep = f"threshold::{model_name}"
    widget = f"threshold_widget::{where}::{model_name}"
    default = card_threshold(card)
    st.session_state.setdefault(keep, default)
    st.session_state[widget] = st.session_state[keep]

    def remember() -> None:
        st.session_state[keep] = st.session_state[widget]

    points = operating_points(card)
    if points:
        options = [-1, *range(len(points))]  # -1: the card's threshold (not None: no clear button)

        def describe(i: int) -> str:
            if i < 0:
                return f"Card threshold ({default:.2f})"
            op = points[i]
            extra = ", ".join(f"{k} {op[k]:.2f}" for k in ("sensitivity", "specificity")
                              if isinstance(op.get(k), (int, float)))
            on = f", on {op['computed_on']}" if op.get("computed_on") else ""
            return f"{op['name']} ({op['threshold']:.2f}{'; ' + extra if extra else ''}{on})"

        def apply_point() -> None:
            i = st.session_state[f"op::{where}::{model_name}"]
            st.session_state[keep] = default if i is None or i < 0 else points[i]["threshold"]
            st.session_state[widget] = st.session_state[keep]

        st.selectbox("Operating point", options, format_func=describe, key=f"op::{where}::{model_name}",
                     on_change=apply_point, help="Named thresholds from the model card.")
    st.slider("Decision threshold (malignant when probability ≥ threshold)", 0.0, 1.0, step=0.01,
              key=widget, on_change=remember)
    return float(st.session_state[keep])


def protocol_short(card: dict[str, Any]) -> str:
    protocol = (card.get("split") or {}).get("protocol") or (card.get("evaluation") or {}).get("protocol")
    if protocol == "paper":
        return "paper split (leaky)"
    if protocol == "grouped":
        by = (card.get("split") or {}).get("group_by") or "source"
        return f"grouped split by {by}"
    return "split unknown"


def evaluation_note(card: dict[str, Any]) -> None:
    """The card's evaluation note: a warning for the leaky paper split, info otherwise."""
    note = (card.get("evaluation") or {}).get("note")
    protocol = (card.get("split") or {}).get("protocol")
    if not note:
        return
    (st.warning if protocol == "paper" else st.info)(note, icon=":material/warning:" if protocol == "paper" else ":material/info:")


def fmt(value: Any, spec: str = ".3f") -> str:
    """Format a number, or an em dash for a missing/NaN value."""
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return format(value, spec)
    return "—"


def created_date(card: dict[str, Any]) -> str:
    return str(card.get("created", ""))[:10] or "unknown date"


def show_warnings(warnings: list[str]) -> None:
    if warnings:
        st.warning("The chosen model could not be used: " + " ".join(warnings), icon=":material/warning:")
