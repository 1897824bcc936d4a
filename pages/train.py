import streamlit as st

from cifarviz import app

app.sidebar()
st.title("Train")
st.info("This page is being built.")
