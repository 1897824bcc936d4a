import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
import torch

from cifarviz import app
from cifarviz.augment import AugmentConfig, augment_batch, to_float
from cifarviz.explore import ImageRef, channel_histograms, class_mean_images, filter_indices, sample_per_class, to_png

app.sidebar()
st.title("Dataset")
dataset = app.current_dataset()
if dataset is None:
    st.stop()
classes = list(dataset.classes)


@st.cache_data(show_spinner=False)
def statistics(root: str, fingerprint: str):
    ds = app.get_dataset(root)
    counts = pd.DataFrame([{"split": s, "class": c, "images": int((ds.split(s).labels == i).sum())}
                           for s in ("train", "val", "test") for i, c in enumerate(ds.classes)])  # fmt: skip
    histograms = channel_histograms(ds.train.images[::5])  # every 5th training image: the same shape, 5x faster
    hist = pd.DataFrame([{"channel": ch, "value": int(v * 8), "count": int(n)}
                         for ch, counts_ in histograms.items() for v, n in enumerate(counts_)])  # fmt: skip
    return counts, hist, class_mean_images(ds.train.images, ds.train.labels, len(ds.classes))


counts, hist, means = statistics(dataset.root.as_posix(), dataset.fingerprint)
overview, samples, stats, augmentation, browser = st.tabs(
    ["Class counts", "Samples", "Statistics", "Augmentation", "Browser"])

with overview:
    st.markdown(f"**{len(dataset.train):,}** training, **{len(dataset.val):,}** validation and "
                f"**{len(dataset.test):,}** test images from `{dataset.root}` ({dataset.layout}); "
                f"the validation images are split off the training set with seed {dataset.split_seed}.")
    st.altair_chart(alt.Chart(counts).mark_bar().encode(
        x=alt.X("class:N", sort=classes), y="images:Q", color="split:N", xOffset="split:N",
        tooltip=["split", "class", "images"]).properties(height=300), width="stretch")

with samples:
    left, right = st.columns([3, 1])
    shown = left.multiselect("Classes", classes, default=classes, key="sample_classes")
    if right.button("Reshuffle", icon=":material/shuffle:"):
        st.session_state["sample_seed"] = st.session_state.get("sample_seed", 0) + 1
    per_class = sample_per_class(dataset.train.labels, 8, st.session_state.get("sample_seed", 0))
    for name in shown:
        c = classes.index(name)
        st.markdown(f"**{name}**")
        idx = per_class[c]
        app.image_grid(dataset.train.images[idx], [ImageRef("train", int(i)) for i in idx],
                       [f"#{i}" for i in idx], key=f"sample-{name}", columns=8)

with stats:
    a, b = st.columns(2)
    a.markdown("**Per-channel mean / std (training split, pixel values in [0, 1])**")
    a.dataframe(pd.DataFrame({"channel": ["red", "green", "blue"], "mean": dataset.mean, "std": dataset.std}),
                hide_index=True)
    b.markdown("**Pixel histograms (training split)**")
    b.altair_chart(alt.Chart(hist).mark_line().encode(
        x=alt.X("value:Q", title="pixel value"), y="count:Q",
        color=alt.Color("channel:N", scale=alt.Scale(domain=["red", "green", "blue"], range=["#d62728", "#2ca02c", "#1f77b4"]))
    ).properties(height=220), width="stretch")
    st.markdown("**The mean image of each class**: the average of all its training pictures")
    cols = st.columns(len(classes))
    for col, name, image in zip(cols, classes, means):
        col.image(to_png(image, scale=4), caption=name, width="stretch")

with augmentation:
    st.markdown("The training engine's own batched augmentations, applied to a few training images.")
    c1, c2, c3, c4 = st.columns(4)
    config = AugmentConfig(translate=c1.slider("Translate (pixels)", 0, 8, 2), flip=c2.checkbox("Flip", True),
                           rotate=c3.slider("Rotate (degrees)", 0, 90, 0), color_jitter=c4.slider("Colour jitter", 0.0, 0.5, 0.0))
    seed = st.session_state.get("sample_seed", 0)
    idx = np.random.default_rng(seed).choice(len(dataset.train), 8, replace=False)
    batch = to_float(torch.from_numpy(dataset.train.images[idx]))
    rows = [dataset.train.images[idx]]
    for k in range(3):
        out = augment_batch(batch, config, torch.Generator().manual_seed(seed * 10 + k))
        rows.append((out.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    for label, row in zip(["original", "augmented 1", "augmented 2", "augmented 3"], rows):
        st.caption(label)
        cols = st.columns(8)
        for col, image in zip(cols, row):
            col.image(to_png(image, scale=3), width="stretch")

with browser:
    a, b, c = st.columns([1, 3, 1])
    split = a.selectbox("Split", ["train", "val", "test"], key="browse_split")
    chosen = b.multiselect("Classes", classes, key="browse_classes", placeholder="all classes")
    data = dataset.split(split)
    idx = filter_indices(data.labels, [classes.index(x) for x in chosen])
    per_page = 32
    pages = max(1, -(-len(idx) // per_page))
    page = c.number_input(f"Page (of {pages})", 1, pages, 1, key="browse_page")
    page_idx = idx[(page - 1) * per_page : page * per_page]
    st.caption(f"{len(idx):,} images")
    app.image_grid(data.images[page_idx], [ImageRef(split, int(i)) for i in page_idx],
                   [f"{classes[data.labels[i]]} #{i}" for i in page_idx], key="browse", columns=8)

app.inspector(dataset, app.current_checkpoint(quiet=True))
