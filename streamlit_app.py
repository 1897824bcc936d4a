"""cifarviz: `streamlit run streamlit_app.py` opens the explorer."""

import sys

import streamlit as st

st.set_page_config(page_title="cifarviz", page_icon=":material/grid_view:", layout="wide")
if "cifarviz.ui.app" not in sys.modules:  # the first visitor after a server start would see a blank page for seconds
    with st.spinner("Starting cifarviz (loading PyTorch, once per server start)..."):
        import cifarviz.ui.app  # noqa: F401

from cifarviz.ui.app import PAGES

pages = [st.Page(path, title=title, icon=icon, default=(i == 0)) for i, (path, title, icon) in enumerate(PAGES)]
st.navigation(pages, position="hidden").run()  # each page draws the sidebar (links, data, checkpoint)
