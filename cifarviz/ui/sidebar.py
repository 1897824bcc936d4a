"""The sidebar (data folder and checkpoint, held across pages) and the page starts that need them, with a clear
message when the data or the checkpoint is missing or does not fit."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import streamlit as st

from cifarviz.core.checkpoint import Checkpoint, check_fits_data, read_metadata, shipped_files
from cifarviz.core.data import default_data_root, detect_layout
from cifarviz.core.errors import CheckpointError, CifarvizError
from cifarviz.services.runs import list_runs, runs_dir, start as hear_from_the_queue
from cifarviz.store import default_store
from cifarviz.ui import identity, links
from cifarviz.ui.layout import page_style
from cifarviz.ui.tagging import remember_dataset
from cifarviz.ui.loaders import canonical_root, file_stamp, freeze_imported_modules, get_checkpoint, get_dataset
from cifarviz.ui.uploads import data_locked
from cifarviz.ui.text import md, md_message, shown

PAGES = (  # (file, title, icon): the explorer's pages, in menu order
    ("pages/home.py", "Home", ":material/home:"),
    ("pages/dataset.py", "Dataset", ":material/photo_library:"),
    ("pages/train.py", "Train", ":material/model_training:"),
    ("pages/evaluate.py", "Evaluate", ":material/fact_check:"),
    ("pages/predictions.py", "Predictions", ":material/table_rows:"),
    ("pages/embeddings.py", "Embeddings", ":material/scatter_plot:"),
    ("pages/influence.py", "Influence", ":material/hub:"),
    ("pages/models.py", "Models", ":material/account_tree:"),
)



def checkpoint_choices() -> dict[str, str]:
    """Label -> path for shipped checkpoints, the user's own runs, and this session's uploads."""
    choices = {}
    for path in shipped_files():
        choices[shown(f"{path.stem} (shipped)")] = str(path)
    for path in sorted(runs_dir().glob("*.safetensors")):  # older flat run files
        choices[shown(f"{path.stem} (your run)")] = str(path)
    for run in list_runs(runs_dir()):  # runs trained on the Train page that completed or were stopped
        if run.has_model:
            choices[shown(f"{run.id} (your run)")] = str(run.checkpoint)
    for label, path in st.session_state.get("uploaded_checkpoints", {}).items():
        if Path(path).is_file():  # uploads are pruned on disk when many accumulate
            choices[shown(label)] = path
    return choices


def default_checkpoint(choices: dict[str, str]) -> str | None:
    """The label a new session starts on: the most accurate shipped checkpoint (read from the files), else the
    first choice."""
    shipped = {label: path for label, path in choices.items() if label.endswith(" (shipped)")}
    ranked = _accuracies(tuple((path, file_stamp(path)) for path in shipped.values()))
    best = max(shipped, key=lambda label: ranked.get(shipped[label], -1.0), default=None)
    return best or next(iter(choices), None)


@st.cache_data(show_spinner=False, max_entries=8)
def _accuracies(stamped: tuple) -> dict[str, float]:
    found = {}
    for path, _ in stamped:
        try:
            found[path] = float((read_metadata(path).get("metrics") or {}).get("test_accuracy") or -1.0)
        except CifarvizError:
            found[path] = -1.0
    return found


LINKABLE = (" (shipped)", " (your run)")  # an upload lives in one session only: no link names it


def link_name(label: str | None) -> str | None:
    """The checkpoint's name in a link: `fastnet` for "fastnet (shipped)", a run's id for a run."""
    for suffix in LINKABLE:
        if label and label.endswith(suffix):
            return label[: -len(suffix)]
    return None


def link_label(choices: dict[str, str]) -> str | None:
    """The checkpoint a new address names (shipped first, then runs), if it is one of the choices."""
    name = links.from_link("checkpoint")
    if not name:
        return None
    return next((name + suffix for suffix in LINKABLE if name + suffix in choices), None)


def _remember(key: str) -> None:
    st.session_state[f"_{key}"] = st.session_state[key]


def sidebar() -> None:
    """Data source and checkpoint pickers. Every page draws them first; their values are mirrored in
    session state (the usual multipage pattern), so a choice holds across pages."""
    freeze_imported_modules()
    page_style()
    hear_from_the_queue()  # this process's collector writes what workers hand back (started once, a thread)
    locked = data_locked()
    st.session_state["data_root"] = (str(default_data_root()) if locked
                                     else st.session_state.get("_data_root") or str(default_data_root()))
    choices = checkpoint_choices()
    labels = list(choices)
    links.begin()
    wanted = (st.session_state.pop("checkpoint_label_request", None) or link_label(choices)
              or st.session_state.get("_checkpoint_label"))
    if wanted not in labels:
        wanted = default_checkpoint(choices)
    st.session_state["checkpoint_label"] = st.session_state["_checkpoint_label"] = wanted
    st.session_state["_checkpoint_link"] = link_name(wanted)
    with st.sidebar:
        for path, title, icon in PAGES:
            st.page_link(path, label=title, icon=icon)
        for warning in default_store().warnings:  # a cache folder that cannot keep files: said once, here
            st.warning(warning, icon=":material/storage:")
        st.divider()
        st.text_input("Data folder", key="data_root", on_change=_remember, args=("data_root",), disabled=locked,
                      help="Set by the server for this class (CIFARVIZ_LOCK_DATA)." if locked else
                      "CIFAR-10 python archive folder or an image-folder tree (train/<class>, test/<class>). "
                      "Defaults to $CIFARVIZ_DATA, else ./data.")
        st.selectbox("Checkpoint", labels, key="checkpoint_label", on_change=_remember, args=("checkpoint_label",),
                     help="Shipped checkpoints, your runs (runs/), and checkpoints uploaded on the Models page.")
        links.share_slot()  # "Link to this view", filled at the page's end (when the view is known)
        identity.viewer()  # the first visit sets this browser's cookie
        if identity.teacher_key_set():
            teacher_box()


def teacher_box() -> None:
    with st.expander("Teacher", icon=":material/school:", expanded=False):
        if identity.is_teacher():
            st.caption("You can stop or cancel every run on this server.")
            st.button("Leave teacher mode", key="teacher_leave", on_click=identity.check_teacher_key, args=("",))
            return
        st.text_input("Teacher key", type="password", key="teacher_key_typed", on_change=_teacher_key_typed,
                      help="The server's CIFARVIZ_TEACHER_KEY: lets this browser stop or cancel anyone's run.")
        if st.session_state.get("_teacher_key_wrong"):
            st.error("That is not this server's teacher key.")


def _teacher_key_typed() -> None:
    typed = st.session_state.get("teacher_key_typed") or ""
    st.session_state["_teacher_key_wrong"] = bool(typed) and not identity.check_teacher_key(typed)
    st.session_state["teacher_key_typed"] = ""  # never kept in a widget


def data_and_checkpoint_page(title: str, training_images: bool = True):
    """The start of a page that needs both: sidebar, title, then (dataset, checkpoint), or a stop after a message
    that says what is missing. `training_images`: see `current_dataset`."""
    sidebar()
    st.title(title)
    dataset = current_dataset(training_images=training_images)
    checkpoint = current_checkpoint(dataset=dataset) if dataset is not None else None
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
        remember_dataset(dataset)  # tags are kept per dataset
        if training_images and not dataset.train.decoded:
            with st.spinner(f"Decoding the {len(dataset.train) + len(dataset.val):,} training images "
                            "(once, then cached on disk)..."):
                dataset.train.images, dataset.val.images, dataset.mean  # noqa: B018 - decoded on first use
        return dataset
    except CifarvizError as exc:
        # A folder whose images failed to decode is read again on the next visit: once it is fixed, the server
        # sees the fix without a restart (the broken dataset object is dropped from the shared cache).
        get_dataset.clear(root)
        if required:
            no_data_help(root, str(exc))
        return None


def no_data_help(root: str, message: str) -> None:
    st.warning("No CIFAR-10 data here yet.", icon=":material/folder_off:")
    # What was looked for, wrapped to the page; the message's own "Fix:" is the command line's (--data PATH),
    # this page says what to do here below it.
    st.code(message.split("\nFix:")[0].split(" Fix:")[0], language=None, wrap_lines=True)
    st.markdown(
        "**How to provide it**\n"
        "- Point the *Data folder* in the sidebar (or `CIFARVIZ_DATA`) at a copy of CIFAR-10: the python archive "
        "folder `cifar-10-batches-py/`, or an image-folder tree `train/<class>/*.png`, `test/<class>/*.png`.\n"
        "- Or download the original (170 MB) with `python -m cifarviz data --download --data FOLDER`."
    )
    if data_locked():  # only the server's own folder; students never choose where the server writes
        st.caption("The data folder is the server's (the safe choice for a shared server). On your own machine, "
                   "start the app with CIFARVIZ_LOCK_DATA=0 to choose the folder here and download CIFAR-10 with "
                   "one click.")
        return
    if st.button("Download CIFAR-10 into " + md(root), key="download-data"):
        from cifarviz.core.data import download_cifar10

        try:
            with st.spinner("Downloading and verifying CIFAR-10..."):
                download_cifar10(Path(root))
            get_dataset.clear()
            st.rerun()
        except CifarvizError as exc:
            st.error(md_message(exc))


def current_checkpoint(quiet: bool = False, dataset=None) -> Checkpoint | None:
    """The checkpoint picked in the sidebar; None (with a message unless `quiet`) when there is none, or when it
    does not fit `dataset` (its classes, its images): checked once per pair, with what to do about it."""
    label = st.session_state.get("checkpoint_label")
    path = checkpoint_choices().get(label) if label else None
    if not path:
        if not quiet:
            st.info("No checkpoint selected: train one (`python -m cifarviz train`) or upload one on the Models page.")
        return None
    try:
        checkpoint = get_checkpoint(path, file_stamp(path))
        if dataset is not None:
            _check_fits(checkpoint, dataset)
        return checkpoint
    except CifarvizError as exc:
        if not quiet:
            st.error(md_message(exc))
        return None


def data_status(root: str) -> str:
    layout = detect_layout(Path(root)) if Path(root).is_dir() else ""
    kind = {"python": "CIFAR-10 python archive", "image-folder": "image-folder tree"}.get(layout)
    return f"{md(root)}: {kind or 'no data found'}"


_FITS_LOCK = threading.Lock()
_FITS: dict[tuple[int, int], tuple] = {}  # (model id, dataset id) -> (weak refs to both, why it does not fit or None)


def _check_fits(checkpoint: Checkpoint, dataset) -> None:
    """check_fits_data, once per (shared checkpoint, shared dataset) pair: pages ask on every rerun. The weak
    references make sure an id reused by a later object never answers for it."""
    key = (id(checkpoint.model), id(dataset))
    with _FITS_LOCK:  # every viewer's rerun asks: the shared table is only touched under the lock
        known = _FITS.get(key)
    if known is None or known[0]() is not checkpoint.model or known[1]() is not dataset:
        try:
            check_fits_data(checkpoint, dataset)
            reason = None
        except CifarvizError as exc:
            reason = str(exc)
        known = (weakref.ref(checkpoint.model), weakref.ref(dataset), reason)
        with _FITS_LOCK:
            _FITS[key] = known
            while len(_FITS) > 256:
                _FITS.pop(next(iter(_FITS)))
    if known[2] is not None:
        raise CheckpointError(known[2])
