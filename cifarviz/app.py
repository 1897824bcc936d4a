"""The explorer's Streamlit helpers: the only module of cifarviz that imports Streamlit.

* cached loaders: datasets and models once per server (st.cache_resource), derived
  artifacts once per (checkpoint, data) on disk (cifarviz.artifacts), small tables
  once per server (st.cache_data);
* the sidebar that picks the data and the checkpoint for every page;
* reusable widgets: the clickable image grid and the image inspector every image opens.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from .artifacts import artifact_path, split_artifacts
from .checkpoint import SHIPPED_DIR, Checkpoint, load_checkpoint, read_metadata, save_checkpoint
from .data import default_data_root, detect_layout, load_cifar10, load_image_file
from .errors import CifarvizError
from .explore import ImageRef, grad_cam, nearest_neighbours, overlay_heatmap, to_png
from .inference import predict
from .utils import atomic_write, cache_dir

RUNS_DIR = Path(os.environ.get("CIFARVIZ_RUNS", "runs"))
PAGES = (  # (file, title, icon): the explorer's pages, in menu order
    ("pages/home.py", "Home", ":material/home:"),
    ("pages/dataset.py", "Dataset", ":material/photo_library:"),
    ("pages/evaluate.py", "Evaluate", ":material/fact_check:"),
    ("pages/models.py", "Models", ":material/account_tree:"),
)
INSPECT_KEY = "inspect"
UPLOAD_MAX_BYTES = 200 * 1024 * 1024


# --------------------------------------------------------------------------- cached loaders


@st.cache_resource(show_spinner="Loading CIFAR-10 (decoded once, then cached on disk)...")
def get_dataset(root: str):
    return load_cifar10(root, download=False, progress=False)


@st.cache_resource(show_spinner="Loading model...", max_entries=8)
def get_checkpoint(path: str, stamp: float) -> Checkpoint:  # stamp: a changed file is loaded again
    return load_checkpoint(path)


def get_artifacts(checkpoint: Checkpoint, dataset, split: str):
    """Predictions/features of a split: computed once ever (with a progress bar), then read from disk once
    per server. A lock stops 30 students who open the page together from computing it 30 times."""
    if not artifact_path(checkpoint, dataset, split).is_file():
        with _COMPUTE_LOCK:
            if not artifact_path(checkpoint, dataset, split).is_file():
                bar = st.progress(0.0, text=f"Computing {checkpoint.name} on the {split} split "
                                            "(first visit only; cached on disk)")
                split_artifacts(checkpoint, dataset, split, on_progress=bar.progress)
                bar.empty()
    return _artifacts(str(checkpoint.path), file_stamp(checkpoint.path), dataset.root.as_posix(), split)


_COMPUTE_LOCK = threading.Lock()


@st.cache_resource(show_spinner=False, max_entries=24)
def _artifacts(path: str, stamp: float, root: str, split: str):
    return split_artifacts(get_checkpoint(path, stamp), get_dataset(root), split)


def file_stamp(path) -> float:
    """Modification time, part of cache keys so a replaced checkpoint file is loaded again."""
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


# --------------------------------------------------------------------------- sidebar: data and checkpoint


def checkpoint_choices() -> dict[str, str]:
    """Label -> path for shipped checkpoints, the user's own runs, and this session's uploads."""
    choices = {}
    for folder, tag in ((SHIPPED_DIR, "shipped"), (RUNS_DIR, "your run")):
        for path in sorted(Path(folder).glob("*.safetensors")):
            choices[f"{path.stem} ({tag})"] = str(path)
    for label, path in st.session_state.get("uploaded_checkpoints", {}).items():
        choices[label] = path
    return choices


def _remember(key: str) -> None:
    st.session_state[f"_{key}"] = st.session_state[key]


def sidebar() -> None:
    """Data source and checkpoint pickers. Every page draws them first; their values are mirrored in
    session state (the usual multipage pattern), so a choice holds across pages."""
    st.session_state["data_root"] = st.session_state.get("_data_root") or str(default_data_root())
    choices = checkpoint_choices()
    labels = list(choices)
    wanted = st.session_state.pop("checkpoint_label_request", None) or st.session_state.get("_checkpoint_label")
    if wanted not in labels:
        wanted = next((label for label in labels if label.startswith("fastnet ")), labels[0] if labels else None)
    st.session_state["checkpoint_label"] = st.session_state["_checkpoint_label"] = wanted
    with st.sidebar:
        for path, title, icon in PAGES:
            st.page_link(path, label=title, icon=icon)
        st.divider()
        st.text_input("Data folder", key="data_root", on_change=_remember, args=("data_root",),
                      help="CIFAR-10 python archive folder or an image-folder tree (train/<class>, test/<class>). "
                           "Defaults to $CIFARVIZ_DATA, else ./data.")
        st.selectbox("Checkpoint", labels, key="checkpoint_label", on_change=_remember, args=("checkpoint_label",),
                     help="Shipped checkpoints, your runs (runs/), and checkpoints uploaded on the Models page.")


def current_dataset(required: bool = True):
    """The selected dataset, or None after drawing a page that explains how to get data."""
    root = st.session_state.get("data_root") or str(default_data_root())
    try:
        return get_dataset(root)
    except CifarvizError as exc:
        if required:
            no_data_help(root, str(exc))
        return None


def no_data_help(root: str, message: str) -> None:
    st.warning("No CIFAR-10 data here yet.", icon=":material/folder_off:")
    st.code(message, language=None)
    st.markdown(
        "**How to provide it**\n"
        "- Point the *Data folder* in the sidebar (or `CIFARVIZ_DATA`) at a copy of CIFAR-10: the python archive "
        "folder `cifar-10-batches-py/`, or an image-folder tree `train/<class>/*.png`, `test/<class>/*.png`.\n"
        "- Or download the original (170 MB) into the folder below."
    )
    if st.button("Download CIFAR-10 into " + str(Path(root).resolve()), key="download-data"):
        from .data import download_cifar10

        try:
            with st.spinner("Downloading and verifying CIFAR-10..."):
                download_cifar10(Path(root))
            get_dataset.clear()
            st.rerun()
        except CifarvizError as exc:
            st.error(str(exc))


def current_checkpoint(quiet: bool = False) -> Checkpoint | None:
    """The checkpoint picked in the sidebar; None (with a message unless `quiet`) when there is none."""
    label = st.session_state.get("checkpoint_label")
    path = checkpoint_choices().get(label) if label else None
    if not path:
        if not quiet:
            st.info("No checkpoint selected: train one (`python -m cifarviz train`) or upload one on the Models page.")
        return None
    try:
        return get_checkpoint(path, file_stamp(path))
    except CifarvizError as exc:
        if not quiet:
            st.error(str(exc))
        return None


def save_uploaded_checkpoint(name: str, data: bytes) -> tuple[str, Checkpoint]:
    """Validate an uploaded checkpoint (safely), keep it on disk, and offer it in the sidebar."""
    if len(data) > UPLOAD_MAX_BYTES:
        raise CifarvizError(f"{name} is {len(data) / 1e6:.0f} MB; the limit is {UPLOAD_MAX_BYTES / 1e6:.0f} MB.")
    checkpoint = load_checkpoint(name, data=data)  # raises CheckpointError with a clear message
    path = cache_dir() / "uploads" / f"{hashlib.sha256(data).hexdigest()[:16]}.safetensors"
    if Path(name).suffix.lower() == ".safetensors":
        with atomic_write(path) as fh:
            fh.write(data)
    else:  # a state dict: re-save as safetensors, so it loads like every other checkpoint
        save_checkpoint(path, checkpoint.model, {"name": Path(name).stem, "notes": f"uploaded as {name}"})
    label = f"{Path(name).stem} (uploaded)"
    st.session_state.setdefault("uploaded_checkpoints", {})[label] = str(path)
    return label, checkpoint


# --------------------------------------------------------------------------- image grid and inspector


def open_inspector(split: str, index: int) -> None:
    st.session_state[INSPECT_KEY] = ImageRef(split, int(index))


def close_inspector() -> None:
    st.session_state.pop(INSPECT_KEY, None)


def image_grid(images: np.ndarray, refs: list[ImageRef], captions: list[str], key: str, columns: int = 8) -> None:
    """A grid of images; each one's button opens it in the inspector."""
    if len(refs) == 0:
        st.caption("No images.")
        return
    for row_start in range(0, len(refs), columns):
        cols = st.columns(columns)
        for col, i in zip(cols, range(row_start, min(row_start + columns, len(refs)))):
            with col:
                st.image(to_png(images[i], scale=3), width="stretch")
                ref = refs[i]
                st.button(captions[i], key=f"{key}-{ref.split}-{ref.index}", on_click=open_inspector,
                          args=(ref.split, ref.index), help="Open in the image inspector", width="stretch")


def neighbours(checkpoint: Checkpoint, dataset, ref: ImageRef, k: int = 8):
    """The k training images nearest to `ref` in the model's feature space: (indices, cosine similarities)."""
    query = get_artifacts(checkpoint, dataset, ref.split).features[ref.index]
    bank = get_artifacts(checkpoint, dataset, "train").features  # computed once, with a progress bar
    return nearest_neighbours(query, bank, k=k, exclude=ref.index if ref.split == "train" else None)


def inspector(dataset, checkpoint: Checkpoint | None) -> None:
    """Open the image inspector if an image was clicked. Every page calls this once, at its end."""
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

    with st.container(key="inspector"):
        title = f"{ref.split} image #{ref.index}" if ref.split != "upload" else "your uploaded image"
        st.subheader(f"Image inspector: {title}")
        left, middle, right = st.columns([1, 1.4, 1.1])
        with left:
            st.image(to_png(image, scale=8), width="stretch")
            if label is not None:
                st.markdown(f"**True label:** {dataset.classes[label]}")
        if checkpoint is None:
            return
        probs = _probabilities(checkpoint, dataset, ref, image)
        predicted = int(probs.argmax())
        verdict = "" if label is None else (" — correct" if predicted == label else " — wrong")
        with left:
            st.markdown(f"**Predicted:** {dataset.classes[predicted]} ({probs[predicted]:.1%}){verdict}",
                        help=f"by {checkpoint.name}")
        with middle:
            frame = pd.DataFrame({"class": dataset.classes, "probability": probs})
            chart = alt.Chart(frame).mark_bar().encode(
                x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
                y=alt.Y("class:N", sort=list(dataset.classes), title=None),
                color=alt.condition(alt.datum["class"] == dataset.classes[predicted], alt.value("#d62728"),
                                    alt.value("#4c78a8")),
                tooltip=["class", alt.Tooltip("probability:Q", format=".2%")],
            ).properties(height=260, title=f"Class probabilities ({checkpoint.name})")
            st.altair_chart(chart, width="stretch")
        with right:
            heat, target = grad_cam(checkpoint.model, image)
            st.image(to_png(overlay_heatmap(image, heat), scale=8), width="stretch",
                     caption=f"Grad-CAM: where the model looked for '{dataset.classes[target]}'")
        if ref.split != "upload":
            st.markdown("**Nearest training images in the model's feature space** (cosine similarity)")
            idx, sims = neighbours(checkpoint, dataset, ref)
            refs = [ImageRef("train", int(i)) for i in idx]
            captions = [f"{dataset.classes[dataset.train.labels[i]]} {s:.2f}" for i, s in zip(idx, sims)]
            image_grid(dataset.train.images[idx], refs, captions, key="neighbours", columns=len(refs))
        if st.button("Close", key="inspector-close", icon=":material/close:"):
            close_inspector()
            st.rerun()


def _probabilities(checkpoint: Checkpoint, dataset, ref: ImageRef, image: np.ndarray) -> np.ndarray:
    if ref.split == "upload":
        return predict(checkpoint.model, image[None], tta=checkpoint.tta, features=False).probs[0]
    return get_artifacts(checkpoint, dataset, ref.split).probs[ref.index]


def read_upload_image(uploaded) -> np.ndarray | None:
    """An uploaded file as 32x32 RGB, or None after showing what was wrong with it."""
    try:
        return load_image_file(uploaded.getvalue())
    except CifarvizError as exc:
        st.error(f"{uploaded.name}: {exc}")
        return None


def checkpoint_table() -> pd.DataFrame:
    """One row per shipped checkpoint: what the Home and Models pages list."""
    rows = []
    for path in sorted(SHIPPED_DIR.glob("*.safetensors")):
        meta = read_metadata(path)
        metrics = meta.get("metrics", {})
        measured = metrics.get("measured_on", {})
        rows.append({
            "model": path.stem,
            "architecture": meta.get("architecture"),
            "parameters": meta.get("parameters"),
            "test accuracy": metrics.get("test_accuracy"),
            "measured on": f"{Path(measured.get('root', '?')).name} test split ({measured.get('sizes', {}).get('test', '?')} images)",
            "epochs": meta.get("train_config", {}).get("epochs"),
            "training time (min)": round(meta.get("train_seconds", 0) / 60, 1),
            "device": f"{meta.get('device')} ({meta.get('cpu_threads')} threads)" if meta.get("device") == "cpu" else meta.get("device"),
        })  # fmt: skip
    return pd.DataFrame(rows)


def data_status(root: str) -> str:
    layout = detect_layout(Path(root)) if Path(root).is_dir() else ""
    return f"`{root}`: " + ({"python": "CIFAR-10 python archive", "image-folder": "image-folder tree"}.get(layout) or "no data found")
