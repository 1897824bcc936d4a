"""cifarviz: `streamlit run streamlit_app.py` opens the explorer."""

import streamlit as st

from cifarviz.app import PAGES

st.set_page_config(page_title="cifarviz", page_icon=":material/grid_view:", layout="wide")
pages = [st.Page(path, title=title, icon=icon, default=(i == 0)) for i, (path, title, icon) in enumerate(PAGES)]
st.navigation(pages, position="hidden").run()  # each page draws the sidebar (links, data, checkpoint)
