"""cifarviz: `streamlit run streamlit_app.py` opens the explorer."""

import streamlit as st

st.set_page_config(page_title="cifarviz", page_icon=":material/grid_view:", layout="wide")

navigation = st.navigation([
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/dataset.py", title="Dataset", icon=":material/photo_library:"),
    st.Page("pages/evaluate.py", title="Evaluate", icon=":material/fact_check:"),
    st.Page("pages/models.py", title="Models", icon=":material/account_tree:"),
])  # fmt: skip
navigation.run()
