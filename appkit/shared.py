"""What every page of the app shares: `setup()` (page config, styles, sign-in and roles, the navigation,
the sidebar model selector, the research-use note), the model choice, the cached model, the threshold
control, cached tables, plain-text rendering of user strings. Streamlit glue only; the work is in
mammo_core (auth, registry, audit) and card reading in `appkit.cards`.

The app follows Streamlit's pages-directory convention: `app.py` is Home and each file in `pages/` is a
page (ordered and titled by its file name). Streamlit runs a page's file on its own, without app.py, so
each page starts with `setup()`; the navigation is drawn here, from `PAGES`, so a reader's sidebar
leaves out admin pages (which also refuse readers themselves, `require_admin`).
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from mammo_core import auth
from mammo_core.config import DEFAULT_THRESHOLD, weights_dir
from mammo_core.errors import ModelDirError
from mammo_core.store import registry
from mammo_core.store.card import read_card
from mammo_core.store.files import storage_error_message

from . import cards

APP_TITLE = "Mammogram research tool"
ICON = Path(__file__).parent / "icon.png"  # shipped: the favicon never comes from a font server
RESEARCH_NOTE = "Research use only — not for diagnosis."
#: The pages in navigation order: (script, label, icon, admins only). Files in pages/ sort the same way.
PAGES = [
    ("app.py", "Home", ":material/home:", False),
    ("pages/1_Review.py", "Review", ":material/search:", False),
    ("pages/2_Metrics.py", "Metrics", ":material/monitoring:", False),
    ("pages/3_Models.py", "Models", ":material/inventory_2:", False),
    ("pages/4_Retrain.py", "Retrain", ":material/model_training:", True),
]
# Narrow windows (e.g. 800 px with the sidebar open): columns wrap onto new rows instead of squeezing,
# metric values and table cells wrap instead of being cut with an ellipsis.
CSS = """
<style>


@media (max-width: 1100px) {
  [data-testid="stMain"] [data-testid="stHorizontalBlock"] { flex-wrap: wrap; row-gap: 0.5rem; }
  [data-testid="stMain"] [data-testid="stColumn"] { min-width: min(100%, 300px) !important; flex: 1 1 300px !important; }
}
[data-testid="stMetricValue"] > div { white-space: normal !important; overflow-wrap: anywhere; }
[data-testid="stTable"] { overflow-x: auto; }
[data-testid="stTable"] td, [data-testid="stTable"] th { white-space: normal; overflow-wrap: anywhere; }
</style>
"""

MODEL_KEY = "model_choice"  # the chosen model name (plain session state, kept across pages)
USER_KEY = "auth_user"  # the signed-in auth.User (session state)
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


def setup(page: str = "Home", *, admin_only: bool = False) -> auth.User:
    """The first call of every page: page config, styles, sign-in (stops the page until someone is
    signed in), the navigation for the user's role, the sidebar model selector and the research-use
    note. With `admin_only`, a reader gets a refusal and the page stops (defence in depth: the
    navigation already leaves the page out). Returns the signed-in user."""
    st.set_page_config(page_title=f"{page} · {APP_TITLE}" if page != "Home" else APP_TITLE, page_icon=str(ICON),
                       layout="wide", initial_sidebar_state="auto")
    keep_keras_state_between_reruns()
    release_ended_sessions()
    session_reaper()
    st.html(CSS)
    user = sign_in()
    navigation(user)
    model_selector()
    user_panel(user)
    st.sidebar.caption(RESEARCH_NOTE)
    collapse_sidebar_when_narrow()
    if admin_only:
        require_admin(page)
    return user


NARROW_PX = 1000
# Streamlit collapses the sidebar at first paint only below 768 px; at 800-1000 px it would take a third
# of the window. Collapse it once per page load (a flag on the page's window; reruns and page changes
# keep it, a reload clears it, so the user can open it again and it stays open). The component's
# iframe is same-origin (Streamlit's sandbox allows it), so it can reach the app's document.
COLLAPSE_JS = """
<script>
const app = window.parent;
if (app.innerWidth < %d && !app.__mammoSidebarAuto) {
  app.__mammoSidebarAuto = true;
  const open = app.document.querySelector('[data-testid="stSidebar"][data-collapsed="false"]');
  const button = app.document.querySelector('[data-testid="stSidebarCollapseButton"] button');
  if (open && button) button.click();
}
</script>
""" % NARROW_PX


def collapse_sidebar_when_narrow() -> None:
    import streamlit.components.v1 as components

    with st.sidebar:
        components.html(COLLAPSE_JS, height=0)


def navigation(user: auth.User) -> None:
    """Links to the pages this user may open (Streamlit's own list of pages/ is turned off in
    .streamlit/config.toml, `client.showSidebarNavigation`, so that readers do not see admin pages)."""
    from streamlit.errors import StreamlitAPIException

    for script, label, icon, admin in PAGES:
        if user.is_admin or not admin:
            try:
                st.sidebar.page_link(script, label=label, icon=icon)
            except StreamlitAPIException:  # a page file run on its own (not through app.py) knows no other page
                return
    st.sidebar.divider()


def weights_root() -> Path:
    return weights_dir()


def usable_models() -> list[registry.ModelEntry]:
    """Trusted model directories (shipped, trained here or confirmed) with a readable card, newest
    first (read fresh: new models appear at once). Unverified folders are listed on Retrain only."""
    return [e for e in registry.list_models(weights_root()) if e.problem is None and e.trusted]


def chosen_model_name() -> str | None:
    """The sidebar's choice, else the active model (weights/ACTIVE), else None (the user picks)."""
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
    if current is None or not (weights_root() / current).is_dir():
        # First run, or the chosen model was removed: the admin's default, never another model.
        current = active
        st.session_state[MODEL_KEY] = current
    labels = {e.name: f"{e.name}{' (active)' if e.name == active else ''} · {protocol_short(e.card)}" for e in entries}
    options = names if current in names or current is None else [current, *names]  # a failing choice stays shown
    labels.setdefault(current, f"{current} (cannot be used)")
    widget = "model_select::" + hashlib.sha1("|".join(labels[n] for n in options).encode()).hexdigest()[:12]
    extra: dict[str, Any] = {}
    if current is None:
        extra["index"] = None  # nothing chosen and no active model: the user picks
    else:
        st.session_state[widget] = current

    def remember() -> None:
        st.session_state[MODEL_KEY] = st.session_state[widget]

    st.sidebar.selectbox("Model", options, key=widget, format_func=lambda n: plain_label(labels[n]),
                         on_change=remember, placeholder="Pick a model", **extra,
                         help="Models in the weights folder, for this session. The Models page changes the "
                              "app's default (the active model).")
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
    """The model the app will use for `name`, checked without loading TensorFlow: (model_dir, card, [])
    when its files check out (sha256 against the card and the manifests) and it is trusted, else
    (None, {}, [why, "pick another model"]). No other model is ever used in its place."""
    root = weights_root()
    if not name:
        return None, {}, ["No active model is set. Pick a model in the sidebar."]
    path = root / name
    card, problem = _verified(str(path), _signature(path))
    if card is None:
        return None, {}, [f"The model {name} cannot be used: {problem}", "Pick another model in the sidebar."]
    if registry.trust_of(name, card, root) == registry.TRUST_UNVERIFIED:
        return None, {}, [f"The model {name} is unverified (not shipped, not trained here); an admin must confirm it "
                          "on the Retrain page before it is used.", "Pick another model in the sidebar."]
    return path, card, []


def settle_after_model_load() -> None:
    """After a model is loaded: hand the loader's freed memory back to the OS, and keep every object
    alive now (TensorFlow, Keras, the model, the plotting modules) out of Python's garbage collector.

    Streamlit runs a full `gc.collect()` after every script run (`runner.postScriptGC`); with
    TensorFlow and the model loaded that walks about 500,000 objects, 0.4-0.8 s on this 2-core machine,
    holding the GIL for every session at once. Frozen (`gc.freeze`), those objects are skipped and the
    collection costs microseconds; what the runs create is still collected. Loading a model also leaves
    about 0.9 GB of freed heap that glibc keeps (`malloc_trim` returns it). `_load_predictor` unfreezes
    before it loads, so a model evicted from the cache earlier can still be collected.
    """
    import gc

    import plotly.graph_objects  # noqa: F401 - the Review page's figure modules, frozen with the rest

    from appkit import plots  # noqa: F401
    from mammo_core.inference import explain  # noqa: F401

    gc.collect()
    gc.freeze()
    release_freed_memory()


@functools.lru_cache(maxsize=1)
def _glibc() -> Any:
    """glibc, opened once (None elsewhere). Not through ctypes.util.find_library, which runs
    `ldconfig -p` in a subprocess: a fork of the 1.7 GB server on every call."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Collect cyclic garbage, then ask glibc to hand freed heap back to the OS (`malloc_trim(0)`).
    Decoding an 80-megapixel upload frees hundreds of MB in the script thread's malloc arena, which glibc
    otherwise keeps for good (measured: 6 such uploads left +350 MB of RSS after their results were
    dropped, +47 MB after a trim). A few milliseconds; ctypes releases the GIL meanwhile. Does nothing
    where the C library is not glibc."""
    import gc

    gc.collect()  # cyclic garbage (Plotly figures) first; cheap once the loaded model is frozen
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def release_ended_sessions() -> int:
    """Shut down the sessions Streamlit has given up on, freeing their uploads and results; returns how many.

    A browser that goes away leaves its session in Streamlit's storage for reconnection
    (`server.disconnectedSessionTTL`, 120 s). When that expires, Streamlit 1.67 drops the entry without
    `AppSession.shutdown()`, so the session's uploaded files stay in the uploaded-file manager for the
    life of the server (and the session with its state until the storage is next written). Called
    from every page run: the sessions past their TTL are shut down here, then the freed heap is
    returned. Private Streamlit API (the version is pinned): a changed Streamlit makes this a no-op.
    """
    from streamlit import runtime

    if not runtime.exists():
        return 0
    manager = getattr(runtime.get_instance(), "_session_mgr", None)
    cache = getattr(getattr(manager, "_session_storage", None), "_cache", None)
    lock = getattr(manager, "_storage_lock", None)
    if lock is None or not callable(getattr(cache, "expire", None)):
        return 0
    with lock:
        expired = cache.expire()
    for _, info in expired:
        info.session.shutdown()
    count = len(expired)
    if count:
        del expired, info  # the last references to those sessions and their state
        release_freed_memory()
    return count


#: Seconds between two checks of the background reaper (`session_reaper`) for sessions past their TTL.
REAP_INTERVAL_S = 30.0


def reap_until(stop: threading.Event, interval: float = REAP_INTERVAL_S) -> None:
    """Call `release_ended_sessions` every `interval` seconds until `stop` is set. An error in one round
    is logged (its type only: no session data) and the next round goes on."""
    import logging

    while not stop.wait(interval):
        try:
            release_ended_sessions()
        except Exception as exc:  # noqa: BLE001 - the reaper must outlive one bad round
            logging.getLogger(__name__).warning("session reaper: %s", type(exc).__name__)


@st.cache_resource(show_spinner=False)
def session_reaper() -> threading.Thread:
    """One daemon thread per server process that frees the sessions Streamlit has given up on even when
    nobody opens a page (page runs also do it, `release_ended_sessions`): memory comes back about
    `server.disconnectedSessionTTL` + `REAP_INTERVAL_S` after the last browser closes."""
    thread = threading.Thread(target=reap_until, args=(threading.Event(),), name="mammo-session-reaper", daemon=True)
    thread.start()
    return thread


@st.cache_resource(show_spinner=False, max_entries=4)
def _load_predictor(name: str, root: str, signature: tuple, tta: str = "none"):  # noqa: ARG001
    """The model `name` as a Predictor, once per process and `tta`. With `tta` other than "none" the
    already loaded model is reused (the plain entry of this cache): only another compiled call is added."""
    # Imported here so that TensorFlow loads only when a page needs the model, not at first paint.
    import gc

    from mammo_core.inference.predict import Predictor

    if tta == "none":
        gc.unfreeze()
        model_dir = Path(root) / name
        model, card = registry.load_model(model_dir)
    else:
        base = _load_predictor(name, root, signature)
        gc.unfreeze()
        model, card, model_dir = base.model, base.card, base.model_dir
    # not frozen: freezing would hold ~0.75 GB more for the server's lifetime for a few ms per upload
    predictor = Predictor(model, card, model_dir, tta=tta, freeze=False)
    predictor.warm_up()
    settle_after_model_load()
    return predictor


def get_predictor(name: str | None, *, tta: str = "none"):
    """(Predictor, warnings) for the chosen model, loaded once per process; `tta="dihedral8"` scores an
    ensemble over its 8 views. Raises ModelDirError saying why when that model cannot be used: the caller
    asks the user to pick another one."""
    path, _, problems = model_in_use(name)
    if path is None:
        raise ModelDirError(" ".join(problems))
    return _load_predictor(path.name, str(weights_root()), _signature(path), tta), []


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


CUSTOM, CARD = -2, -1  # operating-point choices besides the card's named points


def threshold_control(card: dict[str, Any], model_name: str, *, where: str) -> float:
    """Operating-point selectbox (when the card has operating points) and a threshold slider.

    The value is remembered per model across pages; it starts at the card's threshold. The selectbox
    follows the slider: once the slider moves away from a named point it says "Custom". Under it, the
    chosen point's sensitivity and specificity where it was chosen (validation or out-of-fold) and,
    when the card has them, on the test split.
    """
    keep = f"threshold::{model_name}"
    widget = f"threshold_widget::{where}::{model_name}"
    op_key = f"op::{where}::{model_name}"
    default = card_threshold(card)
    st.session_state.setdefault(keep, default)
    st.session_state[widget] = st.session_state[keep]
    points = operating_points(card)

    def matching(value: float) -> int:
        for i, op in enumerate(points):
            if abs(op["threshold"] - value) < 1e-9:
                return i
        return CARD if abs(value - default) < 1e-9 else CUSTOM

    def remember() -> None:
        st.session_state[keep] = st.session_state[widget]

    if points:
        options = [CARD, *range(len(points)), CUSTOM]
        st.session_state[op_key] = matching(st.session_state[keep])

        def describe(i: int) -> str:
            if i == CARD:
                return f"Card threshold ({default:.2f})"
            if i == CUSTOM:
                return f"Custom ({st.session_state[keep]:.2f}, set with the slider)"
            return f"{points[i]['name']} ({points[i]['threshold']:.2f})"

        def apply_point() -> None:
            i = st.session_state[op_key]
            if i == CUSTOM:
                return
            st.session_state[keep] = default if i is None or i == CARD else points[i]["threshold"]
            st.session_state[widget] = st.session_state[keep]

        st.selectbox("Operating point", options, format_func=describe, key=op_key, on_change=apply_point,
                     help="Named thresholds from the model card; 'Custom' once the slider has moved.")
        chosen = st.session_state[op_key]
        if chosen >= 0:
            st.caption(cards.operating_point_text(points[chosen]))
    st.slider("Decision threshold (malignant when probability ≥ threshold)", 0.0, 1.0, step=0.01,
              key=widget, on_change=remember)
    return float(st.session_state[keep])


protocol_short = cards.protocol_short
fmt = cards.fmt
created_date = cards.created_date


def evaluation_note(card: dict[str, Any]) -> None:
    """The card's evaluation note: a warning banner for the leaky paper split, info otherwise."""
    note = (card.get("evaluation") or {}).get("note")
    if cards.is_leaky(card):
        st.warning(LEAKY_BANNER + (f" {note}" if note else ""), icon=":material/warning:")
    elif note:
        st.info(note, icon=":material/info:")


LEAKY_BANNER = ("**Paper split (leaky): these numbers measure memorised copies.** Every test mammogram of this "
                "model has augmented copies in its training set, so its scores say how well it recognises images it "
                "has seen, not how it does on a new mammogram.")


def honest_headline(card: dict[str, Any]) -> None:
    """The numbers to trust first: cross-validated AUC with its 95 % interval, by source image and by
    patient, with the single split beside them (or why there is none)."""
    cv = cards.cross_validated(card)
    single = cards.single_split(card)
    cols = st.columns(3)
    for col, key in zip(cols, cards.CV_KEYS):
        by = cards.CV_KEYS[key]
        if key in cv:
            v = cv[key]
            col.metric(f"Cross-validated AUC, by {by}", v["text"],
                       help=f"Pooled out-of-fold AUC of {v['k'] or '?'}-fold cross-validation grouped by {by} "
                            f"({v['n_groups'] or '?'} groups), with its 95 % bootstrap interval resampling "
                            f"{by}s. Estimates performance on mammograms the model has never seen.")
        else:
            col.metric(f"Cross-validated AUC, by {by}", "—", help=f"This model's card has no cross-validation grouped by {by}.")
    if single is not None:
        cols[2].metric("Single split: test AUC", single["text"],
                       help=f"One split ({single['label']}), {single['n'] or '?'} test images."
                            + (" Leaky: inflated by memorised copies." if cards.is_leaky(card) else
                               " Rests on few source images: see the interval of the cross-validation."))
    else:
        cols[2].metric("Single split", "none", help="Trained by cross-validation: every image was scored out-of-fold "
                                                    "by the member that never saw it; there is no separate test split.")


def show_warnings(warnings: list[str]) -> None:
    if warnings:
        st.warning(plain(" ".join(warnings)), icon=":material/warning:")


# --- making a model the app's default ------------------------------------------------------------------

ACTIVATE_ERROR = "activate_error"


def make_active(name: str, confirm: bool = False) -> None:
    """Button callback: make `name` the app's default and this session's choice (admins only);
    `confirm` records the admin's confirmation of an unverified model. An error is kept for the page."""
    user = current_user()
    if not user.is_admin:
        return
    try:
        registry.set_active_model(name, weights_root(), confirmed_by=user.name if confirm else None)
    except ModelDirError as exc:
        st.session_state[ACTIVATE_ERROR] = str(exc)
        return
    except OSError as exc:
        st.session_state[ACTIVATE_ERROR] = storage_error_message(exc, "the active-model marker")
        return
    choose_model(name)


def show_activate_error() -> None:
    if err := st.session_state.pop(ACTIVATE_ERROR, None):
        st.error(f"Could not make the model active: {plain(err)}")


def activate_control(name: str, card: dict[str, Any], *, where: str) -> bool:
    """'Make active' for `name`: its honest numbers beside the active model's, and a confirmation when
    it is worse or was evaluated on the leaky paper split. Returns True when `name` is already active."""
    root = weights_root()
    active = registry.active_model_name(root)
    if active == name:
        st.success(f"{plain(name)} is the active model (the app's default).", icon=":material/check_circle:")
        return True
    active_card = None
    if active:
        try:
            active_card = read_card(root / active)
        except ModelDirError:
            active_card = None
    concerns = cards.activation_concerns(card, active_card, active)
    mine, theirs = cards.cross_validated(card), cards.cross_validated(active_card or {})
    lines = []
    for key, by in cards.CV_KEYS.items():
        lines.append(f"cross-validated AUC by {by}: {plain(name)} {mine.get(key, {}).get('text', '—')}"
                     + (f", active {plain(active)} {theirs.get(key, {}).get('text', '—')}" if active_card else ""))
    st.caption(" · ".join(lines))
    confirmed = True
    if concerns:
        st.warning(f"Before making {plain(name)} the app's default: " + "; ".join(plain(c) for c in concerns) + ".",
                   icon=":material/warning:")
        confirmed = st.checkbox(f"Make {plain(name)} the default anyway", key=f"{where}_confirm_worse::{name}")
    st.button(f"Make {plain(name)} the active model", key=f"{where}_activate::{name}", on_click=make_active,
              args=(name,), type="primary", disabled=not confirmed,
              help=f"The app's default model becomes {plain(name)}; {plain(active or 'the previous one')} stays on disk.")
    return False


# --- user strings are data, not markup ---------------------------------------------------------------

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]!<>#|~$:&@{}])")  # inline markup, HTML, LaTeX, directives, autolinks


def plain(text: Any) -> str:
    """`text` escaped so that Streamlit's Markdown shows it literally.

    Every character that can start inline markup anywhere in a line (emphasis, code, links and
    images, HTML, LaTeX `$`, Streamlit's `:red[..]` / `:material/..:` directives, autolinks,
    tables, strikethrough) gets a backslash, as do a leading block marker (`- `, `+ `, `1. `) and the
    dot of `www.`; newlines become spaces. Characters harmless in running text (`-`, `.`, `(`) are
    left as they are, so `scan-1.png` reads the same in the page source. Use it for every file name,
    model name, folder or message that a user or a file supplies, wherever Markdown is rendered
    (st.markdown, st.error/warning/info, st.subheader, captions).
    """
    text = _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))
    text = re.sub(r"(?i)\b(www)\.", r"\1\\.", text)
    text = re.sub(r"^(\d+)([.)])", r"\1\\\2", text)
    return "\\" + text if text[:1] in ("-", "+", "=") else text


def upload_name(name: str) -> str:
    """An uploaded file's name as the app shows it, exports it (worklist CSV) and logs it: patient
    identifiers masked (`mammo_core.store.audit.mask_file_name`: digit runs and name-like letter runs), unless
    the site keeps file names (`MAMMO_AUDIT_KEEP_FILE_NAMES=1`, the audit log's own switch)."""
    from mammo_core.store.audit import keep_file_names_default, mask_file_name

    return name if keep_file_names_default() else mask_file_name(name)


def plain_label(text: Any) -> str:
    """Widget option labels are plain text already; only collapse whitespace."""
    return " ".join(str(text).split())


# --- images kept in the session -----------------------------------------------------------------------


def for_session(pred: Any) -> Any:
    """Shrink a Prediction's decoded image to display size (plots.DISPLAY_MAX_SIDE) before it is kept
    in session state; the full-size pixels are only needed while scoring."""
    from appkit.plots import DISPLAY_MAX_SIDE, fit_for_display

    image = getattr(pred, "image", None)
    if image is not None and max(image.pixels.shape[:2]) > DISPLAY_MAX_SIDE:
        image.pixels = fit_for_display(image.pixels, DISPLAY_MAX_SIDE)
    return pred


def drop_uploaded_files(files: list[Any]) -> int:
    """Free the server's copy of uploaded files once they are scored; returns how many were dropped.

    Streamlit keeps an uploader's bytes in memory until the user removes the file in the browser or the
    session ends (4 sessions x 10 large PNGs: ~190 MB). Review keeps only display-size results, so it
    drops the bytes as `st.chat_input` does with its own files (the same call, the same manager check).
    """
    from streamlit.runtime.memory_uploaded_file_manager import MemoryUploadedFileManager
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    if ctx is None or not isinstance(ctx.uploaded_file_mgr, MemoryUploadedFileManager):
        return 0
    for f in files:
        ctx.uploaded_file_mgr.remove_file(session_id=ctx.session_id, file_id=f.file_id)
    return len(files)


# --- sign-in and roles --------------------------------------------------------------------------------


def _secrets() -> dict[str, Any]:
    try:
        return st.secrets.to_dict()
    except Exception:  # noqa: BLE001 - no secrets.toml at all is the usual case
        return {}


def sign_in() -> auth.User:
    """The signed-in user, or stop the script after drawing the sign-in.

    Local mode (loopback address, no login configured, MAMMO_NETWORK unset): the OS user, admin.
    A users file (MAMMO_AUTH_FILE): the password form. [auth] + [mammo_roles] in secrets.toml:
    st.login. Shared (network address or MAMMO_NETWORK) without any login configured: refused.
    """
    secrets = _secrets()
    try:
        method = auth.login_method(secrets)
    except auth.AuthConfigError as exc:
        st.error(f"The login configuration is unusable, so the app will not start: {plain(exc)}",
                 icon=":material/lock:")
        st.stop()
    if method is None:
        address = st.get_option("server.address")
        if auth.network_requested() or not auth.is_loopback(address):
            st.error("This app is reachable from the network but no login is configured, so it refuses to run. "
                     "Serve it on 127.0.0.1 (make run) or configure a login (docs/DEPLOYMENT.md).",
                     icon=":material/lock:")
            st.stop()
        user = auth.local_user()
    elif method == "oidc":
        user = _oidc_user(secrets)
    else:
        user = _password_user()
    st.session_state[USER_KEY] = user
    return user


def _password_user() -> auth.User:
    users = auth.load_users(auth.users_file())  # re-read each run: a removed user or changed role applies at once
    user = st.session_state.get(USER_KEY)
    if isinstance(user, auth.User) and user.method == "password" and user.name in users:
        return auth.User(user.name, users[user.name]["role"], "password")
    st.session_state.pop(USER_KEY, None)
    st.title("Sign in")
    with st.form("login_form"):
        name = st.text_input("User name", key="login_user", autocomplete="username")
        password = st.text_input("Password", type="password", key="login_password", autocomplete="current-password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if submitted:
        user = auth.check_password(users, name, password)
        if user is not None:
            st.session_state[USER_KEY] = user
            st.rerun()
        st.error("Wrong user name or password (after 5 failures a name is locked for 5 minutes).")
    st.stop()


def _oidc_user(secrets: dict[str, Any]) -> auth.User:
    if not st.user.get("is_logged_in"):
        st.title("Sign in")
        providers = [k for k, v in (secrets.get("auth") or {}).items() if isinstance(v, dict)]
        for provider in providers or [None]:
            st.button(f"Sign in with {provider}" if provider else "Sign in with your organisation's account",
                      key=f"login_{provider}", type="primary", on_click=st.login,
                      args=(provider,) if provider else ())
        st.stop()
    email = st.user.get("email")
    role = auth.oidc_role(email, secrets.get(auth.ROLES_SECTION) or {})
    if role is None:
        st.error(f"The account {plain(email or 'without an e-mail address')} is not allowed to use this app. "
                 "Ask an administrator to add it to [mammo_roles].", icon=":material/lock:")
        st.button("Sign out", on_click=st.logout)
        st.stop()
    return auth.User(name=str(email), role=role, method="oidc")


def current_user() -> auth.User:
    """The user `setup()` signed in for this run."""
    user = st.session_state.get(USER_KEY)
    if not isinstance(user, auth.User):
        st.error("Not signed in.")
        st.stop()
    return user


def require_admin(what: str) -> auth.User:
    """Stop the page unless the signed-in user is an admin (defence in depth: the navigation already
    leaves admin pages out of a reader's sidebar, but a page URL can be opened directly)."""
    user = current_user()
    if not user.is_admin:
        st.error(f"The {what} page is for administrators; you are signed in as a reader.", icon=":material/lock:")
        st.stop()
    return user


def sign_out() -> None:
    user = st.session_state.pop(USER_KEY, None)
    for key in ("review_predictions", "review_audited"):  # the session's images and results go with the user
        st.session_state.pop(key, None)
    if isinstance(user, auth.User) and user.method == "oidc":
        st.logout()


def user_panel(user: auth.User) -> None:
    """Sidebar: who is signed in, as what, and a sign-out button (not in local mode)."""
    if user.method == "local":
        st.sidebar.caption(f"Local mode (this machine only) · {plain(user.name)} · admin")
        return
    st.sidebar.caption(f"Signed in as {plain(user.name)} · {user.role}")
    st.sidebar.button("Sign out", key="sign_out", on_click=sign_out)


def audit_view(log: Any) -> Any:
    """The audit log as the signed-in user may use it: admins every row, readers their own."""
    user = current_user()
    return log.scoped(user.name, all_users=user.is_admin)
