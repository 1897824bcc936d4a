"""Train: pick a model and its hyperparameters, press Start, and watch it learn; compare runs; tune (Optuna)."""

import streamlit as st

from cifarviz.ui import app, identity
from cifarviz.ui.compare import compare_tab
from cifarviz.ui.runs_view import live_view
from cifarviz.ui.train_form import training_form
from cifarviz.ui.tuning import tuning_tab

app.sidebar()
st.title("Train")
dataset = app.current_dataset()
if dataset is None:
    st.stop()
owner = identity.viewer()  # this browser's runs (a reload is the same person)

if "train_config_request" in st.session_state:  # "Train with the best parameters" on the Tune tab: show the form
    st.session_state["train_tabs"] = "Train"
train_tab, compare, tune = st.tabs(app.linked_tab("train_tabs", ["Train", "Compare", "Tune"]), key="train_tabs",
                                   on_change="rerun")
with train_tab:
    training_form(dataset, owner)
    live_view(owner)
with compare:
    compare_tab()
with tune:
    tuning_tab(dataset)
app.publish_link()
