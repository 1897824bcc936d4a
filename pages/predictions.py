import streamlit as st

from cifarviz.analysis.explore import ImageRef
from cifarviz.ui import app
from cifarviz.ui.predictions_view import export_rows, filtered, filters, full_table, groups, page_number, table
from cifarviz.ui.tagging import relabel_export, tag_many
from cifarviz.ui.text import md

dataset, checkpoint = app.data_and_checkpoint_page("Predictions", training_images=False)
classes = list(dataset.classes)
app.linked("split", "pred_split", choices=("test", "val", "train"), default="test")
split = st.segmented_control("Split", ["test", "val", "train"], key="pred_split", required=True,
                             help="train: the training images as the final model sees them (no augmentation)")
arts = app.get_artifacts(checkpoint, dataset, split)
frame, temperature = full_table(checkpoint, dataset, split, arts)
st.caption(f"Every prediction of **{md(checkpoint.name)}** on the **{len(frame):,} {split} images** of "
           f"{md(dataset.root.name)}" + (" with flip test-time augmentation" if arts.tta == "flip" else "")
           + ". Loss is the plain cross-entropy of the true class (no label smoothing), margin is the true "
           "class's logit minus the largest other" + (f"; calibrated: temperature-scaled, T = {temperature:.2f}"
                                                      if temperature is not None else "") + ".")

chosen = filters(classes)
rows = filtered(frame, chosen, split)
right = int(rows["correct"].sum())
st.markdown(f"**{len(rows):,}** of {len(frame):,} images match"
            + (f": {right:,} right, {len(rows) - right:,} wrong." if len(rows) else "."))

if chosen["group"]:
    groups(rows)
elif len(rows):
    st.caption("Click a row to open the image in the inspector.")
    table(rows, dataset.split(split).images, split, page_number(len(rows)))
else:
    st.info("No image passes these filters: widen the confidence range or clear a class.")

with st.container(horizontal=True, vertical_alignment="bottom", gap="medium"):
    st.markdown(f"**Export the {len(rows):,} rows**")
    app.export_buttons(lambda: export_rows(rows, split, dataset), key="predictions",
                       name=f"{checkpoint.name}-{split}-predictions",
                       about={"view": "predictions", "split": split, "filters": {
                           k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in chosen.items()}})
with st.expander("Tags and the relabel list", icon=":material/sell:"):
    tag_many(dataset, [ImageRef(split, int(i)) for i in rows["index"]], key="predictions",
             what=f"all {len(rows):,} filtered images")
    relabel_export(dataset, {split: arts.predicted})

app.inspector(dataset, checkpoint)
