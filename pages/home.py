from pathlib import Path

import pandas as pd
import streamlit as st

from cifarviz.analysis.summary import describe_args, model_for_summary, shipped_checkpoints
from cifarviz.core.checkpoint import read_metadata, shipped_files
from cifarviz.core.models import list_models
from cifarviz.ui import app
from cifarviz.ui.lesson import lesson_path

app.sidebar()
st.title("cifarviz: watch a CNN learn CIFAR-10")
st.markdown(
    "Explore the CIFAR-10 images, the networks of five classic student projects plus one modern fast network, how "
    "they are wrong, and why. **Every image is clickable**: it opens the *image inspector* with the picture "
    "enlarged, the model's class probabilities, a Grad-CAM saliency map and its nearest training images.")

st.subheader("A lesson in five steps")
st.caption("Pick the checkpoint in the sidebar, then follow the steps; each opens its page with a view chosen for "
           "it. **Models** compares the architectures (BatchNorm vs GroupNorm vs LayerNorm, plain vs residual). "
           "Every page's *Link to this view* (sidebar) puts what you see on the board. Before class, warm every "
           "cache: `python -m cifarviz precompute --checkpoint fastnet`.")
dataset = app.current_dataset(required=False, training_images=False)
checkpoint = app.current_checkpoint(quiet=True, dataset=dataset) if dataset is not None else None
lesson_path(checkpoint, dataset)
# The lesson's next pages need the checkpoint's predictions: started now, in the background (at the lowest
# priority), so Evaluate has them when the class gets there instead of computing on a busy machine then.
app.prefetch(checkpoint, dataset)

st.subheader("Data")
st.markdown(app.data_status(st.session_state.get("data_root", "")))

st.subheader("Checkpoint zoo")


@st.cache_data(show_spinner=False)
def zoo(stamps: tuple) -> pd.DataFrame:  # stamps: a replaced checkpoint is read again
    """One row per shipped checkpoint, every figure read from the checkpoint itself."""
    rows = []
    for row in shipped_checkpoints():
        meta = read_metadata(row["path"])
        measured = (meta.get("metrics") or {}).get("measured_on") or {}
        test_images = (measured.get("sizes") or {}).get("test")
        device = meta.get("device")
        rows.append({
            "model": row["name"],
            "parameters": row["parameters"],
            "arguments": describe_args(model_for_summary(row["path"])) if row["arch_args"] else "defaults",
            "test accuracy": row["test_accuracy"],
            "measured on": (f"{Path(measured['root']).name}, {test_images:,} test images"
                            if measured.get("root") and test_images else None),
            "epochs": (meta.get("train_config") or {}).get("epochs"),
            "minutes": meta["train_seconds"] / 60 if meta.get("train_seconds") else None,
            "device": f"{device} ({meta['cpu_threads']} threads)" if meta.get("cpu_threads") and device == "cpu"
                      else device,
        })  # fmt: skip
    if not rows:
        return pd.DataFrame()
    order = {name: i for i, name in enumerate(list_models())}  # the zoo's order: classic nets first, fastnet last
    return pd.DataFrame(rows).sort_values("model", key=lambda m: m.map(order), kind="stable", ignore_index=True)


table = zoo(tuple((p.name, app.file_stamp(p)) for p in shipped_files()))
if table.empty:
    st.info("No shipped checkpoints found in checkpoints/.")
else:
    # A column with one value for every checkpoint is a sentence, not a column: the table fits a projector.
    same = [c for c in ("measured on", "device") if table[c].notna().all() and table[c].nunique() == 1]
    table["test accuracy"] *= 100  # two decimals everywhere: "75.00%", as the Models page shows it, not "75%"
    st.dataframe(table.drop(columns=same), hide_index=True, placeholder="—", height=35 * (len(table) + 1) + 3,
                 column_config={
        "test accuracy": st.column_config.NumberColumn(format="%.2f%%"),
        "parameters": st.column_config.NumberColumn(format="localized"),
        "minutes": st.column_config.NumberColumn(format="%.1f", help="Training time in minutes"),
    })  # fmt: skip
    if same:
        said = {"measured on": "test accuracy measured on", "device": "trained on"}
        st.caption("Every checkpoint: " + "; ".join(f"{said[c]} {table[c].iat[0]}" for c in same) + ".")
app.publish_link()
