"""Cached loaders shared by every session: datasets and models once per server, artifacts and influence
indexes computed once per key in the background (services.jobs) with a progress bar that fills in by itself.
Shared objects are never mutated per request."""

from __future__ import annotations

import atexit
import gc
import sys
from pathlib import Path

import streamlit as st
import torch

from cifarviz.analysis.influence import build_estimate as influence_build_estimate
from cifarviz.analysis.influence import (
    METHODS,
    class_lookup,
    method_choice,
    index_path,
    index_ready,
    load_or_fit,
    lookup,
)
from cifarviz.core.checkpoint import Checkpoint, load_checkpoint
from cifarviz.core.data import default_data_root
from cifarviz.core.errors import CifarvizError
from cifarviz.core.inference import ready_for
from cifarviz.core.settings import settings
from cifarviz.core.utils import pick_device
from cifarviz.services.jobs import JOBS, Job, ServerBusy
from cifarviz.store.artifacts import artifact_path, artifacts_cached, split_artifacts, split_tta
from cifarviz.store.datasets import load_cifar10
from cifarviz.ui import identity
from cifarviz.ui.text import md, md_message

_modules_frozen = 0


def freeze_imported_modules() -> None:
    """Move the objects of newly imported modules out of the garbage collector's reach. Streamlit runs a full
    gc.collect() after every script run, and torch, scikit-learn and friends leave ~320,000 long-lived objects
    that it would walk every time (a large share of a rerun; the README's Benchmarks give the figures); frozen,
    they are skipped. Only when modules were added, so per-session objects are rarely frozen with them."""
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
    # The splits Evaluate shows are predicted in a random order and previewed as they go (the training split is
    # never previewed: its reordered copy would cost 140 MB for nothing)
    preview = split != "train"
    return JOBS.start(str(artifact_path(checkpoint, dataset, split)),
                      lambda report: split_artifacts(checkpoint, dataset, split, on_progress=report,
                                                     on_partial=report.partial if preview else None),
                      background=background, owner=None if background else identity.viewer())


def classroom_refusal(what: str) -> Job | None:
    """In classroom mode a student's click computes nothing new that takes minutes (a map with other settings,
    an influence index): only what the teacher precomputed, or the teacher (teacher key) asks for."""
    if not settings().classroom or identity.is_teacher():
        return None
    return Job.failed(what, ServerBusy(
        f"In classroom mode this server shows what the teacher prepared, and {what} was not prepared. Pick the "
        "settings the page opened with, or ask the teacher (`python -m cifarviz precompute`, or the teacher key)."),
        refused=True)


def artifacts_ready(checkpoint: Checkpoint, dataset, split: str) -> bool:
    return artifacts_cached(checkpoint, dataset, split)


def prefetch(checkpoint: Checkpoint | None, dataset) -> None:
    """Start computing, in the background, what the inspector and other pages will ask for next."""
    if checkpoint is not None and dataset is not None:
        for split in ("test", "train", "val"):
            artifacts_job(checkpoint, dataset, split, background=True)
        choice = method_choice(checkpoint)
        # An ensemble or a TRAK fit takes minutes: built when a viewer says yes on Influence (or precompute); the
        # quick method that answers meanwhile is prepared now
        for method in dict.fromkeys((choice.method, choice.quick)):
            if not METHODS[method].needs_members and not takes_long(method, checkpoint, dataset):
                influence_job(method, checkpoint, dataset, background=True)
                break


def influence_job(method: str, checkpoint: Checkpoint, dataset, *, background: bool = False) -> Job | None:
    """The fitting of an influence index, started (or joined) if it is not on disk yet; None if it is."""
    try:
        if index_ready(method, checkpoint, dataset):
            return None
    except CifarvizError as exc:  # e.g. loss settings in the metadata that cannot be right: say so, on the page
        return Job.failed(f"influence-{method}-{checkpoint.name}", exc)
    if not background and (refused := classroom_refusal(f"the {METHODS[method].title} index of this checkpoint")):
        return refused

    def fit(report):
        return load_or_fit(method, checkpoint, dataset, on_progress=report)  # records its time: the next estimate

    job = JOBS.start(str(index_path(method, checkpoint, dataset)), fit, background=background,
                     owner=None if background else identity.viewer())
    if job.expected is None and not job.refused:
        job.expected = build_estimate(method, checkpoint, dataset)  # this server's last build of the same index
    return job


ASK_ABOVE_SECONDS = 60  # longer than this, a page asks before it starts the work


def build_estimate(method: str, checkpoint: Checkpoint, dataset) -> float | None:
    """Seconds the index took when it was last built on this machine (None: never built here)."""
    return influence_build_estimate(method, checkpoint, dataset, probe=False)[0]


def takes_long(method: str, checkpoint: Checkpoint, dataset) -> bool:
    estimate = build_estimate(method, checkpoint, dataset)
    return estimate > ASK_ABOVE_SECONDS if estimate is not None else METHODS[method].takes_minutes


def needs_asking(method: str, checkpoint: Checkpoint, dataset) -> bool:
    """Whether a page must ask before building `method`'s index: it is not on disk, nobody has started it, this
    viewer has not said yes, and it takes more than about a minute (measured here, or the method's nature)."""
    if st.session_state.get(f"_build_{method}_{checkpoint.path}") or not takes_long(method, checkpoint, dataset):
        return False
    try:
        if index_ready(method, checkpoint, dataset):
            return False
    except CifarvizError:
        return False  # the page shows that problem when it asks for the index
    job = JOBS.get(str(index_path(method, checkpoint, dataset)))
    return job is None or (job.done and job.error is not None)


def confirm_build(method: str, checkpoint: Checkpoint) -> None:
    st.session_state[f"_build_{method}_{checkpoint.path}"] = True


def get_influence_index(method: str, checkpoint: Checkpoint, dataset):
    """A method's index for the checkpoint: loaded once per server, fitted once ever (this run waits with a
    progress bar that fills in by itself if it is still being fitted)."""
    job = influence_job(method, checkpoint, dataset)
    if job is not None:
        wait_for(job, f"Building the {METHODS[method].title} index of {md(checkpoint.name)} over the "
                      f"{len(dataset.train):,} training images (once per checkpoint, for everyone)")
    return _influence_index(method, str(checkpoint.path), file_stamp(checkpoint.path), dataset.root.as_posix(),
                            index_stamp(method, checkpoint, dataset))


def index_stamp(method: str, checkpoint: Checkpoint, dataset) -> str:
    """Which file holds the index (device, inode, size), part of the in-memory caches' keys: an index file replaced
    on disk (a damaged one rebuilt, another server process's refit: writes are renames, so a new inode) is read
    again instead of served from memory. Not its modification time: the store's LRU touches that on every read."""
    try:
        stat = index_path(method, checkpoint, dataset).stat()
    except OSError:
        return ""
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}"


def influence_index_now(method: str, checkpoint: Checkpoint, dataset, fallback: str | None = None):
    """(index, the method it is, the job still building `method` or None). A method that takes minutes to build
    (the ensemble) is built in the background while the page answers with `fallback` (by default the checkpoint's
    best measured method whose index takes seconds: method_choice().quick): the first answer should not wait for
    the best one, and is still a measured one."""
    fallback = fallback or method_choice(checkpoint).quick
    slow = METHODS[method].needs_members or takes_long(method, checkpoint, dataset)
    job = influence_job(method, checkpoint, dataset, background=slow)
    if job is None or not slow or (job.done and job.error is None):
        return get_influence_index(method, checkpoint, dataset), method, None
    return get_influence_index(fallback, checkpoint, dataset), fallback, job


@st.cache_resource(show_spinner=False, max_entries=4)  # a TRAK index holds ~370 MB
def _influence_index(method: str, path: str, stamp: float, root: str, index_stamp: str):
    return load_or_fit(method, get_checkpoint(path, stamp), get_dataset(root))


def influence_of(method: str, checkpoint: Checkpoint, dataset, *, test_index: int | None = None,
                 class_name: str | None = None, k: int = 8):
    """The k most helpful and harmful training images for one test image or a whole test class (the index must be
    built): computed once per server, since a class opens the same images again and again."""
    return _influence_of(method, str(checkpoint.path), file_stamp(checkpoint.path), dataset.root.as_posix(),
                         index_stamp(method, checkpoint, dataset), test_index, class_name, k)


@st.cache_data(show_spinner=False, max_entries=2048)  # a few KB each
def _influence_of(method: str, path: str, stamp: float, root: str, index_stamp: str, test_index, class_name,
                  k: int):
    index = _influence_index(method, path, stamp, root, index_stamp)
    checkpoint, dataset = get_checkpoint(path, stamp), get_dataset(root)
    if class_name is not None:
        return class_lookup(index, checkpoint, dataset, class_name, k=k)
    return lookup(index, checkpoint, dataset, test_index, k=k)


def get_artifacts(checkpoint: Checkpoint, dataset, split: str, *, early: bool = False, preview=None):
    """Predictions/features of a split. If they are still being computed, this run ends with a progress bar
    that fills in by itself and reruns the page when they are ready (nothing stale stays on screen).

    `early`: with test-time augmentation, return the plain pass's predictions as soon as they exist (their
    `tta` is "none") under a progress bar that reruns the page when the augmented ones arrive.
    `preview(PartialPredictions)`: drawn above the progress bar (and refreshed with it) while the first pass runs."""
    job = artifacts_job(checkpoint, dataset, split)
    tta = split_tta(checkpoint, split)
    if job is not None:
        label = (f"Computing {md(checkpoint.name)} on the {len(dataset.split(split)):,} {split} images "
                 "(first visit only; cached on disk for everyone)")
        def plain() -> bool:
            return artifacts_cached(checkpoint, dataset, split, "none")

        if early and tta != "none" and not (job.done and job.error is not None):
            if not plain():
                wait_for(job, label, until=plain, preview=preview)
            progress_bar(job, f"Showing predictions without test-time augmentation until the {tta}-averaged "
                              "ones are ready")
            tta = "none"
        else:
            wait_for(job, label, preview=preview)
    return _artifacts(str(checkpoint.path), file_stamp(checkpoint.path), dataset.root.as_posix(), split, tta)


def wait_for(job: Job, label: str, until=None, preview=None) -> None:
    """Return at once if `job` is done; else draw its progress (refreshed twice a second) and stop this run.
    The page reruns when the job ends, or as soon as `until()` is true. `preview(job.partial)`: see
    progress_bar."""
    if job.done and job.error is None:
        return
    if job.refused:
        refused_notice(job, label)
        st.stop()
    if job.done:
        st.error(f"{label} failed: {md_message(job.error)}")
        st.stop()
    progress_bar(job, label, until, preview=preview)
    st.stop()


def refused_notice(job: Job, label: str) -> None:
    """Work the pool did not admit: why, and (unless classroom mode forbids it) another try every 5 s."""
    st.info(f"{label}: not started. {md_message(job.error)}", icon=":material/hourglass_empty:")
    if "classroom mode" in str(job.error):
        return

    @st.fragment(run_every=5)
    def retry() -> None:
        if st.session_state.get("_refused_retry_tick"):
            st.rerun()
        st.session_state["_refused_retry_tick"] = True

    st.session_state["_refused_retry_tick"] = False
    retry()


def progress_bar(job: Job, label: str, until=None, every: float = 0.5, preview=None) -> None:
    """The job's progress, refreshed (only it) every `every` seconds; the whole page reruns when the job ends
    (or `until()` holds). A failed job shows its error instead. `preview(job.partial)` draws what the work has
    handed over so far above the bar, refreshed with it."""
    if job.refused:
        refused_notice(job, label)
        return
    if job.done and job.error is not None:
        st.error(f"{label} failed: {md_message(job.error)}")
        return

    @st.fragment(run_every=every)
    def progress() -> None:
        if job.done or (until is not None and until()):
            st.rerun()  # the whole page, now with the result
        if not job.started:
            st.progress(0.0, text=f"{label}: {queued(job)}")
            return
        if preview is not None and job.partial is not None:
            preview(job.partial)
        st.progress(job.progress, text=f"{label}: {doing(job)}{job.progress:.0%}{time_left(job)}")

    progress()


def queued(job: Job) -> str:
    """Where a job that has not started stands: "starting", "next, when one of the 2 computations under way
    ends", or "waiting for 3 other computations queued ahead of it" (with how many run at a time)."""
    ahead, running = JOBS.position(job) or 0, JOBS.running()
    if ahead == 0 and running < JOBS.workers:
        return "starting"
    at_a_time = f"this server computes {JOBS.workers} at a time, what someone waits for first"
    if ahead == 0:
        return f"next, when one of the {running} computation{'s' if running != 1 else ''} under way ends ({at_a_time})"
    return f"waiting for {ahead} other computation{'s' if ahead != 1 else ''} queued ahead of it ({at_a_time})"


def doing(job: Job) -> str:
    """The job's stage in words, "finding neighbours, ", when it says one."""
    return f"{job.stage}, " if job.stage else ""


def time_left(job: Job) -> str:
    """", about 3 minutes left": from this server's measured time for the same work, else the pace of the work's
    current stage; it counts down while progress stands still (Job.seconds_left), and says nothing without a
    basis."""
    seconds = job.seconds_left()
    if seconds is None:
        return ""
    if seconds < 1:
        return ", almost done"
    return f", {about(seconds)} left"


def about(seconds: float) -> str:
    """"about 8 minutes", "about 40 seconds": a duration as the pages say it."""
    if seconds >= 90:
        return f"about {seconds / 60:.0f} minutes"
    whole = max(round(seconds), 1)
    return f"about {whole} second{'s' if whole != 1 else ''}"


def ask_first(key: str, text: str, button: str, on_click, help: str, fix: str | None = None) -> None:
    """The box that asks before minutes of work: what, how long, a button that says yes, and the command that
    prepares it before class (`fix`)."""
    with st.container(border=True, key=key):
        st.markdown(text)
        st.button(button, key=f"{key}-yes", icon=":material/play_arrow:", on_click=on_click, help=help)
        if fix:
            st.caption(fix)


@st.cache_resource(show_spinner=False, max_entries=24)
def _artifacts(path: str, stamp: float, root: str, split: str, tta: str):
    return split_artifacts(get_checkpoint(path, stamp), get_dataset(root), split, tta=tta)


def file_stamp(path) -> float:
    """Modification time, part of cache keys so a replaced checkpoint file is loaded again."""
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


def calibration_now(checkpoint: Checkpoint, dataset):
    """The checkpoint's temperature scaling (fitted on val, measured on test), or None while either split's
    predictions are still being computed (their jobs are started; the caller says so)."""
    if not (artifacts_ready(checkpoint, dataset, "val") and artifacts_ready(checkpoint, dataset, "test")):
        artifacts_job(checkpoint, dataset, "val")
        artifacts_job(checkpoint, dataset, "test")
        return None
    return _calibration(str(checkpoint.path), file_stamp(checkpoint.path), dataset.root.as_posix(),
                        split_tta(checkpoint, "val"), split_tta(checkpoint, "test"))


@st.cache_data(show_spinner=False, max_entries=32)  # milliseconds to fit; cached so every rerun is free
def _calibration(path: str, stamp: float, root: str, val_tta: str, test_tta: str):
    from cifarviz.analysis.calibration import calibrate

    val, test = _artifacts(path, stamp, root, "val", val_tta), _artifacts(path, stamp, root, "test", test_tta)
    return calibrate(val.probs, val.labels, test.probs, test.labels, fitted_on="val", measured_on="test")
