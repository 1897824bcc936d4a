"""The Evaluate page's pieces: the confusion matrix's chart, and calibration (the reliability diagram before and
after temperature scaling, with the switch that shows calibrated probabilities in the inspector)."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from cifarviz.analysis.metrics import sample_accuracy
from cifarviz.ui.loaders import calibration_now
from cifarviz.ui.text import md

CALIBRATED_KEY = "calibrated_probabilities"  # the inspector shows temperature-scaled probabilities when True


def calibrated_switch(where: str, label: str) -> bool:
    """A toggle for CALIBRATED_KEY. Evaluate's and the inspector's are one setting: each has its own widget key
    (both can be on screen in one run), seeded from the setting and writing it back."""
    key = f"calibrated-{where}"
    if key not in st.session_state:  # Streamlit forgets a widget's state on a page that does not draw it
        st.session_state[key] = bool(st.session_state.get(CALIBRATED_KEY, False))

    def changed() -> None:
        st.session_state[CALIBRATED_KEY] = st.session_state[key]
        for other in ("calibrated-evaluate", "calibrated-inspector"):
            if other != key and other in st.session_state:
                st.session_state[other] = st.session_state[key]

    return st.toggle(label, key=key, on_change=changed,
                     help="Temperature scaling: softmax(logits / T), with T fitted on the validation split. "
                          "The predicted class never changes, only how sure the model says it is.")


PREVIEW_FROM = 200  # images predicted before a first estimate is worth showing (its interval is then about ±4%)


def accuracy_so_far(labels: np.ndarray, split: str, tta: str = "none"):
    """The preview Evaluate draws while a split's first pass runs: the accuracy on the images predicted so far (a
    random sample of the split) and how far the whole split's can be from it. The first pass is the plain one: with
    test-time augmentation (`tta`) the interval is for the plain predictions' accuracy, and the page says so."""
    plain = " without test-time augmentation" if tta != "none" else ""
    then = (f"Then the plain pass's report, then the {tta}-averaged one." if tta != "none"
            else "The full report follows when all are predicted.")
    def draw(partial) -> None:
        n = len(partial.predicted)
        if n < PREVIEW_FROM:
            return
        accuracy, half = sample_accuracy(partial.predicted, labels[partial.positions], partial.total)
        left, right = st.columns([1, 3])
        left.metric("Accuracy so far", f"{accuracy:.1%}", help="On the images predicted so far: they are taken in "
                    "a random order, so they are a random sample of the split")
        right.caption(f"On {n:,} of the {partial.total:,} {split} images, taken in a random order. With 95% "
                      f"confidence the whole split's accuracy{plain} is within ±{half:.1%} of this (the sampling "
                      f"error of {n:,} images drawn from {partial.total:,}). {then}")
    return draw


@st.cache_data(show_spinner=False, max_entries=256)
def confusion_spec(confusion: np.ndarray, classes: tuple, shown: tuple, height: int = 420,
                   by_row: bool = False) -> dict:
    """The heat map's Vega-Lite spec, built once per (matrix, outlined cell, normalisation): Altair's build and
    schema check cost ~20 ms, on every rerun of every viewer otherwise.

    by_row: each cell is its share of the true class (row sums are 100%; the diagonal is each class's recall), so a
    class with few images is read on the same scale as a large one. Counts stay in the tooltip."""
    classes = list(classes)
    rows = np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    share = 100.0 * confusion / rows
    cells = pd.DataFrame([{"true": classes[i], "predicted": classes[j], "count": int(confusion[i, j]),
                           "share": round(float(share[i, j]), 1)}
                          for i in range(len(classes)) for j in range(len(classes))])  # fmt: skip
    pick = alt.selection_point(name="cell", fields=["true", "predicted"], on="click", clear=False)
    axis = {"labelFontSize": 13, "titleFontSize": 15, "labelOverlap": False, "labelLimit": 120}
    base = alt.Chart(cells).encode(x=alt.X("predicted:N", sort=classes, axis=alt.Axis(labelAngle=-45, **axis)),
                                   y=alt.Y("true:N", sort=classes, axis=alt.Axis(**axis)))
    outlined = (alt.datum.true == shown[0]) & (alt.datum.predicted == shown[1])
    value, top = ("share", float(share.max())) if by_row else ("count", float(confusion.max()))
    heat = base.mark_rect().encode(
        color=alt.Color(f"{value}:Q", scale=alt.Scale(type="symlog", scheme="blues"), legend=None),
        stroke=alt.condition(outlined, alt.value("#d62728"), alt.value(None)), strokeWidth=alt.value(4),
        tooltip=["true", "predicted", "count", alt.Tooltip("share:Q", title="% of the true class")]).add_params(pick)
    if by_row:
        text = base.transform_calculate(label="format(datum.share, '.1f') + '%'").mark_text(fontSize=11).encode(
            text="label:N", color=alt.condition(alt.datum.share > top / 3, alt.value("white"), alt.value("black")))
    else:
        text = base.mark_text(fontSize=13).encode(
            text="count:Q", color=alt.condition(alt.datum.count > top / 3, alt.value("white"), alt.value("black")))
    return (heat + text).properties(height=height).to_dict()


@st.cache_data(show_spinner=False, max_entries=64)
def reliability_spec(series: dict[str, list[dict]]) -> dict:
    """Confidence vs accuracy per bin, one coloured series per entry of `series` (before / after calibration),
    and the diagonal a perfectly calibrated model would follow."""
    frame = pd.DataFrame([{**row, "probabilities": name} for name, rows in series.items() for row in rows])
    unit = alt.Scale(domain=[0, 1], nice=False, clamp=True)
    x = alt.X("confidence:Q", scale=unit, title="mean confidence in bin", axis=alt.Axis(format="%"))
    y = alt.Y("accuracy:Q", scale=unit, title="accuracy in bin", axis=alt.Axis(format="%"))
    points = alt.Chart(frame).mark_line(point=alt.OverlayMarkDef(size=50), strokeWidth=2.5).encode(
        x=x, y=y, color=alt.Color("probabilities:N", title=None, sort=list(series),
                                  scale=alt.Scale(range=["#d62728", "#1f77b4"]),
                                  legend=alt.Legend(orient="bottom", labelLimit=400, labelFontSize=13)),
        tooltip=["probabilities", alt.Tooltip("confidence:Q", format=".1%"), alt.Tooltip("accuracy:Q", format=".1%"),
                 "count"])
    diagonal = alt.Chart(pd.DataFrame({"confidence": [0, 1], "accuracy": [0, 1]})).mark_line(
        strokeDash=[4, 4], color="gray").encode(x=x, y=y)  # the same titles: one title per axis
    return (diagonal + points).properties(height=300).to_dict()


def calibration_section(checkpoint, dataset) -> None:
    """ECE and NLL on the test split before and after a temperature fitted on the validation split."""
    st.subheader("Calibration")
    result = calibration_now(checkpoint, dataset)
    if result is None:
        st.caption("Calibration appears here once the validation and test predictions are computed.")
        return
    sizes = ((checkpoint.meta or {}).get("data") or {}).get("sizes") or {}
    held_out = sizes.get("val", 0) > 0 and sizes.get("train", len(dataset.train)) <= len(dataset.train)
    left, right = st.columns([1, 1.3], gap="medium")
    with left:
        a, b = st.columns(2)
        a.metric("ECE on test", f"{result.ece_after:.3f}", f"{result.ece_after - result.ece_before:+.3f} "
                 f"(from {result.ece_before:.3f})", delta_color="inverse",
                 help="Expected calibration error: the average gap between confidence and accuracy over 15 "
                      "confidence bins; 0 is perfect.")
        b.metric("NLL on test", f"{result.nll_after:.3f}", f"{result.nll_after - result.nll_before:+.3f} "
                 f"(from {result.nll_before:.3f})", delta_color="inverse",
                 help="Mean negative log-likelihood of the true class (the plain loss, no label smoothing).")
        verdict = ("underconfident: its probabilities are sharpened" if result.temperature < 0.97 else
                   "overconfident: its probabilities are softened" if result.temperature > 1.03 else
                   "already close to calibrated")
        st.markdown(
            f"**Temperature scaling**: every logit divided by **T = {result.temperature:.2f}**, the value that "
            f"minimises the plain loss on the {result.fitted_images:,} validation images; measured on the "
            f"{len(dataset.test):,} test images. {md(checkpoint.name)} was {verdict}. Predictions (the argmax) "
            "and accuracy do not change.")
        if not held_out:
            st.warning(f"{md(checkpoint.name)} does not record a held-out validation split: if it was trained on "
                       "these validation images, the temperature is fitted on training data.",
                       icon=":material/warning:")
        calibrated_switch("evaluate", "Calibrated in the inspector")  # a short label: the column is narrow at 1024 px
    with right:
        st.vega_lite_chart(spec=reliability_spec({
            f"as trained (ECE {result.ece_before:.3f})": list(result.bins_before),
            f"calibrated, T = {result.temperature:.2f} (ECE {result.ece_after:.3f})": list(result.bins_after)}),
            width="stretch")
