"""Retrain page (admins only): start a training run in a background process, follow it live, cancel
it, make the new model the app's default, and confirm hand-dropped (unverified) models. Runs survive
a page reload (see mammo_core.jobs). Training data comes only from the configured roots
(MAMMO_DATA_ROOTS); every user-supplied string is shown as plain text."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import streamlit as st

from mammo_core import jobs, plots, registry
from mammo_core.config import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_SEED, data_dir
from mammo_core.data import GROUP_BY, PROTOCOLS
from mammo_core.errors import MammoError
from mammo_core.fast_training import PRECISIONS
from mammo_core.model import ARCHITECTURES
from mammo_core.train import training_in_progress
from app_pages import _shared as shared

PROTOCOL_HELP = {
    "grouped": "grouped: pool all images and re-split 50/25/25 so each source image (or patient) is on one side only (honest)",
    "paper": "paper: use the dataset's train/val/test folders as given (copies of each mammogram on every side: leaky)",
}
STATE_TEXT = {"starting": "Preparing: reading and decoding the dataset…", "running": "Training",
              "finished": "Finished", "failed": "Failed", "cancelled": "Cancelled",
              "died": "Stopped unexpectedly"}


def start_form() -> None:
    from mammo_core.train import TrainConfig

    st.session_state.setdefault("retrain_name", f"model-{dt.datetime.now():%Y%m%d-%H%M}")
    with st.form("train_form"):
        roots = ", ".join(str(r) for r in jobs.data_roots()) or "none configured (set MAMMO_DATA_ROOTS)"
        folder = st.text_input("Dataset folder", value=str(data_dir() or ""), key="retrain_data",
                               help="Class folders (benign/, malignant/) or split folders (train/, val/, test/) "
                                    f"holding them, inside a training data folder of this server: {roots}. "
                                    "Defaults to $MAMMO_DATA_DIR.")
        c1, c2, c3 = st.columns(3)
        protocol = c1.selectbox("Split protocol", PROTOCOLS, index=PROTOCOLS.index("grouped"), key="retrain_protocol",
                                format_func=lambda p: PROTOCOL_HELP.get(p, p).split(":")[0])
        group_by = c2.selectbox("Group by (grouped protocol)", GROUP_BY, key="retrain_group_by",
                                help="source: every augmented copy of a mammogram stays together; patient: every "
                                     "mammogram of a patient (needs the dataset's patients.csv).")
        arch_names = sorted(ARCHITECTURES)
        arch = c3.selectbox("Architecture", arch_names, key="retrain_arch",
                            index=arch_names.index("paper-cnn") if "paper-cnn" in arch_names else 0,
                            help="; ".join(f"{a.name}: {a.description}" for a in ARCHITECTURES.values()))
        c4, c5, c6, c7 = st.columns(4)
        epochs = c4.number_input("Epochs", 1, 500, DEFAULT_EPOCHS, key="retrain_epochs")
        batch = c5.number_input("Batch size", 1, 1024, DEFAULT_BATCH_SIZE, key="retrain_batch")
        seed = c6.number_input("Seed", 0, 2**31 - 1, DEFAULT_SEED, key="retrain_seed")
        precision = c7.selectbox("Arithmetic (paper-cnn)", PRECISIONS, key="retrain_precision",
                                 help="auto: bfloat16 convolutions on a CPU with native bfloat16 (about 2x faster "
                                      "training, same network), else float32. Other architectures always train in "
                                      "float32, and prediction always runs in float32.")
        name = st.text_input("Model name (a new folder under weights/; never overwrites one)", key="retrain_name")
        st.caption(PROTOCOL_HELP["grouped"] + ". " + PROTOCOL_HELP["paper"] + ".")
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
        st.error(f"Training not started: {shared.plain(registry.storage_error_message(exc, 'the run'))}")
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
                run = jobs.cancel(run)
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


def show_progress(run: jobs.Run) -> None:
    p = run.progress
    if run.state == "starting":
        st.progress(0.0, text=STATE_TEXT["starting"])
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
        card = registry.read_card(root / name)
    except MammoError as exc:
        st.error(f"The run finished but its model cannot be read: {shared.plain(exc)}")
        return
    test = (card.get("metrics") or {}).get("test") or {}
    cols = st.columns(5)
    for col, (label, key) in zip(cols, [("Test accuracy", "accuracy"), ("Test AUC", "auc"), ("Test loss", "loss"),
                                        ("Sensitivity", "sensitivity"), ("Specificity", "specificity")]):
        col.metric(label, shared.fmt(test.get(key)))
    st.caption(f"{card.get('architecture', '?')} · {shared.protocol_short(card)} · "
               f"{(card.get('training') or {}).get('epochs', '?')} epoch(s) · threshold {shared.card_threshold(card):.2f}")
    shared.evaluation_note(card)
    rows = jobs.history_rows(run)
    if rows:
        st.plotly_chart(plots.history_figure(rows), key="retrain_final_curves")
    active = registry.active_model_name(root)
    try:
        pinned = (root / registry.ACTIVE_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        pinned = None
    if pinned == name and shared.chosen_model_name() == name:
        st.success(f"{shared.plain(name)} is the active model (the app's default).")
    else:
        st.button(f"Make {shared.plain(name)} the active model", key=f"activate_{name}", on_click=make_active, args=(name,),
                  type="primary", help=f"The app's default model becomes {shared.plain(name)}; "
                                       f"{shared.plain(active or 'the previous one')} stays on disk.")
    with st.expander("Model card"):
        st.json(card, expanded=False)


def make_active(name: str, confirm: bool = False) -> None:
    """Make `name` the default; `confirm` records the admin's confirmation of an unverified model."""
    user = shared.current_user()
    if not user.is_admin:
        return
    try:
        registry.set_active_model(name, shared.weights_root(), confirmed_by=user.name if confirm else None)
    except MammoError as exc:
        st.session_state["retrain_activate_error"] = str(exc)
        return
    except OSError as exc:
        st.session_state["retrain_activate_error"] = registry.storage_error_message(exc, "the active-model marker")
        return
    shared.choose_model(name)
    st.rerun()  # the button sits in a fragment: escalate to a full-app rerun so the sidebar follows


def models_on_disk() -> None:
    root = shared.weights_root()
    entries = registry.list_models(root)
    if not entries:
        return
    active = registry.active_model_name(root)
    with st.expander(f"Models on disk ({len(entries)})"):
        st.dataframe(pd.DataFrame([{
            "model": e.name, "active": "✓" if e.name == active else "", "created": e.created[:19].replace("T", " "),
            "architecture": e.card.get("architecture"), "split": shared.protocol_short(e.card) if e.card else "",
            "test AUC": ((e.card.get("metrics") or {}).get("test") or {}).get("auc"), "trust": e.trust,
            "problem": e.problem or ""} for e in entries]), hide_index=True)
    unverified = [e for e in entries if e.problem is None and not e.trusted]
    if unverified:
        st.warning(f"{len(unverified)} model folder(s) were not shipped with the app nor trained here (for example "
                   "copied in by hand). They are not offered for scoring until an administrator confirms them.",
                   icon=":material/gpp_maybe:")
        pick = st.selectbox("Unverified model", [e.name for e in unverified], key="retrain_unverified")
        if st.checkbox(f"I confirm that {shared.plain(pick)} comes from a trusted source and may become the app's default model",
                       key=f"retrain_confirm::{pick}"):
            st.button(f"Confirm {shared.plain(pick)} and make it active", key=f"confirm_{pick}", on_click=make_active,
                      args=(pick, True))
    runs = jobs.list_runs(root)
    if runs:
        with st.expander(f"Training runs ({len(runs)})"):
            st.dataframe(pd.DataFrame([{"run": r.run_id, "model": r.model, "state": r.state,
                                        "started": r.started.replace("T", " ")[:19],
                                        "note": r.error or ""} for r in runs]), hide_index=True)


def main() -> None:
    shared.require_admin("Retraining")
    st.title("Retrain")
    st.caption("Training runs in a separate process: this page stays usable, and a reload or another tab "
               "finds the run again. One training at a time; existing models are never overwritten.")
    if err := st.session_state.pop("retrain_activate_error", None):
        st.error(f"Could not make the model active: {shared.plain(err)}")
    latest = jobs.current_run(shared.weights_root())
    if latest is not None and not latest.active and st.session_state.get("retrain_watching") == latest.run_id:
        del st.session_state["retrain_watching"]  # this full run shows the run's end (see live_status)
    start_form()
    st.subheader("Current run")
    live_status()
    models_on_disk()


main()
