"""The Predictions page's pieces: its filters (each kept in the link), the table with thumbnails (a row opens the
inspector), groups by class, exports of the filtered rows."""

from __future__ import annotations

import base64
import zlib

import numpy as np
import pandas as pd
import streamlit as st

from cifarviz.analysis.explore import ImageRef, to_png
from cifarviz.analysis.predictions import OUTCOMES, SORTS, by_class, prediction_rows, prediction_table, select
from cifarviz.ui.links import from_link, linked
from cifarviz.ui.loaders import _artifacts, calibration_now, file_stamp
from cifarviz.ui.tagging import visible_tags
from cifarviz.ui.text import shown
from cifarviz.ui.widgets import open_inspector

ROWS_PER_PAGE = 100  # thumbnails are drawn for one page of rows at a time


@st.cache_data(show_spinner=False, max_entries=32)
def table_of(path: str, stamp: float, root: str, split: str, tta: str, classes: tuple,
             temperature: float | None) -> pd.DataFrame:
    """Every prediction of the split (cached per checkpoint file, data, split and calibration)."""
    a = _artifacts(path, stamp, root, split, tta)
    return prediction_table(a.logits, a.probs, a.labels, classes, temperature)


def full_table(checkpoint, dataset, split: str, arts) -> tuple[pd.DataFrame, float | None]:
    calibration = calibration_now(checkpoint, dataset) if split == "test" else None
    temperature = calibration.temperature if calibration is not None else None
    frame = table_of(str(checkpoint.path), file_stamp(checkpoint.path), dataset.root.as_posix(), split, arts.tta,
                     tuple(dataset.classes), temperature)
    return frame, temperature


def _names(text: str, classes) -> list[str] | None:
    names = [n for n in text.split(",") if n in classes]
    return names if names else None


def _range(text: str) -> tuple[int, int] | None:
    low, _, high = text.partition("-")
    if low.isdigit() and high.isdigit() and 0 <= int(low) <= int(high) <= 100:
        return int(low), int(high)
    return None


def filters(classes: list[str]) -> dict:
    """The filter widgets, in two rows; every choice is part of the link to this view."""
    linked("true", "pred_true", parse=lambda t: _names(t, classes), format=",".join)
    linked("predicted", "pred_predicted", parse=lambda t: _names(t, classes), format=",".join)
    # a default is left out of the link ("" below): the address names only what was chosen
    linked("outcome", "pred_outcome", choices=OUTCOMES, default="all", format=lambda o: "" if o == "all" else o)
    linked("confidence", "pred_confidence", parse=_range, default=(0, 100),
           format=lambda r: "" if tuple(r) == (0, 100) else f"{r[0]}-{r[1]}")
    linked("sort", "pred_sort", choices=tuple(SORTS), default="loss", format=lambda o: "" if o == "loss" else o)
    linked("tagged", "pred_tagged", parse=lambda t: {"yes": True, "no": False}.get(t), default=False,
           format=lambda on: "yes" if on else "")
    linked("group", "pred_group", parse=lambda t: {"class": True, "no": False}.get(t), default=False,
           format=lambda on: "class" if on else "")
    a, b, c = st.columns([1.5, 1.5, 1.4])  # "all | right | wrong" whole on a 1024-pixel projector
    true = a.multiselect("True class", classes, key="pred_true", format_func=shown, placeholder="every class")
    predicted = b.multiselect("Predicted class", classes, key="pred_predicted", format_func=shown,
                              placeholder="every class")
    outcome = c.segmented_control("Prediction", OUTCOMES, key="pred_outcome", required=True)
    d, e, f, g = st.columns([2, 1.2, 1, 1], vertical_alignment="bottom")
    confidence = d.slider("Confidence (%)", 0, 100, key="pred_confidence",
                          help="The predicted class's probability, as every page shows it")
    sort = e.selectbox("Sort by", list(SORTS), key="pred_sort",
                       help="loss: -log p(true class), highest first; margin: logit(true) minus the largest "
                            "other, lowest first; confidence: highest first")
    tagged = f.toggle("Tagged only", key="pred_tagged")
    group = g.toggle("Group by class", key="pred_group")
    return {"labels": true, "predictions": predicted, "outcome": outcome, "sort": sort, "tagged": tagged,
            "confidence": (confidence[0] / 100, confidence[1] / 100), "group": group}


def filtered(frame: pd.DataFrame, chosen: dict, split: str) -> pd.DataFrame:
    tagged = None
    if chosen["tagged"]:
        tagged = [ref.index for ref in visible_tags() if ref.split == split]
    return select(frame, labels=chosen["labels"], predictions=chosen["predictions"], outcome=chosen["outcome"],
                  confidence=chosen["confidence"], indices=tagged, sort=chosen["sort"],
                  descending=chosen["sort"] not in ("margin", "index"))


def _thumbnail(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(to_png(image, scale=2)).decode()


def table(rows: pd.DataFrame, images: np.ndarray, split: str, page: int) -> None:
    """One page of rows with thumbnails; selecting a row opens the inspector."""
    shown_rows = rows.iloc[page * ROWS_PER_PAGE:(page + 1) * ROWS_PER_PAGE].copy()
    tags = visible_tags()
    shown_rows.insert(0, "image", [_thumbnail(images[i]) for i in shown_rows["index"]])
    shown_rows["tags"] = [", ".join(sorted(tags.get(ImageRef(split, int(i)), {}))) for i in shown_rows["index"]]
    for column in ("confidence", "calibrated"):
        if column in shown_rows:
            shown_rows[column] = shown_rows[column] * 100
    percent = st.column_config.NumberColumn(format="%.1f%%")
    # Another set of rows is another table: a row chosen in the last one must not open an image of this one
    key = f"pred-table-{split}-{zlib.crc32(shown_rows['index'].to_numpy().tobytes())}"
    event = st.dataframe(
        shown_rows, hide_index=True, on_select="rerun", selection_mode="single-row", key=key, row_height=40,
        column_config={"image": st.column_config.ImageColumn("image", width="small"),
                       "index": st.column_config.NumberColumn(f"{split} #", format="%d"),
                       "correct": st.column_config.CheckboxColumn("right"),
                       "confidence": percent, "calibrated": st.column_config.NumberColumn(
                           "calibrated", format="%.1f%%", help="Temperature-scaled (T fitted on val)"),
                       "loss": st.column_config.NumberColumn(format="%.3f", help="-log p(true class), nats"),
                       "margin": st.column_config.NumberColumn(format="%.2f", help="logit(true) - largest other")})
    picked = (event.selection.rows if event is not None else []) or []
    if not picked:
        st.session_state.pop("_pred_opened", None)  # a row unselected: choosing it again opens it again
    else:
        index = int(shown_rows.iloc[picked[0]]["index"])
        if st.session_state.get("_pred_opened") != (key, index):  # open once per click, not on every rerun
            st.session_state["_pred_opened"] = (key, index)
            open_inspector(split, index)


def groups(rows: pd.DataFrame) -> None:
    frame = by_class(rows)
    share = st.column_config.NumberColumn(format="%.1f%%")
    st.dataframe(frame, hide_index=True, column_config={"accuracy": share, "mean confidence": share,
                                                       "mean loss": st.column_config.NumberColumn(format="%.3f")})


def export_rows(rows: pd.DataFrame, split: str, dataset) -> list[dict]:
    """The exported rows, with this viewer's tags (the teacher's: everyone's)."""
    tags = visible_tags()
    return [{**record, "tags": "; ".join(sorted(tags.get(ImageRef(split, record["index"]), {})))}
            for record in prediction_rows(rows, dataset, split)]


def page_number(total: int) -> int:
    pages = max((total + ROWS_PER_PAGE - 1) // ROWS_PER_PAGE, 1)
    if pages == 1:
        return 0
    raw = from_link("page")
    if raw is not None and raw.isdigit() and 1 <= int(raw) <= pages:
        st.session_state["pred_page"] = int(raw)
    if st.session_state.get("pred_page", 1) > pages:
        st.session_state["pred_page"] = 1
    return st.number_input(f"Page (of {pages:,}, {ROWS_PER_PAGE} rows each)", 1, pages, key="pred_page",
                           width=260) - 1
