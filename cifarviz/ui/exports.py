"""Export a selection the page shows (a confusion cell, the mistakes, a box on the map, the suspicious list, an
influence lookup) as CSV and JSON: the same table `python -m cifarviz export` writes."""

from __future__ import annotations

import re
from typing import Callable

import streamlit as st

from cifarviz.analysis.export import rows_to_csv, rows_to_json


def safe_file_name(name: str) -> str:
    """A download's file name from names read from files (checkpoints, classes): letters, digits, . _ - only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:120] or "selection"


def export_buttons(rows: Callable[[], list[dict]], key: str, name: str, about: dict) -> None:
    """Two download buttons, CSV and JSON, side by side. `rows` is called only when one is clicked (a cell of
    1,000 images is not turned into text on every rerun of every viewer); the page does not rerun."""
    name = safe_file_name(name)
    with st.container(horizontal=True, gap="small", key=f"export-{key}"):
        st.download_button("CSV", lambda: rows_to_csv(rows()), file_name=f"{name}.csv", mime="text/csv",
                           key=f"export-{key}-csv", on_click="ignore", icon=":material/download:",
                           help="Every image of this selection: index, source index, label, prediction, confidence")
        st.download_button("JSON", lambda: rows_to_json(rows(), about), file_name=f"{name}.json",
                           mime="application/json", key=f"export-{key}-json", on_click="ignore",
                           icon=":material/download:", help="The same table as JSON, with what was selected")
