import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from cifarviz.analysis.explore import ImageRef, confusion_cell_indices, misclassified_by_confidence
from cifarviz.analysis.metrics import classification_report, most_confused_pairs, reliability
from cifarviz.store.artifacts import split_tta
from cifarviz.ui import app
from cifarviz.ui.text import md, shown

dataset, checkpoint = app.data_and_checkpoint_page("Evaluate", training_images=False)
classes = list(dataset.classes)

split = st.segmented_control("Split", ["test", "val"], default="test", key="eval_split", required=True)
data = dataset.split(split)
header = st.empty()


def describe(tta: str) -> None:
    how = {"flip": " with flip test-time augmentation", "none": ""}[tta]
    if tta == "none" and split_tta(checkpoint, split) != "none":
        how = " without test-time augmentation for now (the augmented predictions are on their way)"
    header.markdown(f"Evaluating **{md(checkpoint.name)}** ({checkpoint.model.arch_name}, "
                    f"{sum(p.numel() for p in checkpoint.model.parameters()):,} parameters) on the **{len(data):,} "
                    f"{split} images** of {md(dataset.root.name)}{how}.")


describe(split_tta(checkpoint, split))  # shown while the first predictions are computed
arts = app.get_artifacts(checkpoint, dataset, split, early=True)  # plain predictions first, then flip-averaged
describe(arts.tta)


@st.cache_data(show_spinner=False, max_entries=32)
def report_for(path: str, stamp: float, root: str, split: str, tta: str):
    a = app._artifacts(path, stamp, root, split, tta)
    report = classification_report(a.labels, a.predicted, app.get_dataset(root).classes)
    bins, ece = reliability(a.probs, a.labels)
    return report, bins, ece


@st.cache_data(show_spinner=False, max_entries=256)
def confusion_spec(confusion: np.ndarray, classes: tuple, shown: tuple) -> dict:
    """The heat map's Vega-Lite spec, built once per (matrix, outlined cell): Altair's build and schema
    check cost ~20 ms, on every rerun of every viewer otherwise."""
    classes = list(classes)
    cells = pd.DataFrame([{"true": classes[i], "predicted": classes[j], "count": int(confusion[i, j])}
                          for i in range(len(classes)) for j in range(len(classes))])  # fmt: skip
    pick = alt.selection_point(name="cell", fields=["true", "predicted"], on="click", clear=False)
    axis = {"labelFontSize": 13, "titleFontSize": 15, "labelOverlap": False, "labelLimit": 120}
    base = alt.Chart(cells).encode(x=alt.X("predicted:N", sort=classes, axis=alt.Axis(labelAngle=-45, **axis)),
                                   y=alt.Y("true:N", sort=classes, axis=alt.Axis(**axis)))
    outlined = (alt.datum.true == shown[0]) & (alt.datum.predicted == shown[1])
    heat = base.mark_rect().encode(
        color=alt.Color("count:Q", scale=alt.Scale(type="symlog", scheme="blues"), legend=None),
        stroke=alt.condition(outlined, alt.value("#d62728"), alt.value(None)), strokeWidth=alt.value(4),
        tooltip=["true", "predicted", "count"]).add_params(pick)
    text = base.mark_text(fontSize=13).encode(
        text="count:Q",
        color=alt.condition(alt.datum.count > confusion.max() / 3, alt.value("white"), alt.value("black")))
    return (heat + text).properties(height=470).to_dict()


@st.cache_data(show_spinner=False, max_entries=64)
def reliability_spec(bins: list[dict], ece: float) -> dict:
    frame = pd.DataFrame(bins)
    unit = alt.Scale(domain=[0, 1], nice=False, clamp=True)
    bars = alt.Chart(frame).mark_bar(opacity=0.8, size=18).encode(
        x=alt.X("confidence:Q", scale=unit, title="mean confidence in bin", axis=alt.Axis(format="%")),
        y=alt.Y("accuracy:Q", scale=unit, axis=alt.Axis(format="%")), tooltip=["confidence", "accuracy", "count"])
    diagonal = alt.Chart(pd.DataFrame({"x": [0, 1], "y": [0, 1]})).mark_line(strokeDash=[4, 4], color="gray").encode(
        x="x", y="y")
    return (bars + diagonal).properties(height=260, title=f"ECE {ece:.3f}").to_dict()


report, bins, ece = report_for(str(checkpoint.path), app.file_stamp(checkpoint.path), dataset.root.as_posix(), split,
                               arts.tta)
confusion = np.array(report["confusion_matrix"])

m1, m2, m3, m4 = st.columns(4)
m1.metric("Accuracy", f"{report['accuracy']:.2%}", help=f"{len(data):,} {split} images of {dataset.root}")
m2.metric("Macro F1", f"{report['macro']['f1']:.3f}")
m3.metric("Calibration error", f"{ece:.3f}", help="Expected calibration error (ECE): the average gap between "
          "confidence and accuracy, over confidence bins")
m4.metric("Mistakes", f"{int((arts.predicted != arts.labels).sum()):,}")

st.session_state.setdefault("cm_true", "cat" if "cat" in classes else classes[0])
st.session_state.setdefault("cm_pred", "dog" if "dog" in classes else classes[-1])


def _cell_picked_by_hand() -> None:
    """The dropdowns changed: start the chart afresh, so a click on any cell (even the last one) applies again."""
    st.session_state["cm_chart_round"] = st.session_state.get("cm_chart_round", 0) + 1


st.subheader("Confusion matrix")
st.caption("Rows: true class, columns: predicted class. Click a cell to see its images below.")


event = st.vega_lite_chart(spec=confusion_spec(confusion, tuple(classes), (st.session_state["cm_true"],
                                                                            st.session_state["cm_pred"])),
                           on_select="rerun", width="stretch", key=f"confusion-{st.session_state.get('cm_chart_round', 0)}")
chosen = (event.selection.get("cell") or [None])[0] if event else None
if chosen:
    st.session_state["cm_true"], st.session_state["cm_pred"] = chosen["true"], chosen["predicted"]
st.subheader("Per-class precision, recall, F1")
per_class = pd.DataFrame(report["per_class"])
per_class[["precision", "recall", "f1"]] *= 100  # one format for every cell: 86.0%, never 86% beside 88.3%
share = st.column_config.NumberColumn(format="%.1f%%")
st.dataframe(per_class, hide_index=True,  # auto height: the ten classes, no empty row
             column_config={"precision": share, "recall": share, "f1": share,
                            "support": st.column_config.NumberColumn(format="localized")})

st.subheader("Images of one cell")
a, b = st.columns(2)
true_name = a.selectbox("True class", classes, key="cm_true", on_change=_cell_picked_by_hand, format_func=shown)
pred_name = b.selectbox("Predicted class", classes, key="cm_pred", on_change=_cell_picked_by_hand, format_func=shown)
cell = confusion_cell_indices(arts.labels, arts.predicted, classes.index(true_name), classes.index(pred_name))
cell = cell[np.argsort(-arts.probs[cell, classes.index(pred_name)], kind="stable")][:48]
st.caption(f"{int(confusion[classes.index(true_name), classes.index(pred_name)])} {split} images are {md(true_name)} "
           f"predicted as {md(pred_name)}" + (" (showing the 48 most confident)" if len(cell) == 48 else ""))
app.image_grid(data.images[cell], [ImageRef(split, int(i)) for i in cell],
               [f"#{i} {arts.probs[i, classes.index(pred_name)]:.0%}" for i in cell], key="cell", tile_width=96)

st.subheader("Most confident mistakes")
wrong = misclassified_by_confidence(arts.probs, arts.labels)[:24]
app.image_grid(data.images[wrong], [ImageRef(split, int(i)) for i in wrong],
               [f"{md(classes[arts.labels[i]])} → {md(classes[arts.predicted[i]])} {arts.probs[i].max():.0%}" for i in wrong],
               key="mistakes", tile_width=120)

c1, c2 = st.columns(2)
with c1:
    st.subheader("Most confused pairs")
    st.dataframe(pd.DataFrame(most_confused_pairs(confusion, classes, top=8))[["pair", "count"]], hide_index=True)
with c2:
    st.subheader("Reliability diagram")
    st.vega_lite_chart(spec=reliability_spec(bins, ece), width="stretch")


st.subheader("Try your own image")
upload = None
if app.uploads_allowed():
    upload = st.file_uploader("A photo (PNG/JPEG); it is resized to 32x32 like CIFAR-10", type=None, key="own_image")
else:
    st.caption("Uploads are turned off on this server.")
if upload is not None:
    image = app.read_upload_image(upload)
    if image is not None and st.session_state.get("uploaded_image_id") != upload.file_id:
        st.session_state["uploaded_image_id"] = upload.file_id  # open the inspector once per new upload
        st.session_state["uploaded_image"] = image
        app.open_inspector("upload", 0)

app.inspector(dataset, checkpoint)
