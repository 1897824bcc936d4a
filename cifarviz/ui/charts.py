"""Chart pieces: the learning curves shared by Models and Train, and the Dataset page's charts."""

from __future__ import annotations

import altair as alt
import pandas as pd

# Clearly different, strong hues, in zoo order, so each compared trio of shipped models gets three unlike colours
# (Streamlit's own palette pairs dark and light shades of one hue).
PALETTE = ["#8c564b", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#e377c2", "#393b79", "#17becf", "#b8860b",
           "#d62728", "#7f7f7f", "#637939", "#ad494a"]
SPLIT_DASH = alt.Scale(domain=["train", "val"], range=[[1, 0], [6, 4]])
SPLIT_SHAPE = alt.Scale(domain=["train", "val"], range=["circle", "diamond"])
# Shapes as well as dashes: a run of one epoch has no line, only a point per split
SPLITS_NOTE = "Training split: solid lines, round points; validation split: dashed lines, diamonds."


def epoch_curves(frame: pd.DataFrame, metric: str, colour: alt.Color, series: str = "model",
                 height: int = 400) -> alt.Chart:
    """Per-epoch lines of `frame` (columns series, epoch, split, value): a colour per series, solid for training
    and dashed for validation (say so with SPLITS_NOTE), the y axis fitted to the data."""
    accuracy = metric == "acc"
    return alt.Chart(frame).mark_line(point=alt.OverlayMarkDef(size=45, filled=True), strokeWidth=2.5).encode(
        x=alt.X("epoch:Q", axis=alt.Axis(tickMinStep=1, format="d")),
        y=alt.Y("value:Q", title="accuracy" if accuracy else "loss", scale=alt.Scale(zero=False, nice=True),
                axis=alt.Axis(format="%" if accuracy else ".2f")),
        color=colour,
        strokeDash=alt.StrokeDash("split:N", scale=SPLIT_DASH, legend=None),
        shape=alt.Shape("split:N", scale=SPLIT_SHAPE, legend=None),
        tooltip=[series, "split", "epoch", alt.Tooltip("value:Q", format=".2%" if accuracy else ".3f")],
    ).properties(height=height)  # fmt: skip


def class_counts(counts: pd.DataFrame, classes: list[str]) -> alt.Chart:
    """Images per class, one bar per split side by side (Dataset's first tab); every class name in full."""
    return alt.Chart(counts).mark_bar().encode(
        x=alt.X("class:N", sort=classes, title=None,
                axis=alt.Axis(labelAngle=-40, labelFontSize=14, labelOverlap=False, labelLimit=0)),
        y=alt.Y("images:Q", axis=alt.Axis(format=",.0f", labelFontSize=14, titleFontSize=15)),
        color=alt.Color("split:N", scale=alt.Scale(domain=["train", "val", "test"],
                                                   range=["#1f77b4", "#ff7f0e", "#2ca02c"]),
                        legend=alt.Legend(orient="top", labelFontSize=14, title=None)),
        xOffset=alt.XOffset("split:N", sort=["train", "val", "test"]),
        tooltip=["split", "class", alt.Tooltip("images:Q", format=",")]).properties(height=320)


def pixel_histograms(hist: pd.DataFrame) -> alt.Chart:
    """One line per colour channel of the training split's pixel values."""
    return alt.Chart(hist).mark_line(strokeWidth=2.5).encode(
        x=alt.X("value:Q", title="pixel value", axis=alt.Axis(labelFontSize=13, titleFontSize=14)),
        y=alt.Y("count:Q", axis=alt.Axis(format="~s", labelFontSize=13, titleFontSize=14)),
        color=alt.Color("channel:N", scale=alt.Scale(domain=["red", "green", "blue"],
                                                     range=["#d62728", "#2ca02c", "#1f77b4"]),
                        legend=alt.Legend(orient="top", labelFontSize=13, title=None)),
        tooltip=["channel", "value", alt.Tooltip("count:Q", format=",")]).properties(height=240)
