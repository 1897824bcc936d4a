import streamlit as st

from cifarviz import app

app.sidebar()
st.title("cifarviz: watch a CNN learn CIFAR-10")
st.markdown(
    """
Explore the CIFAR-10 images, the networks of five classic student projects plus one modern fast network,
how they are wrong, and why. **Every image is clickable**: its button opens the *image inspector* with the
picture enlarged, the model's class probabilities, a Grad-CAM saliency map and its nearest training images.

**In class** (one server, many students): pick the checkpoint in the sidebar, then walk through
1. **Dataset** — what the ten classes look like, their statistics, what augmentation does to a picture;
2. **Evaluate** — accuracy, per-class precision/recall, the confusion matrix (click a cell to see those images),
   the most confident mistakes, calibration, and predictions on your own photos;
3. **Models** — the zoo, layer tables, training curves, BatchNorm vs GroupNorm vs LayerNorm, plain vs residual vs
   skip blocks, and parameters vs accuracy.

Warm every cache before class with `python -m cifarviz precompute --checkpoint fastnet`.
"""
)

st.subheader("Data")
st.markdown(app.data_status(st.session_state.get("data_root", "")))

st.subheader("Checkpoint zoo")
table = app.checkpoint_table()
if table.empty:
    st.info("No shipped checkpoints found in checkpoints/.")
else:
    st.dataframe(
        table,
        hide_index=True,
        column_config={"test accuracy": st.column_config.ProgressColumn(format="percent", min_value=0, max_value=1),
                       "parameters": st.column_config.NumberColumn(format="localized")},
    )
