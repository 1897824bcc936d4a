"""The explorer's Streamlit helpers: the only module of cifarviz that imports Streamlit.

* cached loaders: datasets and models once per server (st.cache_resource, bounded), derived
  artifacts once per (checkpoint, data, split) on disk, computed in the background by
  cifarviz.services.jobs (a job per key, a file lock per artifact), so one user's wait never holds up
  another's page;
* the sidebar that picks the data and the checkpoint for every page;
* reusable widgets: the clickable image grid and the image inspector every image opens.

Objects cached for the whole server (datasets, models, artifacts) are shared by every
session and never mutated per request.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import sys
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
import torch

from cifarviz.analysis.explore import ImageRef, grad_cam, nearest_neighbours, overlay_heatmap, to_png
from cifarviz.analysis.influence import DEFAULT_METHOD, METHODS, class_lookup, index_path, load_or_fit, lookup
from cifarviz.core.checkpoint import SHIPPED_DIR, Checkpoint, load_checkpoint, save_checkpoint
from cifarviz.core.data import default_data_root, detect_layout, load_image_file
from cifarviz.core.errors import CifarvizError
from cifarviz.core.inference import predict, ready_for
from cifarviz.core.settings import settings
from cifarviz.core.utils import atomic_write, cache_dir, pick_device
from cifarviz.services.jobs import JOBS, Job
from cifarviz.services.runs import list_runs, runs_dir
from cifarviz.store.artifacts import artifact_path, artifacts_cached, split_artifacts, split_tta
from cifarviz.store.datasets import load_cifar10

RUNS_DIR = runs_dir()  # $CIFARVIZ_RUNS, else ./runs: the Train page's runs and older flat checkpoints
PAGES = (  # (file, title, icon): the explorer's pages, in menu order
    ("pages/home.py", "Home", ":material/home:"),
    ("pages/dataset.py", "Dataset", ":material/photo_library:"),
    ("pages/train.py", "Train", ":material/model_training:"),
    ("pages/evaluate.py", "Evaluate", ":material/fact_check:"),
    ("pages/embeddings.py", "Embeddings", ":material/scatter_plot:"),
    ("pages/influence.py", "Influence", ":material/hub:"),
    ("pages/models.py", "Models", ":material/account_tree:"),
)
INSPECT_KEY = "inspect"
UPLOAD_MAX_BYTES = 200 * 1024 * 1024
UPLOADS_KEPT = 20  # uploaded checkpoints kept on disk; older ones are removed first


def data_locked() -> bool:
    """CIFARVIZ_LOCK_DATA=1 (or CIFARVIZ_CLASSROOM=1): the data folder is the server's, not a text box for anyone."""
    return settings().data_locked


def uploads_allowed() -> bool:
    """CIFARVIZ_NO_UPLOADS=1 (or CIFARVIZ_CLASSROOM=1) turns off checkpoint and image uploads."""
    return settings().uploads_allowed


# --------------------------------------------------------------------------- cached loaders


_modules_frozen = 0


def freeze_imported_modules() -> None:
    """Move the objects of newly imported modules out of the garbage collector's reach. Streamlit runs a full
    gc.collect() after every script run, and torch, scikit-learn and friends leave ~320,000 long-lived objects
    that it would walk every time (0.17-0.33 s a rerun on this CPU); frozen, that collect takes under a
    millisecond. Only when modules were added, so per-session objects are rarely frozen with them."""
    global _modules_frozen
    if len(sys.modules) > _modules_frozen:
        if not _modules_frozen:
            atexit.register(gc.unfreeze)  # let the interpreter finalise them at exit (extensions report leaks)
        _modules_frozen = len(sys.modules)
        gc.collect()
        gc.freeze()


def canonical_root(text: str) -> str:
    """One spelling per folder (`data`, `./data/`, `~/x/../data`...), so the dataset cache holds it once."""
    return str(Path(text or default_data_root()).expanduser().resolve())


@st.cache_resource(show_spinner="Loading CIFAR-10 (decoded once, then cached on disk)...", max_entries=2)
def get_dataset(root: str):
    # lazy: a first visit to Evaluate waits for the 10,000 test images only; the training images are decoded
    # when a page, or the background computation of their features, first needs them.
    return load_cifar10(root, download=False, progress=False, lazy=True)


@st.cache_resource(show_spinner="Loading model...", max_entries=8)
def get_checkpoint(path: str, stamp: float) -> Checkpoint:  # stamp: a changed file is loaded again
    checkpoint = load_checkpoint(path)
    device = pick_device("auto")
    if not ready_for(checkpoint.model, device):  # once, before any user shares it
        checkpoint.model.to(device, memory_format=torch.channels_last)
    return checkpoint


def artifacts_job(checkpoint: Checkpoint, dataset, split: str, *, background: bool = False) -> Job | None:
    """The computation of a split's artifacts, started (or joined) if they are not on disk yet; None if they are."""
    if artifacts_cached(checkpoint, dataset, split):
        return None
    return JOBS.start(str(artifact_path(checkpoint, dataset, split)), lambda report: split_artifacts(checkpoint, dataset, split, on_progress=report),
                      background=background)


def artifacts_ready(checkpoint: Checkpoint, dataset, split: str) -> bool:
    return artifacts_cached(checkpoint, dataset, split)


def prefetch(checkpoint: Checkpoint | None, dataset) -> None:
    """Start computing, in the background, what the inspector and other pages will ask for next."""
    if checkpoint is not None and dataset is not None:
        for split in ("test", "train", "val"):
            artifacts_job(checkpoint, dataset, split, background=True)
        influence_job(DEFAULT_METHOD, checkpoint, dataset, background=True)


def influence_job(method: str, checkpoint: Checkpoint, dataset, *, background: bool = False) -> Job | None:
    """The fitting of an influence index, started (or joined) if it is not on disk yet; None if it is."""
    path = index_path(method, checkpoint, dataset)
    if path.is_file():
        return None
    return JOBS.start(str(path), lambda report: load_or_fit(method, checkpoint, dataset, on_progress=report),
                      background=background)


def get_influence_index(method: str, checkpoint: Checkpoint, dataset):
    """A method's index for the checkpoint: loaded once per server, fitted once ever (this run waits with a
    progress bar that fills in by itself if it is still being fitted)."""
    job = influence_job(method, checkpoint, dataset)
    if job is not None:
        wait_for(job, f"Building the {METHODS[method].title} index of {checkpoint.name} over the "
                      f"{len(dataset.train):,} training images (once per checkpoint, for everyone)")
    return _influence_index(method, str(checkpoint.path), file_stamp(checkpoint.path), dataset.root.as_posix())


@st.cache_resource(show_spinner=False, max_entries=4)  # a TRAK index holds ~370 MB
def _influence_index(method: str, path: str, stamp: float, root: str):
    return load_or_fit(method, get_checkpoint(path, stamp), get_dataset(root))


def influence_of(method: str, checkpoint: Checkpoint, dataset, *, test_index: int | None = None,
                 class_name: str | None = None, k: int = 8):
    """The k most helpful and harmful training images for one test image or a whole test class (the index must be
    built): computed once per server, since a class opens the same images again and again."""
    return _influence_of(method, str(checkpoint.path), file_stamp(checkpoint.path), dataset.root.as_posix(),
                         test_index, class_name, k)


@st.cache_data(show_spinner=False, max_entries=2048)  # a few KB each
def _influence_of(method: str, path: str, stamp: float, root: str, test_index, class_name, k: int):
    index = _influence_index(method, path, stamp, root)
    checkpoint, dataset = get_checkpoint(path, stamp), get_dataset(root)
    if class_name is not None:
        return class_lookup(index, checkpoint, dataset, class_name, k=k)
    return lookup(index, checkpoint, dataset, test_index, k=k)


def get_artifacts(checkpoint: Checkpoint, dataset, split: str, *, early: bool = False):
    """Predictions/features of a split. If they are still being computed, this run ends with a progress bar
    that fills in by itself and reruns the page when they are ready (nothing stale stays on screen).

    `early`: with test-time augmentation, return the plain pass's predictions as soon as they exist (their
    `tta` is "none") under a progress bar that reruns the page when the augmented ones arrive."""
    job = artifacts_job(checkpoint, dataset, split)
    tta = split_tta(checkpoint, split)
    if job is not None:
        label = (f"Computing {checkpoint.name} on the {len(dataset.split(split)):,} {split} images "
                 "(first visit only; cached on disk for everyone)")
        def plain() -> bool:
            return artifacts_cached(checkpoint, dataset, split, "none")

        if early and tta != "none" and not (job.done and job.error is not None):
            if not plain():
                wait_for(job, label, until=plain)
            progress_bar(job, f"Showing predictions without test-time augmentation until the {tta}-averaged "
                              "ones are ready")
            tta = "none"
        else:
            wait_for(job, label)
    return _artifacts(str(checkpoint.path), file_stamp(checkpoint.path), dataset.root.as_posix(), split, tta)


def wait_for(job: Job, label: str, until=None) -> None:
    """Return at once if `job` is done; else draw its progress (refreshed twice a second) and stop this run.
    The page reruns when the job ends, or as soon as `until()` is true."""
    if job.done and job.error is None:
        return
    if job.done:
        st.error(f"{label} failed: {job.error}")
        st.stop()
    progress_bar(job, label, until)
    st.stop()


def progress_bar(job: Job, label: str, until=None, every: float = 0.5) -> None:
    """The job's progress, refreshed (only it) every `every` seconds; the whole page reruns when the job ends
    (or `until()` holds). A failed job shows its error instead."""
    if job.done and job.error is not None:
        st.error(f"{label} failed: {job.error}")
        return

    @st.fragment(run_every=every)
    def progress() -> None:
        if job.done or (until is not None and until()):
            st.rerun()  # the whole page, now with the result
        st.progress(job.progress, text=f"{label}: {job.progress:.0%}")

    progress()


@st.cache_resource(show_spinner=False, max_entries=24)
def _artifacts(path: str, stamp: float, root: str, split: str, tta: str):
    return split_artifacts(get_checkpoint(path, stamp), get_dataset(root), split, tta=tta)


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
    for run in list_runs(RUNS_DIR):  # runs trained on the Train page that completed or were stopped
        if run.has_model:
            choices[f"{run.id} (your run)"] = str(run.checkpoint)
    for label, path in st.session_state.get("uploaded_checkpoints", {}).items():
        if Path(path).is_file():  # uploads are pruned on disk when many accumulate
            choices[label] = path
    return choices


def _remember(key: str) -> None:
    st.session_state[f"_{key}"] = st.session_state[key]


def sidebar() -> None:
    """Data source and checkpoint pickers. Every page draws them first; their values are mirrored in
    session state (the usual multipage pattern), so a choice holds across pages."""
    freeze_imported_modules()
    locked = data_locked()
    st.session_state["data_root"] = (str(default_data_root()) if locked
                                     else st.session_state.get("_data_root") or str(default_data_root()))
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
        st.text_input("Data folder", key="data_root", on_change=_remember, args=("data_root",), disabled=locked,
                      help="Set by the server for this class (CIFARVIZ_LOCK_DATA)." if locked else
                      "CIFAR-10 python archive folder or an image-folder tree (train/<class>, test/<class>). "
                      "Defaults to $CIFARVIZ_DATA, else ./data.")
        st.selectbox("Checkpoint", labels, key="checkpoint_label", on_change=_remember, args=("checkpoint_label",),
                     help="Shipped checkpoints, your runs (runs/), and checkpoints uploaded on the Models page.")


def data_and_checkpoint_page(title: str, training_images: bool = True):
    """The start of a page that needs both: sidebar, title, then (dataset, checkpoint), or a stop after a message
    that says what is missing. `training_images`: see `current_dataset`."""
    sidebar()
    st.title(title)
    dataset, checkpoint = current_dataset(training_images=training_images), current_checkpoint()
    if dataset is None or checkpoint is None:
        st.stop()
    return dataset, checkpoint


def current_dataset(required: bool = True, training_images: bool = True):
    """The selected dataset, or None after drawing a page that explains how to get data.

    `training_images`: decode the training images now, if no one has yet (a page that shows only test results
    says False, and its first visit does not wait for them)."""
    root = canonical_root(st.session_state.get("data_root", ""))
    try:
        dataset = get_dataset(root)
        if training_images and not dataset.train.decoded:
            with st.spinner(f"Decoding the {len(dataset.train) + len(dataset.val):,} training images "
                            "(once, then cached on disk)..."):
                dataset.train.images, dataset.val.images, dataset.mean  # noqa: B018 - decoded on first use
        return dataset
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
        "- Or download the original (170 MB) with `python -m cifarviz data --download --data FOLDER`."
    )
    if data_locked():  # only the server's own folder; students never choose where the server writes
        return
    if st.button("Download CIFAR-10 into " + root, key="download-data"):
        from cifarviz.core.data import download_cifar10

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


def save_uploaded_checkpoint(name: str, data: bytes, architecture: str | None = None) -> tuple[str, Checkpoint]:
    """Validate an uploaded checkpoint (safely), keep it on disk, and offer it in the sidebar.

    `architecture` answers an AmbiguousArchitectureError (state dicts that fit several zoo models)."""
    if not uploads_allowed():
        raise CifarvizError("Uploads are turned off on this server (CIFARVIZ_NO_UPLOADS / CIFARVIZ_CLASSROOM).")
    if len(data) > UPLOAD_MAX_BYTES:
        raise CifarvizError(f"{name} is {len(data) / 1e6:.0f} MB; the limit is {UPLOAD_MAX_BYTES / 1e6:.0f} MB.")
    checkpoint = load_checkpoint(name, data=data, architecture=architecture)  # a clear CheckpointError if bad
    folder = cache_dir() / "uploads"
    path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}.safetensors"
    if Path(name).suffix.lower() == ".safetensors":
        with atomic_write(path) as fh:
            fh.write(data)
    else:  # a state dict: re-save as safetensors, so it loads like every other checkpoint
        save_checkpoint(path, checkpoint.model, {"name": Path(name).stem, "notes": f"uploaded as {name}"})
    prune_uploads(folder, keep=UPLOADS_KEPT)
    label = f"{Path(name).stem} (uploaded)"
    st.session_state.setdefault("uploaded_checkpoints", {})[label] = str(path)
    return label, checkpoint


def prune_uploads(folder: Path, keep: int) -> None:
    """Keep the `keep` newest uploaded checkpoints: a class cannot fill the server's disk."""
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[keep:]:
        for leftover in (old, old.with_suffix(".json")):
            leftover.unlink(missing_ok=True)


# --------------------------------------------------------------------------- image grid and inspector


def open_inspector(split: str, index: int) -> None:
    st.session_state[INSPECT_KEY] = ImageRef(split, int(index))


def close_inspector() -> None:
    st.session_state.pop(INSPECT_KEY, None)


def image_grid(images: np.ndarray, refs: list[ImageRef], captions: list[str], key: str, tile_width: int = 112,
               on_click=None, help: str = "Open in the image inspector") -> None:
    """Clickable images in tiles `tile_width` pixels wide that wrap, as many per row as the screen fits (so captions
    are never squeezed on a projector's narrow page). Each button opens its image in the inspector, or calls
    `on_click(split, index)` instead."""
    if len(refs) == 0:
        st.caption("No images.")
        return
    with st.container(horizontal=True, wrap=True, gap="small"):
        for i, ref in enumerate(refs):
            with st.container(width=tile_width):
                st.image(to_png(images[i], scale=3), width="stretch", output_format="PNG")
                st.button(captions[i], key=f"{key}-{ref.split}-{ref.index}", on_click=on_click or open_inspector,
                          args=(ref.split, ref.index), help=help, width="stretch", wrap=True)


def inspector(dataset, checkpoint: Checkpoint | None) -> None:
    """Open the image inspector if an image was clicked. Every page calls this once, at its end; it also
    starts computing, in the background, the features the inspector's neighbours need."""
    prefetch(checkpoint, dataset)
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
                st.markdown(f"**True label:** {classes[label]}")
        if checkpoint is None:
            st.info("Pick a checkpoint in the sidebar to see the model's prediction.")
            return
        probs = image_probabilities(checkpoint, dataset, ref, image)
        predicted = int(probs.argmax())
        verdict = "" if label is None else (" — correct" if predicted == label else " — wrong")
        with left:
            st.markdown(f"**Predicted:** {classes[predicted]} ({probs[predicted]:.1%}){verdict}")
            st.caption(f"by {checkpoint.name}" + (" with flip test-time augmentation"
                                                  if _tta(checkpoint, ref) == "flip" else ""))
        with middle:
            chart = probability_chart(probs, classes, predicted, checkpoint.name)
            st.altair_chart(chart, width="stretch", height=PROBABILITY_CHART_HEIGHT)
        with right:
            explained = st.selectbox("Grad-CAM explains", classes, index=predicted, key=f"cam-{ref.split}-{ref.index}",
                                     help="Defaults to the predicted class; pick another to see its evidence.")
            target = classes.index(explained)
            note = "the predicted class" if target == predicted else "not the predicted class"
            st.image(saliency_png(checkpoint, str(checkpoint.path), file_stamp(checkpoint.path), image, target),
                     width="stretch", output_format="PNG",
                     caption=f"Where the model found evidence for '{classes[target]}' ({note})")
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


@st.cache_data(show_spinner=False, max_entries=1024)  # ~20 KB each; a class opens the same images again and again
def saliency_png(_checkpoint: Checkpoint, path: str, stamp: float, image: np.ndarray, target: int) -> bytes:
    """The Grad-CAM overlay of `image` for class `target`, enlarged, as PNG (keyed by the checkpoint file, not the
    model object)."""
    heat, _ = grad_cam(_checkpoint.model, image, target_class=target)
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
        captions = [f"{dataset.classes[dataset.train.labels[i]]} {s:.2f}" for i, s in zip(idx, sims)]
        image_grid(dataset.train.images[idx], refs, captions, key="neighbours", tile_width=96)
        return

    progress_bar(job, f"Computing the features of the {len(dataset.train):,} training images (once per checkpoint, "
                 "for everyone)")


def influence_section(checkpoint: Checkpoint, dataset, ref: ImageRef, k: int = 4) -> None:
    """The inspector's top-k helpful and harmful training images for a test image (the default method)."""
    job = influence_job(DEFAULT_METHOD, checkpoint, dataset)
    if job is not None:
        progress_bar(job, "Building the influence index (once per checkpoint, for everyone)")
        return
    result = influence_of(DEFAULT_METHOD, checkpoint, dataset, test_index=ref.index, k=k)
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
    captions = [e.label + ("" if e.predicted == e.label else f" (pred. {e.predicted})") + " " + readable_score(e.score)
                for e in entries]
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


def read_upload_image(uploaded) -> np.ndarray | None:
    """An uploaded file as 32x32 RGB, or None after showing what was wrong with it."""
    try:
        return load_image_file(uploaded.getvalue())
    except CifarvizError as exc:
        st.error(f"{uploaded.name}: {exc}")
        return None


def data_status(root: str) -> str:
    layout = detect_layout(Path(root)) if Path(root).is_dir() else ""
    kind = {"python": "CIFAR-10 python archive", "image-folder": "image-folder tree"}.get(layout)
    return f"`{root}`: {kind or 'no data found'}"
