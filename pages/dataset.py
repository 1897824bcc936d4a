import numpy as np
import pandas as pd
import streamlit as st
import torch

from cifarviz.analysis.explore import (
    ImageRef,
    channel_histograms,
    class_mean_images,
    filter_indices,
    sample_per_class,
    to_png,
)
from cifarviz.core.augment import AugmentConfig, augment_batch, to_float
from cifarviz.ui import app, charts
from cifarviz.ui.text import md, shown

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
# A click on an image inside a tab's fragment reruns only that fragment, but the inspector dialog is drawn by
# the full page (at its end): a full run notes the image shown, and a fragment that sees another reruns the page.
st.session_state["_inspected"] = st.session_state.get(app.INSPECT_KEY)


def open_clicked_image() -> None:
    if st.session_state.get(app.INSPECT_KEY) != st.session_state.get("_inspected"):
        st.rerun()


def reroll(key: str) -> None:
    st.session_state[key] = st.session_state.get(key, 0) + 1


@st.fragment
def samples_tab() -> None:
    picked = st.pills("Classes", classes, selection_mode="multi", default=classes, key="sample_classes", wrap=True,
                    format_func=md)
    st.button("Reshuffle", icon=":material/shuffle:", key="sample_reshuffle", on_click=reroll, args=("sample_seed",))
    per_class = sample_per_class(dataset.train.labels, 8, st.session_state.get("sample_seed", 0))
    for name in picked:
        idx = per_class[classes.index(name)]
        st.markdown(f"**{md(name)}**")
        app.image_grid(dataset.train.images[idx], [ImageRef("train", int(i)) for i in idx], [f"#{i}" for i in idx],
                       key=f"sample-{name}", tile_width=96)
    open_clicked_image()


@st.fragment
def augmentation_tab() -> None:
    st.markdown("The training engine's own batched augmentations, applied to a few training images.")
    c1, c2 = st.columns(2)
    config = AugmentConfig(translate=c1.slider("Translate (pixels)", 0, 8, 2, key="augment_translate"),
                           rotate=c2.slider("Rotate (degrees)", 0, 90, 0, key="augment_rotate"),
                           color_jitter=c1.slider("Colour jitter", 0.0, 0.5, 0.0, key="augment_jitter"),
                           flip=c2.checkbox("Flip left-right", True, key="augment_flip"))  # fmt: skip
    b1, b2, _ = st.columns([1, 1, 2])
    b1.button("Re-roll", icon=":material/casino:", key="augment_reroll", on_click=reroll, args=("augment_seed",),
              help="New random augmentations of the same images", width="stretch")
    b2.button("Other images", icon=":material/shuffle:", key="augment_images", on_click=reroll,
              args=("augment_images_seed",), width="stretch")
    if len(dataset.train) == 0:
        st.info("This data has no training images to augment.")
        return
    rng = np.random.default_rng(st.session_state.get("augment_images_seed", 0))
    idx = rng.choice(len(dataset.train), min(8, len(dataset.train)), replace=False)  # a tiny folder: all it has
    batch = to_float(torch.from_numpy(dataset.train.images[idx]))
    generator = torch.Generator().manual_seed(st.session_state.get("augment_seed", 0))
    rows = [dataset.train.images[idx]] + [
        (augment_batch(batch, config, generator).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        for _ in range(3)]  # fmt: skip
    for label, row in zip(["original", "augmented 1", "augmented 2", "augmented 3"], rows):
        st.caption(label)
        for col, image in zip(st.columns(8), row):
            col.image(to_png(image, scale=3), width="stretch", output_format="PNG")


@st.fragment
def browser_tab() -> None:
    a, b, c = st.columns([1, 3, 1])
    split = a.selectbox("Split", ["train", "val", "test"], key="browse_split")
    chosen = b.multiselect("Classes", classes, key="browse_classes", placeholder="all classes", format_func=shown)
    data = dataset.split(split)
    idx = filter_indices(data.labels, [classes.index(x) for x in chosen])
    per_page = 32
    pages = max(1, -(-len(idx) // per_page))
    page = c.number_input(f"Page (of {pages:,})", 1, pages, 1, key="browse_page")
    page_idx = idx[(page - 1) * per_page : page * per_page]
    st.caption(f"{len(idx):,} images")
    # Short captions fit a projector's narrow columns; the inspector shows the image's number.
    app.image_grid(data.images[page_idx], [ImageRef(split, int(i)) for i in page_idx],
                   [md(classes[data.labels[i]]) for i in page_idx], key="browse", tile_width=112)
    open_clicked_image()


# Only the open tab is drawn (a tab switch reruns the page): five tabs of image tiles on every rerun were the
# slowest page for a class (170 tiles; p50 7 s with 30 viewers).
overview, samples, stats, augmentation, browser = st.tabs(
    app.linked_tab("dataset_tab", ["Class counts", "Samples", "Statistics", "Augmentation", "Browser"]),
    key="dataset_tab", on_change="rerun")

with overview:
    if overview.open:
        st.markdown(f"**{len(dataset.train):,}** training, **{len(dataset.val):,}** validation and "
                    f"**{len(dataset.test):,}** test images from {md(dataset.root)} ({dataset.layout}); "
                    f"the validation images are split off the training set with seed {dataset.split_seed}.")
        st.altair_chart(charts.class_counts(counts, classes), width="stretch")

with samples:
    if samples.open:
        samples_tab()

with stats:
    if stats.open:
        a, b = st.columns([1, 1.4])
        a.markdown("**Per-channel mean / std** (training split, pixel values in [0, 1])")
        a.dataframe(pd.DataFrame({"channel": ["red", "green", "blue"], "mean": dataset.mean, "std": dataset.std}),
                    hide_index=True,
                    column_config={c: st.column_config.NumberColumn(format="%.3f") for c in ("mean", "std")})
        b.markdown("**Pixel histograms** (training split)")
        b.altair_chart(charts.pixel_histograms(hist), width="stretch")
        st.markdown("**The mean image of each class**: the average of all its training pictures")
        for row in range(0, len(classes), 5):  # five per row: big enough to see, names never cut
            for col, name, image in zip(st.columns(5), classes[row : row + 5], means[row : row + 5]):
                col.image(to_png(image, scale=4), caption=md(name), width="stretch", output_format="PNG")

with augmentation:
    if augmentation.open:
        augmentation_tab()

with browser:
    if browser.open:
        browser_tab()

app.inspector(dataset, app.current_checkpoint(quiet=True, dataset=dataset))
