"""Streamlit entry point: navigation (Home, Review, Metrics, Retrain) and the sidebar model selector.

Run with `make run` (this machine only, 127.0.0.1) or `make serve` (the network, login required;
see docs/DEPLOYMENT.md). The pages are thin: mammo_core does the work. TensorFlow is imported only
when a page needs the model (Review), so the first paint is quick.

Access: `shared.sign_in()` runs before anything else and stops the script until someone is signed
in. Readers get Home, Review and Metrics; admins also Retrain (training, making a model active).

The page scripts live in `app_pages/`, not `pages/`: with a folder named `pages/` next to app.py,
Streamlit falls back to its legacy multipage mode for a server whose first visitor opens a page
URL directly (e.g. /review), skipping this file and its sidebar.
"""

from __future__ import annotations

import streamlit as st

from app_pages import _shared as shared

st.set_page_config(page_title="Mammogram research tool", page_icon=":material/radiology:", layout="wide")
shared.keep_keras_state_between_reruns()
user = shared.sign_in()


def home() -> None:
    st.title("Mammogram benign/malignant research tool")
    st.error(
        "**Research tool, not a diagnostic device.** It reproduces a published CNN that classifies "
        "mammogram crops as benign or malignant and shows where it looked (Grad-CAM). It has not been "
        "validated for clinical use: never use it to diagnose, triage or treat patients.",
        icon=":material/block:",
    )
    model_dir, card, warnings = shared.model_in_use(shared.chosen_model_name())
    if model_dir is None:
        st.subheader("Model in use")
        shared.show_warnings(warnings)
        if not shared.usable_models():
            st.info("No usable model in the weights folder. " + ("Train one on the Retrain page." if user.is_admin
                                                                 else "Ask an administrator to train one."))
    else:
        st.subheader(f"Model in use: {shared.plain(card.get('name', model_dir.name))}")
        shared.show_warnings(warnings)
        test = (card.get("metrics") or {}).get("test") or {}
        cols = st.columns(4)
        cols[0].metric("Created", shared.created_date(card))
        protocol = (card.get("split") or {}).get("protocol") or "unknown"
        cols[1].metric("Split protocol", "paper (leaky)" if protocol == "paper" else protocol,
                       help=shared.protocol_short(card))
        cols[2].metric("Test AUC", shared.fmt(test.get("auc")))
        cols[3].metric("Test accuracy", shared.fmt(test.get("accuracy")))
        st.caption(f"{shared.protocol_short(card).capitalize()} · architecture: {shared.plain(card.get('architecture', '?'))} · "
                   f"test images: {test.get('n', '?')} · "
                   f"decision threshold: {shared.card_threshold(card):.2f}")
        shared.evaluation_note(card)
    st.subheader("Pages")
    st.page_link(review, label="Review: score uploaded mammograms with Grad-CAM", icon=":material/search:")
    st.page_link(metrics, label="Metrics: ROC, confusion matrix and Table 1 of the models", icon=":material/monitoring:")
    if user.is_admin:
        st.page_link(retrain, label="Retrain: train a new model in the background", icon=":material/model_training:")


home_page = st.Page(home, title="Home", icon=":material/home:", default=True)
review = st.Page("app_pages/review.py", title="Review", icon=":material/search:")
metrics = st.Page("app_pages/metrics.py", title="Metrics", icon=":material/monitoring:")
retrain = st.Page("app_pages/retrain.py", title="Retrain", icon=":material/model_training:")

nav = st.navigation([home_page, review, metrics] + ([retrain] if user.is_admin else []))
shared.model_selector()
shared.user_panel(user)
st.sidebar.caption("Research use only — not for diagnosis.")
nav.run()
