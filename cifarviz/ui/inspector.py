"""The image inspector every image opens: the picture, its probabilities, Grad-CAM, its nearest training
images and the training images that most influenced it."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from cifarviz.analysis.calibration import scaled_probabilities
from cifarviz.analysis.explore import ImageRef, nearest_neighbours, overlay_heatmap, to_png
from cifarviz.analysis.influence import METHODS, default_method, method_choice
from cifarviz.analysis.saliency import METHODS as ATTRIBUTIONS
from cifarviz.ui.tagging import tag_box
from cifarviz.analysis.saliency import attribution, conv_layers, default_cam_layer
from cifarviz.core.checkpoint import Checkpoint
from cifarviz.core.inference import predict
from cifarviz.store.artifacts import split_tta
from cifarviz.ui import links
from cifarviz.ui.evaluate_view import CALIBRATED_KEY, calibrated_switch
from cifarviz.ui.loaders import (
    artifacts_job,
    artifacts_ready,
    calibration_now,
    file_stamp,
    get_artifacts,
    influence_index_now,
    influence_job,
    influence_of,
    needs_asking,
    prefetch,
    progress_bar,
    time_left,
)
from cifarviz.ui.text import md, shown
from cifarviz.ui.widgets import INSPECT_KEY, close_inspector, image_grid


def inspector(dataset, checkpoint: Checkpoint | None) -> None:
    """Open the image inspector if an image was clicked. Every page calls this once, at its end; it also
    starts computing, in the background, the features the inspector's neighbours need."""
    prefetch(checkpoint, dataset)
    links.publish()  # the page's view, now complete, into the address bar
    if st.session_state.get(INSPECT_KEY) is not None and dataset is not None:
        _inspector_dialog(dataset, checkpoint)


@st.dialog("Image inspector", width="large", on_dismiss=close_inspector)
def _inspector_dialog(dataset, checkpoint: Checkpoint | None) -> None:
    # Read the image from session state, not from arguments: a click on a neighbour reruns only this dialog.
    ref: ImageRef | None = st.session_state.get(INSPECT_KEY)
    if ref is None:
        return
    if ref.split == "upload":
        image, label = st.session_state.get("uploaded_image"), None
        if image is None:
            return
    else:
        split = dataset.split(ref.split)
        if not 0 <= ref.index < len(split):
            return
        image, label = split.images[ref.index], int(split.labels[ref.index])
    classes = list(dataset.classes)

    with st.container(key="inspector"):
        title = f"{ref.split.capitalize()} image #{ref.index}" if ref.split != "upload" else "Your uploaded image"
        st.markdown(f"#### {title}")
        left, middle, right = st.columns([1, 1.5, 1.1])
        with left:
            st.image(to_png(image, scale=8), width="stretch", output_format="PNG")
            if label is not None:
                st.markdown(f"**True label:** {md(classes[label])}")
        if checkpoint is None:
            st.info("Pick a checkpoint in the sidebar to see the model's prediction.")
            return
        probs = image_probabilities(checkpoint, dataset, ref, image)
        predicted = int(probs.argmax())
        verdict = "" if label is None else (" — correct" if predicted == label else " — wrong")
        with left:
            calibration = None
            if calibrated_switch("inspector", "Calibrated"):
                calibration = calibration_now(checkpoint, dataset)
                if calibration is not None:
                    probs = scaled_probabilities(probs[None], calibration.temperature)[0]
            st.markdown(f"**Predicted:** {md(classes[predicted])} ({probs[predicted]:.1%}){verdict}")
            how = [f"by {md(checkpoint.name)}"] + (["with flip test-time augmentation"]
                                                   if _tta(checkpoint, ref) == "flip" else [])
            if st.session_state.get(CALIBRATED_KEY):
                how.append(f"temperature-scaled, T = {calibration.temperature:.2f} fitted on the validation split"
                           if calibration is not None else "(calibration waits for the validation predictions)")
            st.caption(", ".join(how))
            tag_box(dataset, ref)
        with middle:
            chart = probability_chart(probs, classes, predicted, checkpoint.name)
            st.altair_chart(chart, width="stretch", height=PROBABILITY_CHART_HEIGHT)
        with right:
            explained = st.selectbox("Evidence for", classes, index=predicted, key=f"cam-{ref.split}-{ref.index}",
                                     format_func=shown,
                                     help="Defaults to the predicted class; pick another to see its evidence.")
            target = classes.index(explained)
            method, layer = attribution_choice(checkpoint, image)
            note = "the predicted class" if target == predicted else "not the predicted class"
            st.image(saliency_png(checkpoint, str(checkpoint.path), file_stamp(checkpoint.path), image, target,
                                  method, layer),
                     width="stretch", output_format="PNG",
                     caption=f"Where the model found evidence for '{md(classes[target])}' ({note}), by "
                             f"{ATTRIBUTIONS[method]}" + (f" at {layer}" if layer else ""))
        if ref.split != "upload":
            st.markdown("**Nearest training images in the model's feature space** (cosine similarity)")
            neighbours_section(checkpoint, dataset, ref, image)
        if ref.split == "test":
            st.markdown("**Most influential training images** (head influence: removing a *helpful* image "
                        "would raise this image's loss; removing a *harmful* one would lower it)")
            influence_section(checkpoint, dataset, ref)
        if st.button("Close", key="inspector-close", icon=":material/close:"):
            close_inspector()
            st.rerun()


ATTRIBUTION_KEY, CAM_LAYER_KEY = "attribution_method", "cam_layer"  # one choice for every image of the session


def attribution_choice(checkpoint: Checkpoint, image: np.ndarray) -> tuple[str, str | None]:
    """The map's method (Grad-CAM, or Captum's Integrated Gradients or occlusion) and, for Grad-CAM, the layer:
    the checkpoint's convolutions, deepest map of at least 4x4 first offered."""
    method = st.selectbox("Explained by", list(ATTRIBUTIONS), format_func=lambda m: ATTRIBUTIONS[m], key=ATTRIBUTION_KEY,
                          help="Grad-CAM: a layer's activations weighted by the class's gradient (coarse, one "
                               "backward pass). Integrated Gradients and occlusion (computed by Captum): per "
                               "pixel, how much it adds to the class's score; painting over the pixels they rank "
                               "highest costs the model far more confidence than the lowest (tests/test_saliency.py).")
    if method != "grad-cam":
        return method, None
    layers = cam_layers(checkpoint, str(checkpoint.path), file_stamp(checkpoint.path), image.shape)
    names = [name for name, _ in layers]
    if st.session_state.get(CAM_LAYER_KEY) not in names:  # a new checkpoint: its own default layer
        st.session_state[CAM_LAYER_KEY] = default_cam_layer(layers)
    sizes = dict(layers)
    layer = st.selectbox("Layer", names, key=CAM_LAYER_KEY, format_func=lambda n: f"{n} ({sizes[n][1]}x{sizes[n][2]})",
                         help="Earlier layers see edges and textures at fine resolution; later ones see parts of "
                              "objects on a coarse grid.")
    return method, layer


@st.cache_data(show_spinner=False, max_entries=64)
def cam_layers(_checkpoint: Checkpoint, path: str, stamp: float, shape: tuple) -> list[tuple[str, tuple]]:
    return conv_layers(_checkpoint.model, np.zeros(shape, dtype=np.uint8))


@st.cache_data(show_spinner=False, max_entries=1024)  # ~20 KB each; a class opens the same images again and again
def saliency_png(_checkpoint: Checkpoint, path: str, stamp: float, image: np.ndarray, target: int,
                 method: str = "grad-cam", layer: str | None = None) -> bytes:
    """The attribution overlay of `image` for class `target`, enlarged, as PNG (keyed by the checkpoint file, not
    the model object)."""
    heat = attribution(method, _checkpoint.model, image, target, layer=layer)
    return to_png(overlay_heatmap(image, heat), scale=8)


def _tta(checkpoint: Checkpoint, ref: ImageRef) -> str:
    return checkpoint.tta if ref.split == "upload" else split_tta(checkpoint, ref.split)


def image_probabilities(checkpoint: Checkpoint, dataset, ref: ImageRef, image: np.ndarray) -> np.ndarray:
    """The class probabilities the pages show for this image: from the split's artifacts when they are ready
    (the same numbers as Evaluate), else computed for this one image with the same test-time augmentation."""
    if ref.split != "upload" and artifacts_ready(checkpoint, dataset, ref.split):
        return get_artifacts(checkpoint, dataset, ref.split).probs[ref.index]
    return predict(checkpoint.model, image[None], tta=_tta(checkpoint, ref), features=False).probs[0]


PROBABILITY_CHART_HEIGHT = 330  # every class label readable on a projector


def probability_chart(probs: np.ndarray, classes: list[str], predicted: int, model_name: str) -> alt.Chart:
    frame = pd.DataFrame({"class": classes, "probability": probs})
    return alt.Chart(frame, title=alt.Title(f"Class probabilities ({model_name})", fontSize=15)).mark_bar().encode(
        x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%", labelFontSize=13)),
        y=alt.Y("class:N", sort=classes, title=None,
                axis=alt.Axis(labelFontSize=14, labelOverlap=False, labelLimit=200)),
        color=alt.condition(alt.datum["class"] == classes[predicted], alt.value("#d62728"), alt.value("#4c78a8")),
        tooltip=["class", alt.Tooltip("probability:Q", format=".2%")],
    ).properties(height=PROBABILITY_CHART_HEIGHT - 40)


def neighbours_section(checkpoint: Checkpoint, dataset, ref: ImageRef, image: np.ndarray, k: int = 8) -> None:
    """The k training images nearest to `ref`: at once when the training features are ready, else a progress
    bar that fills in by itself (the rest of the inspector is already usable)."""
    job = artifacts_job(checkpoint, dataset, "train")
    if job is None:
        idx, sims = nearest_training_images(checkpoint, dataset, ref, image, k)
        refs = [ImageRef("train", int(i)) for i in idx]
        captions = [f"{md(dataset.classes[dataset.train.labels[i]])} {s:.2f}" for i, s in zip(idx, sims)]
        image_grid(dataset.train.images[idx], refs, captions, key="neighbours", tile_width=96)
        return

    progress_bar(job, f"Computing the features of the {len(dataset.train):,} training images (once per checkpoint, "
                 "for everyone)")


def influence_section(checkpoint: Checkpoint, dataset, ref: ImageRef, k: int = 4) -> None:
    """The inspector's top-k helpful and harmful training images for a test image: the method picked on the
    Influence page for this checkpoint, else the checkpoint's measured default (default_method)."""
    chosen = st.session_state.get("influence_method")
    if st.session_state.get("influence_method_of") != str(checkpoint.path) or chosen not in METHODS:
        chosen = default_method(checkpoint)
    if needs_asking(chosen, checkpoint, dataset):  # minutes of work that nobody asked for: the Influence page asks
        chosen = method_choice(checkpoint).quick
    job = influence_job(chosen, checkpoint, dataset, background=METHODS[chosen].needs_members)
    if job is not None and not METHODS[chosen].needs_members:
        progress_bar(job, "Building the influence index (once per checkpoint, for everyone)")
        return
    _, method, building = influence_index_now(chosen, checkpoint, dataset)
    result = influence_of(method, checkpoint, dataset, test_index=ref.index, k=k)
    if building is not None:
        st.caption(f"{METHODS[method].title} until the {METHODS[chosen].title} index is built{time_left(building)}.")
    helpful, harmful = st.columns(2)
    with helpful:
        st.caption("Helpful")
        influence_grid(dataset, result.helpful, key="inspector-helpful", tile_width=96)
    with harmful:
        st.caption("Harmful")
        influence_grid(dataset, result.harmful, key="inspector-harmful", tile_width=96)


def influence_grid(dataset, entries, key: str, tile_width: int = 112) -> None:
    """Training images of an influence result, each opening the inspector: label, prediction, score."""
    idx = np.array([e.train_index for e in entries], dtype=np.int64)
    # A no-break space after the arrow: a narrow tile breaks between label, "→ prediction" and score, never
    # inside a word or before a bracket ("(pred. automobile" / ") +2.0×10⁻³" was what it showed).
    captions = [md(e.label) + ("" if e.predicted == e.label else f" →\u00a0{md(e.predicted)}") + " "
                + readable_score(e.score) for e in entries]
    image_grid(dataset.train.images[idx], [ImageRef("train", int(i)) for i in idx], captions, key=key,
               tile_width=tile_width)


SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def readable_score(score: float) -> str:
    """A signed influence score for a caption: `+1.3×10⁻⁴`, not `+0.00013` or `-6e-05` (which a narrow tile breaks
    at its hyphen)."""
    if score == 0 or not np.isfinite(score):
        return f"{score:+g}"
    exponent = int(np.floor(np.log10(abs(score))))
    if -2 <= exponent <= 2:
        return f"{score:+.2g}".replace("-", "−")
    mantissa = round(abs(score) / 10.0**exponent, 1)
    if mantissa >= 10:  # 9.96e-05 rounds up to 1.0×10⁻⁴, not 10.0×10⁻⁵
        mantissa, exponent = mantissa / 10, exponent + 1
    return f"{'+' if score > 0 else '−'}{mantissa:.1f}×10{str(exponent).translate(SUPERSCRIPT)}"


def nearest_training_images(checkpoint: Checkpoint, dataset, ref: ImageRef, image: np.ndarray, k: int = 8):
    """(indices, cosine similarities) of the k nearest training images in the model's feature space."""
    if artifacts_ready(checkpoint, dataset, ref.split):
        query = get_artifacts(checkpoint, dataset, ref.split).features[ref.index]
    else:
        query = predict(checkpoint.model, image[None], features=True).features[0]
    bank = get_artifacts(checkpoint, dataset, "train").unit_features
    return nearest_neighbours(query, bank, k=k, exclude=ref.index if ref.split == "train" else None, unit_bank=True)
