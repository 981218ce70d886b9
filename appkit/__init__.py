"""The Streamlit app's shared code, outside `pages/` (Streamlit runs every file in `pages/` as a page):
`shared` is the setup every page calls (page config, sign-in, navigation, the sidebar model selector,
the research-use note) plus Streamlit helpers; `cards` reads model cards for people."""
