import numpy as np
import pandas as pd
import streamlit as st

from cifarviz.analysis.explore import ImageRef, confusion_cell_indices, misclassified_by_confidence
from cifarviz.analysis.export import selection_rows
from cifarviz.analysis.metrics import classification_report, most_confused_pairs, reliability
from cifarviz.store.artifacts import split_tta
from cifarviz.ui import app
from cifarviz.ui.evaluate_view import accuracy_so_far, calibration_section, confusion_spec
from cifarviz.ui.text import md, shown

dataset, checkpoint = app.data_and_checkpoint_page("Evaluate", training_images=False)
classes = list(dataset.classes)

app.linked("split", "eval_split", choices=("test", "val"), default="test")
split = st.segmented_control("Split", ["test", "val"], key="eval_split", required=True)
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
# a first estimate within seconds, then the plain predictions, then the flip-averaged ones
arts = app.get_artifacts(checkpoint, dataset, split, early=True,
                         preview=accuracy_so_far(data.labels, split, split_tta(checkpoint, split)))
describe(arts.tta)


@st.cache_data(show_spinner=False, max_entries=32)
def report_for(path: str, stamp: float, root: str, split: str, tta: str):
    a = app._artifacts(path, stamp, root, split, tta)
    report = classification_report(a.labels, a.predicted, app.get_dataset(root).classes)
    bins, ece = reliability(a.probs, a.labels)
    return report, bins, ece


report, bins, ece = report_for(str(checkpoint.path), app.file_stamp(checkpoint.path), dataset.root.as_posix(), split,
                               arts.tta)
confusion = np.array(report["confusion_matrix"])

m1, m2, m3, m4 = st.columns(4)
m1.metric("Accuracy", f"{report['accuracy']:.2%}", help=f"{len(data):,} {split} images of {dataset.root}")
m2.metric("Macro F1", f"{report['macro']['f1']:.3f}")
m3.metric("Calibration error", f"{ece:.3f}", help="Expected calibration error (ECE): the average gap between "
          "confidence and accuracy, over confidence bins")
m4.metric("Mistakes", f"{int((arts.predicted != arts.labels).sum()):,}")

CELL_SHOWN = 24  # images of a cell drawn at once (the export has them all)
st.session_state.setdefault("cm_true", "cat" if "cat" in classes else classes[0])
st.session_state.setdefault("cm_pred", "dog" if "dog" in classes else classes[-1])
linked_true, _, linked_pred = (app.from_link("cell") or "").partition(",")  # a link: "cell=cat,dog"
if linked_true in classes and linked_pred in classes:
    st.session_state["cm_true"], st.session_state["cm_pred"] = linked_true, linked_pred
    st.session_state["cm_chart_round"] = st.session_state.get("cm_chart_round", 0) + 1  # not the chart's old click


def _cell_picked_by_hand() -> None:
    """The dropdowns changed: start the chart afresh, so a click on any cell (even the last one) applies again."""
    st.session_state["cm_chart_round"] = st.session_state.get("cm_chart_round", 0) + 1


st.subheader("Confusion matrix")
matrix, images = st.columns([1.1, 1], gap="medium")  # the cell's images beside the matrix: in view after a click
chart_key = f"confusion-{st.session_state.get('cm_chart_round', 0)}"
# The click arrives in session state before this rerun draws the chart: apply it first, so the outline is drawn
# on the cell just clicked (read after the chart, it lagged one click behind).
clicked = ((st.session_state.get(chart_key) or {}).get("selection") or {}).get("cell") or [None]
if clicked[0] and clicked[0].get("true") in classes and clicked[0].get("predicted") in classes:
    st.session_state["cm_true"], st.session_state["cm_pred"] = clicked[0]["true"], clicked[0]["predicted"]
with matrix:
    app.linked("norm", "cm_by_row", parse=lambda text: {"row": True, "count": False}.get(text), default=False,
               format=lambda on: "row" if on else "")
    by_row = st.toggle("Share of each true class", key="cm_by_row",
                       help="Each row sums to 100%: the diagonal is each class's recall. Off: image counts.")
    st.caption("Rows: true class, columns: predicted class" + (" (percent of the row)" if by_row else "")
               + ". Click a cell to see its images on the right.")
    st.vega_lite_chart(spec=confusion_spec(confusion, tuple(classes), (st.session_state["cm_true"],
                                                                       st.session_state["cm_pred"]), by_row=by_row),
                       on_select="rerun", width="stretch", key=chart_key)
with images:
    a, b = st.columns(2)
    true_name = a.selectbox("True class", classes, key="cm_true", on_change=_cell_picked_by_hand, format_func=shown)
    pred_name = b.selectbox("Predicted class", classes, key="cm_pred", on_change=_cell_picked_by_hand,
                            format_func=shown)
    t, p = classes.index(true_name), classes.index(pred_name)
    app.show_in_link("cell", f"{true_name},{pred_name}")
    cell = confusion_cell_indices(arts.labels, arts.predicted, t, p)
    cell = cell[np.argsort(-arts.probs[cell, p], kind="stable")]
    st.caption(f"**{int(confusion[t, p]):,}** {split} images are {md(true_name)} predicted as {md(pred_name)}"
               + (f" (the {CELL_SHOWN} most confident first)" if len(cell) > CELL_SHOWN else "")
               + "; the percentage is the model's confidence in the predicted class.")
    app.image_grid(data.images[cell[:CELL_SHOWN]], [ImageRef(split, int(i)) for i in cell[:CELL_SHOWN]],
                   [f"#{i} {arts.probs[i, p]:.0%}" for i in cell[:CELL_SHOWN]], key="cell", tile_width=84)
    app.export_buttons(lambda: selection_rows(dataset, split, cell, arts.probs), key="cell",
                       name=f"{checkpoint.name}-{split}-{true_name}-as-{pred_name}",
                       about={"view": "confusion cell", "true": true_name, "predicted": pred_name})

st.subheader("Per-class precision, recall, F1")
per_class = pd.DataFrame(report["per_class"])
per_class[["precision", "recall", "f1"]] *= 100  # one format for every cell: 86.0%, never 86% beside 88.3%
share = st.column_config.NumberColumn(format="%.1f%%")
st.dataframe(per_class, hide_index=True,  # auto height: the ten classes, no empty row
             column_config={"precision": share, "recall": share, "f1": share,
                            "support": st.column_config.NumberColumn(format="localized")})

st.subheader("Most confident mistakes")
everything_wrong = misclassified_by_confidence(arts.probs, arts.labels)
wrong = everything_wrong[:24]
app.image_grid(data.images[wrong], [ImageRef(split, int(i)) for i in wrong],
               [f"{md(classes[arts.labels[i]])} → {md(classes[arts.predicted[i]])} {arts.probs[i].max():.0%}" for i in wrong],
               key="mistakes", tile_width=120)
app.export_buttons(lambda: selection_rows(dataset, split, everything_wrong, arts.probs), key="mistakes",
                   name=f"{checkpoint.name}-{split}-mistakes", about={"view": "mistakes, most confident first"})

st.subheader("Most confused pairs")
st.dataframe(pd.DataFrame(most_confused_pairs(confusion, classes, top=8))[["pair", "count"]], hide_index=True)
calibration_section(checkpoint, dataset)

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
