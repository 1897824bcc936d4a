"""What a newcomer found odd on screen, each fixed and checked where it is made: layer names, configuration
cells, chart titles, counts said in words."""

import pytest
from streamlit.testing.v1 import AppTest

from cifarviz.analysis.summary import layer_table, model_for_summary
from cifarviz.core.models import list_models
from cifarviz.ui.compare import config_rows
from cifarviz.ui.evaluate_view import reliability_spec


@pytest.mark.parametrize("name", list_models())
def test_layer_tables_name_every_module_by_its_path(name):
    """Not "0", "1" inside a Sequential, nor "conv1" once per block: the dotted path, unique per row."""
    names = [row["name"] for row in layer_table(model_for_summary(name))]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    assert not [n for n in names if n.isdigit()]


def test_a_module_called_twice_is_said_to_be_the_same_one():
    names = [row["name"] for row in layer_table(model_for_summary("resnet18"))]
    assert "features.layer1.0.relu (called again)" in names and "features.layer1.0.relu" in names


def test_the_compare_table_says_flip_not_flip_true():
    config = {"model": "lenet", "augment": {"translate": 2, "flip": True, "rotate": 0.0, "color_jitter": 0.0}}
    rows = config_rows({"run": (None, config, {"state": "completed"})})
    assert rows.loc["augmentation", "run"] == "translate 2, flip"


def test_the_reliability_diagram_has_one_title_per_axis():
    bins = [{"confidence": 0.5, "accuracy": 0.4, "count": 3}]
    spec = reliability_spec({"as trained": bins, "calibrated": bins})
    titles = {layer["encoding"][axis]["title"] for layer in spec["layer"] for axis in ("x", "y")}
    assert titles == {"mean confidence in bin", "accuracy in bin"}  # Vega-Lite joined two as "accuracy, y"


def train_page(data_root: str):
    import streamlit as st

    st.session_state["_data_root"] = data_root
    from cifarviz.ui.runs_view import live_view

    live_view("someone")


@pytest.mark.slow
def test_an_empty_queue_says_one_run_in_words(cifar, runs_root):
    at = AppTest.from_function(train_page, args=(str(cifar.root),), default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    said = " ".join(c.value for c in at.caption)
    assert "One run trains at once on this server" in said and "run(s)" not in said
