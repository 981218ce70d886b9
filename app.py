"""Streamlit entry point and Home page: intended use, the model in use and its honest numbers first.

Run with `make run` (this machine only, 127.0.0.1) or `make serve` (the network, login required;
see docs/DEPLOYMENT.md). Pages follow Streamlit's pages-directory convention: this file is Home and
each file in `pages/` is a page (Review, Metrics, Models, Retrain), ordered and titled by its file
name. Every page, this one included, starts with `appkit.shared.setup()`: page config, sign-in and
roles, the navigation, the sidebar model selector and the research-use note. The pages are thin:
mammo_core does the work. TensorFlow is imported only when a page needs the model (Review).
"""

from __future__ import annotations

import streamlit as st

from appkit import cards, shared

#: What each page of `shared.PAGES` is for, after its label in Home's list (a page without one shows its label).
PAGE_SUMMARIES = {
    "pages/1_Review.py": "score uploaded mammograms, with Grad-CAM",
    "pages/2_Metrics.py": "ROC, confusion matrix and Table 1 of the models",
    "pages/3_Models.py": "every model's card; make one the default, compare, delete",
    "pages/4_Retrain.py": "train a new model in the background",
}

user = shared.setup("Home")

st.title("Mammogram benign/malignant research tool")
st.error(
    "**Research tool, not a diagnostic device.** It classifies whole mammograms as benign or malignant "
    "(it reproduces a published CNN and goes beyond it) and shows where the network responded (Grad-CAM). "
    "It has not been validated for clinical use: never use it to diagnose, triage or treat patients.",
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
    shared.honest_headline(card)
    test = (card.get("metrics") or {}).get("test") or {}
    st.caption(f"{cards.protocol_short(card).capitalize()} · architecture: {shared.plain(card.get('architecture', '?'))} · "
               f"created {cards.created_date(card)} · {cards.test_label(card)} images: {test.get('n', '?')} · "
               f"{cards.test_label(card)} accuracy {cards.fmt(test.get('accuracy'))} · "
               f"decision threshold {shared.card_threshold(card):.2f}")
    shared.evaluation_note(card)

st.subheader("Pages")
for script, label, icon, admin_only in shared.PAGES:  # the one list of pages, as in the sidebar
    if script != "app.py" and (user.is_admin or not admin_only):
        summary = PAGE_SUMMARIES.get(script)
        st.page_link(script, label=f"{label}: {summary}" if summary else label, icon=icon)
