"""Retrain page (admins only): start a training run in a background process, follow it live (epochs, or
the phase for the cross-validated ensemble, which has no per-epoch progress), cancel it within seconds,
and make the new model the app's default (with the Models page's confirmation when it is worse). The
form defaults to the recommended honest recipe and remembers the last run's settings. Runs survive a
page reload (see mammo_core.store.jobs). Training data comes only from the configured roots
(MAMMO_DATA_ROOTS); every user-supplied string is shown as plain text."""

from __future__ import annotations

import contextlib
import datetime as dt
import re

import pandas as pd
import streamlit as st

from mammo_core.store import jobs
from appkit import plots
from mammo_core.config import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_SEED, data_dir
from mammo_core.data.splits import GROUP_BY, PROTOCOLS
from mammo_core.errors import MammoError
from mammo_core.models.architectures import ARCHITECTURES
from mammo_core.models.fast_training import PRECISIONS
from mammo_core.store.run_safety import training_in_progress

from appkit import cards, shared
from mammo_core.store.card import read_card
from mammo_core.store.files import storage_error_message

shared.setup("Retrain", admin_only=True)

#: The recommended honest recipe: the fine-tuned ensemble, trained by 5-fold grouped cross-validation.
RECOMMENDED_ARCH = "efficientnet-lite0-ft"
CANCEL_WAIT_S = 3.0  # SIGTERM, then SIGKILL after this: a killed run leaves only a hidden temporary folder

PROTOCOL_HELP = {
    "grouped": "grouped: pool all images and re-split 50/25/25 so each source image (or patient) is on one side only (honest)",
    "paper": "paper: use the dataset's train/val/test folders as given (copies of each mammogram on every side: leaky)",
}
STATE_TEXT = {"starting": "Preparing: reading and decoding the dataset…", "running": "Training",
              "finished": "Finished", "failed": "Failed", "cancelled": "Cancelled",
              "died": "Stopped unexpectedly"}


def last_settings() -> dict:
    """The settings of the newest run started here (the form's defaults after a reload), or {}."""
    run = jobs.current_run(shared.weights_root())
    return dict(run.config) if run is not None else {}


def remembered_defaults() -> None:
    """Fill the form's widgets once per session: the last run's settings, else the recommended recipe."""
    if st.session_state.get("retrain_defaults_set"):
        return
    last = last_settings()
    arch_names = sorted(ARCHITECTURES)
    arch = last.get("architecture")
    defaults = {
        "retrain_data": last.get("data_dir") or str(data_dir() or ""),
        "retrain_protocol": last.get("protocol") if last.get("protocol") in PROTOCOLS else "grouped",
        "retrain_group_by": last.get("group_by") if last.get("group_by") in GROUP_BY else GROUP_BY[0],
        "retrain_arch": arch if arch in arch_names else (RECOMMENDED_ARCH if RECOMMENDED_ARCH in arch_names else arch_names[0]),
        "retrain_epochs": int(last.get("epochs") or DEFAULT_EPOCHS),
        "retrain_batch": int(last.get("batch_size") or DEFAULT_BATCH_SIZE),
        "retrain_seed": int(last.get("seed") if last.get("seed") is not None else DEFAULT_SEED),
        "retrain_precision": last.get("precision") if last.get("precision") in PRECISIONS else "auto",
    }
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)
    st.session_state["retrain_defaults_set"] = True


def start_form() -> None:
    from mammo_core.training.train import TrainConfig

    st.session_state.setdefault("retrain_name", f"model-{dt.datetime.now():%Y%m%d-%H%M}")
    remembered_defaults()
    if st.session_state.get("retrain_arch") != RECOMMENDED_ARCH and RECOMMENDED_ARCH in ARCHITECTURES:
        st.button(f"Use the recommended recipe ({RECOMMENDED_ARCH})", key="retrain_recommended",
                  on_click=lambda: st.session_state.update(retrain_arch=RECOMMENDED_ARCH, retrain_protocol="grouped"))
    with st.form("train_form"):
        roots = ", ".join(str(r) for r in jobs.data_roots()) or "none configured (set MAMMO_DATA_ROOTS)"
        folder = st.text_input("Dataset folder", key="retrain_data",
                               help="Class folders (benign/, malignant/) or split folders (train/, val/, test/) "
                                    f"holding them, inside a training data folder of this server: {roots}. "
                                    "Defaults to $MAMMO_DATA_DIR.")
        c1, c2, c3 = st.columns(3)
        protocol = c1.selectbox("Split protocol", PROTOCOLS, key="retrain_protocol",
                                format_func=lambda p: PROTOCOL_HELP.get(p, p).split(":")[0])
        group_by = c2.selectbox("Group by (grouped protocol)", GROUP_BY, key="retrain_group_by",
                                help="source: every augmented copy of a mammogram stays together; patient: every "
                                     "mammogram of a patient (needs the dataset's patients.csv).")
        arch_names = sorted(ARCHITECTURES)
        arch = c3.selectbox("Architecture", arch_names, key="retrain_arch",
                            format_func=lambda a: a + (" (recommended)" if a == RECOMMENDED_ARCH else ""),
                            help="; ".join(f"{a.name}: {a.description}" for a in ARCHITECTURES.values()))
        c4, c5, c6, c7 = st.columns(4)
        epochs = c4.number_input("Epochs", 1, 500, key="retrain_epochs",
                                 help=f"Not used by {RECOMMENDED_ARCH}: its recipe picks each member's epoch itself.")
        batch = c5.number_input("Batch size", 1, 1024, key="retrain_batch")
        seed = c6.number_input("Seed", 0, 2**31 - 1, key="retrain_seed")
        precision = c7.selectbox("Arithmetic (paper-cnn)", PRECISIONS, key="retrain_precision",
                                 help="auto: bfloat16 convolutions on a CPU with native bfloat16 (about 2x faster "
                                      "training, same network), else float32. Other architectures always train in "
                                      "float32, and prediction always runs in float32.")
        name = st.text_input("Model name (a new folder under weights/; never overwrites one)", key="retrain_name")
        st.caption(f"**{RECOMMENDED_ARCH}** (recommended) trains by 5-fold cross-validation grouped by the 'Group by' "
                   "choice; the split protocol does not apply to it, and the model is the ensemble of the five fold "
                   "models, with out-of-fold metrics. It takes long on a CPU. " + PROTOCOL_HELP["grouped"] + ". "
                   + PROTOCOL_HELP["paper"] + ".")
        submitted = st.form_submit_button("Start training", type="primary")
    if not submitted:
        return
    if not folder.strip():
        st.error("Enter the dataset folder (or set MAMMO_DATA_DIR).")
        return
    config = TrainConfig(data_dir=folder.strip(), name=name.strip(), architecture=arch, protocol=protocol,
                         group_by=group_by, epochs=int(epochs), batch_size=int(batch), seed=int(seed),
                         precision=precision)
    try:
        run = jobs.start_training(config, shared.weights_root())
    except OSError as exc:  # disk full, read-only weights folder
        st.error(f"Training not started: {shared.plain(storage_error_message(exc, 'the run'))}")
        return
    except (MammoError, ValueError, FileExistsError) as exc:
        st.error(f"Training not started: {shared.plain(exc)}")
        return
    st.session_state["retrain_watching"] = run.run_id
    st.success(f"Training of **{shared.plain(run.model)}** started in the background. You can leave this page; "
               "come back to follow it.")


@st.fragment(run_every=2)
def live_status() -> None:
    root = shared.weights_root()
    run = jobs.current_run(root)
    if (run is None or not run.active) and training_in_progress(root):
        st.info("A training started outside the app (e.g. from the command line) holds the training lock; "
                "a new run can start when it ends.", icon=":material/hourglass_top:")
    if run is None:
        st.caption("No training run started from the app yet.")
        return
    st.markdown(f"**{shared.plain(run.model)}** · run {shared.plain(run.run_id)} · started {run.started.replace('T', ' ')[:19]} UTC · "
                f"**{STATE_TEXT.get(run.state, run.state)}**")
    if run.active:
        st.session_state["retrain_watching"] = run.run_id
        show_progress(run)
        if st.button("Cancel training", key=f"cancel_{run.run_id}"):
            with st.spinner("Cancelling…"):
                run = jobs.cancel(run, timeout=CANCEL_WAIT_S)
            st.warning(f"Training of {shared.plain(run.model)} cancelled; no model was written.")
        return
    if st.session_state.get("retrain_watching") == run.run_id:
        # A run seen running in this session just ended: rerun the whole app so that the sidebar lists
        # the new model. main() clears the flag on that full run; until then every tick asks again.
        st.rerun(scope="app")
    if run.state == "finished":
        show_finished(run)
    elif run.state == "cancelled":
        st.info(f"Training of {shared.plain(run.model)} was cancelled; no model was written.")
    else:
        st.error(f"Training of {shared.plain(run.model)} did not finish: {shared.plain(run.error)}")
        with st.expander("Log (last lines)"):
            st.code(jobs.log_tail(run, lines=30) or "(empty)")


PHASES = [  # (text in the run's log, what the page says): the last one found is the current phase
    ("decoding", "Preparing: reading and decoding the dataset…"),
    ("trunk activations", "Computing the backbone's activations (cached for every fold)…"),
    ("member ", "Cross-validation: fitting the fold models…"),
    ("fold ", "Cross-validation: fitting and scoring the fold models…"),
    ("out-of-fold", "Writing the ensemble, its card and out-of-fold predictions…"),
    ("test:", "Saving the model…"),
]


def phase(run: jobs.Run) -> str:
    """What the run is doing now, in words, from its progress and its log: the ensemble recipe writes no
    per-epoch progress, and after the last epoch a run still evaluates, calibrates and saves."""
    p = run.progress
    if run.state == "running" and p.get("epochs") and int(p.get("epoch") or 0) >= int(p["epochs"]) \
            and len(p.get("history") or []) >= int(p["epochs"]):
        return "Evaluating on the test split, calibrating and saving the model…"
    tail = jobs.log_tail(run, lines=40).lower()
    found, where = STATE_TEXT["starting"], -1
    for needle, text in PHASES:
        at = tail.rfind(needle)
        if at > where:
            found, where = text, at
    if (m := re.findall(r"fold (\d+)", tail)) and "Cross-validation" in found:
        k = int((run.config or {}).get("folds") or 5)
        found += f" (fold {int(m[-1]) + 1} of {k})"
    return found


def show_progress(run: jobs.Run) -> None:
    p = run.progress
    elapsed = ""
    with contextlib.suppress(ValueError):
        seconds = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(run.started)).total_seconds()
        elapsed = f" · {seconds / 60:.0f} min elapsed" if seconds >= 60 else f" · {seconds:.0f} s elapsed"
    if run.state == "starting" or not p.get("epochs"):
        st.progress(0.0 if run.state == "starting" and not p else 0.5, text=phase(run) + elapsed)
        st.caption("This recipe reports phases, not epochs." if (run.config or {}).get("architecture") == RECOMMENDED_ARCH
                   else "")
        return
    if (text := phase(run)).startswith("Evaluating"):
        st.progress(1.0, text=text + elapsed)
        return
    logs = p.get("logs") or {}
    metrics = " · ".join(f"{k} {v:.3f}" for k, v in logs.items() if k in ("loss", "accuracy"))
    st.progress(run.fraction_done(), text=f"Epoch {p.get('epoch', '?')}/{p.get('epochs', '?')}, step "
                f"{p.get('step', '?')}/{p.get('steps', '?')} · {p.get('elapsed_s', 0):.0f} s{' · ' + metrics if metrics else ''}")
    rows = jobs.history_rows(run)
    if rows or logs:
        st.plotly_chart(plots.history_figure(rows, current={"epoch": p.get("epoch"), "logs": logs}),
                        key="retrain_curves")


def show_finished(run: jobs.Run) -> None:
    root = shared.weights_root()
    name = run.progress.get("model", run.model)
    try:
        card = read_card(root / name)
    except MammoError as exc:
        st.error(f"The run finished but its model cannot be read: {shared.plain(exc)}")
        return
    test = (card.get("metrics") or {}).get("test") or {}
    where = cards.test_label(card).capitalize()
    cols = st.columns(5)
    for col, (label, key) in zip(cols, [(f"{where} accuracy", "accuracy"), (f"{where} AUC", "auc"), (f"{where} loss", "loss"),
                                        ("Sensitivity", "sensitivity"), ("Specificity", "specificity")]):
        col.metric(label, shared.fmt(test.get(key)))
    st.caption(f"{card.get('architecture', '?')} · {shared.protocol_short(card)} · "
               f"{(card.get('training') or {}).get('epochs', '?')} epoch(s) · threshold {shared.card_threshold(card):.2f}")
    shared.evaluation_note(card)
    rows = jobs.history_rows(run)
    if rows and not cards.is_cross_validated(card):
        st.plotly_chart(plots.history_figure(rows), key="retrain_final_curves")
    if (root / name).is_dir():
        shared.activate_control(name, card, where="retrain")
    with st.expander("Model card"):
        st.json(card, expanded=False)


def runs_list() -> None:
    runs = jobs.list_runs(shared.weights_root())
    if runs:
        with st.expander(f"Training runs ({len(runs)})"):
            st.dataframe(pd.DataFrame([{"run": r.run_id, "model": r.model, "state": r.state,
                                        "architecture": (r.config or {}).get("architecture", ""),
                                        "started": r.started.replace("T", " ")[:19],
                                        "note": r.error or ""} for r in runs]), hide_index=True)


def main() -> None:
    st.title("Retrain")
    st.caption("Training runs in a separate process: this page stays usable, and a reload or another tab "
               "finds the run again. One training at a time; existing models are never overwritten. The Models "
               "page lists every model and makes one the app's default.")
    shared.show_activate_error()
    latest = jobs.current_run(shared.weights_root())
    if latest is not None and not latest.active and st.session_state.get("retrain_watching") == latest.run_id:
        del st.session_state["retrain_watching"]  # this full run shows the run's end (see live_status)
    start_form()
    st.subheader("Current run")
    live_status()
    runs_list()


main()
