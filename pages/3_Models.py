"""Models page: every model in the weights folder with its card summary (how it was evaluated, its
cross-validated AUC with the interval by source image and by patient, created, verified or not); for
admins, make one the app's default (with a confirmation when its honest numbers are worse than the
active model's or it was evaluated on the leaky paper split), confirm hand-dropped models, and delete
models trained here (shipped models, pinned in weights/MANIFEST.json, cannot be deleted). Compare puts
the cards of several models side by side. Reads cards only: no TensorFlow."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from appkit import cards, shared
from mammo_core.errors import ModelDirError
from mammo_core.store import registry
from mammo_core.store.files import storage_error_message

user = shared.setup("Models")

DELETE_MESSAGE = "models_delete_message"
VERIFIED = {registry.TRUST_SHIPPED: "verified (shipped)", registry.TRUST_TRAINED: "verified (trained here)",
            registry.TRUST_CONFIRMED: "verified (confirmed by an admin)", registry.TRUST_UNVERIFIED: "unverified"}


def summary(entry: registry.ModelEntry, active: str | None) -> dict[str, Any]:
    card = entry.card
    cv = cards.cross_validated(card)
    single = cards.single_split(card) if card else None
    return {
        "model": entry.name + (" (active)" if entry.name == active else ""),
        "evaluated by": cards.protocol_short(card) if card else "—",
        "CV AUC by source image [95 % CI]": cv.get("cross_validation", {}).get("text", "—"),
        "CV AUC by patient [95 % CI]": cv.get("cross_validation_patient", {}).get("text", "—"),
        "single split test AUC": (single["text"] if single else "none (cross-validated)") if card else "—",
        "architecture": card.get("architecture", "—"),
        "created": cards.created_date(card) if card else "—",
        "status": entry.problem and f"unreadable: {entry.problem}" or VERIFIED.get(entry.trust, entry.trust),
    }


def delete(name: str) -> None:
    try:
        registry.delete_model(name, shared.weights_root())
    except ModelDirError as exc:
        st.session_state[DELETE_MESSAGE] = ("error", str(exc))
        return
    except OSError as exc:
        st.session_state[DELETE_MESSAGE] = ("error", storage_error_message(exc, "the deletion"))
        return
    if st.session_state.get(shared.MODEL_KEY) == name:
        st.session_state.pop(shared.MODEL_KEY, None)
    st.session_state[DELETE_MESSAGE] = ("success", f"{name} was deleted.")


def compare(entries: dict[str, registry.ModelEntry]) -> None:
    st.subheader("Compare")
    names = list(entries)
    active = registry.active_model_name(shared.weights_root())
    default = list(dict.fromkeys(([active] if active in entries else []) + names))[:2]
    picked = st.multiselect("Models to compare", names, default=default, key="models_compare")
    if len(picked) < 2:
        st.caption("Pick two or more models to see their cards side by side. The Metrics page draws their ROC "
                   "curves and confusion matrices.")
        return
    rows: dict[str, dict[str, str]] = {}
    for name in picked:
        card = entries[name].card
        test = (card.get("metrics") or {}).get("test") or {}
        cv = cards.cross_validated(card)
        single = cards.single_split(card)
        rows[name] = {
            "evaluated by": cards.protocol_short(card),
            "CV AUC by source image [95 % CI]": cv.get("cross_validation", {}).get("text", "—"),
            "CV AUC by patient [95 % CI]": cv.get("cross_validation_patient", {}).get("text", "—"),
            "single split test AUC": single["text"] if single else "none (cross-validated)",
            f"accuracy ({cards.test_label(card)})": cards.fmt(test.get("accuracy")),
            f"sensitivity ({cards.test_label(card)})": cards.fmt(test.get("sensitivity")),
            f"specificity ({cards.test_label(card)})": cards.fmt(test.get("specificity")),
            "architecture": str(card.get("architecture", "—")),
            "ensemble members": str((card.get("ensemble") or {}).get("members", "—")),
            "calibration": str((card.get("calibration") or {}).get("method", "none")),
            "operating points": str(len(card.get("operating_points") or [])),
            "created": cards.created_date(card),
            "status": VERIFIED.get(entries[name].trust, entries[name].trust),
        }
    st.table(pd.DataFrame(rows))


def admin_actions(entries: list[registry.ModelEntry]) -> None:
    st.subheader("Make a model the app's default, or delete one")
    usable = [e for e in entries if e.problem is None and e.trusted]
    if usable:
        active = registry.active_model_name(shared.weights_root())
        names = [e.name for e in usable]
        pick = st.selectbox("Model", names, key="models_pick", index=names.index(active) if active in names else 0,
                            format_func=lambda n: n + (" (active)" if n == active else ""))
        entry = next(e for e in usable if e.name == pick)
        is_active = shared.activate_control(pick, entry.card, where="models")
        shipped = pick in registry.pinned_models()
        if shipped:
            st.caption(f"{shared.plain(pick)} is shipped with the app (pinned in weights/MANIFEST.json): it cannot be deleted.")
        elif is_active:
            st.caption("The active model cannot be deleted; make another model active first.")
        else:
            with st.popover(f"Delete {shared.plain(pick)}…"):
                st.write(f"Delete the folder of {shared.plain(pick)} (model, card and predictions) from the weights "
                         "folder. This cannot be undone.")
                st.button(f"Delete {shared.plain(pick)}", key=f"models_delete::{pick}", on_click=delete, args=(pick,))

    unverified = [e for e in entries if e.problem is None and not e.trusted]
    if unverified:
        st.warning(f"{len(unverified)} model folder(s) were not shipped with the app nor trained here (for example "
                   "copied in by hand). They are not offered for scoring until an administrator confirms them.",
                   icon=":material/gpp_maybe:")
        pick = st.selectbox("Unverified model", [e.name for e in unverified], key="models_unverified")
        if st.checkbox(f"I confirm that {shared.plain(pick)} comes from a trusted source and may become the app's "
                       "default model", key=f"models_confirm::{pick}"):
            st.button(f"Confirm {shared.plain(pick)} and make it active", key=f"confirm_{pick}",
                      on_click=shared.make_active, args=(pick, True))
        if pick not in registry.pinned_models():
            st.button(f"Delete {shared.plain(pick)}", key=f"models_delete_unverified::{pick}", on_click=delete,
                      args=(pick,))


def main() -> None:
    st.title("Models")
    shared.show_activate_error()
    if message := st.session_state.pop(DELETE_MESSAGE, None):
        (st.error if message[0] == "error" else st.success)(shared.plain(message[1]))
    root = shared.weights_root()
    entries = registry.list_models(root)
    if not entries:
        st.info("No model in the weights folder. " + ("Train one on the Retrain page." if user.is_admin
                                                      else "Ask an administrator to train one."))
        return
    active = registry.active_model_name(root)
    st.table(pd.DataFrame([summary(e, active) for e in entries]).set_index("model"))
    st.caption("CV AUC: pooled out-of-fold AUC of grouped cross-validation with its 95 % bootstrap interval (trust "
               "these first). The single split rests on few source images; the paper split is leaky. Verified: "
               "the model file matches the sha256 pinned for shipped models or recorded when it was trained or "
               "confirmed here.")
    if user.is_admin:
        admin_actions(entries)
    else:
        st.caption("An administrator chooses the app's default model; you can pick any model for yourself in the "
                   "sidebar.")
    compare({e.name: e for e in entries if e.problem is None})


main()
