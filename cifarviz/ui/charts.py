"""Chart pieces shared by the pages that draw learning curves (Models, Train)."""

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
