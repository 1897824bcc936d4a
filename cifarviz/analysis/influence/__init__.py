"""Which training images made the model decide what it decided: influence methods behind one interface.

    index = load_or_fit("head", checkpoint, dataset)          # once per (checkpoint, training data), cached on disk
    result = lookup(index, checkpoint, dataset, test_index=42, k=10)   # then any test image, in milliseconds
    result.helpful, result.harmful                             # lists of InfluenceEntry

Methods (`METHODS`): "trak-ensemble" (TRAK over several models of one recipe), "head" (Koh & Liang's influence
function on the classifier head, exact Hessian), "trak" (TRAK-style projected gradients over the whole network or
its last layers), "similarity" (a baseline: label-signed feature similarity). Which one answers for a checkpoint is
decided by retraining measurements, against the baseline too (choice.py). Every method follows one sign convention
(base.py): positive = helpful = removing the image would raise the test image's loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cifarviz.core.data import Split
from cifarviz.store.artifacts import checkpoint_digest, model_identity, split_artifacts, split_digest, subset_digest
from cifarviz.store import timings
from cifarviz.store.cache import CacheKey, Schema, default_store

from .base import InfluenceError, InfluenceIndex, Progress
from .choice import MethodChoice, default_method, how_sure, method_choice
from .ensemble import TrakEnsemble, ensemble_scores
from .head import HeadInfluence
from .similarity import FeatureSimilarity
from .task import MEASUREMENT, Task
from .trak import TrakInfluence

METHODS: dict[str, type[InfluenceIndex]] = {m.name: m for m in (TrakEnsemble, HeadInfluence, TrakInfluence,
                                                                 FeatureSimilarity)}
INDEX_VERSION = 6  # 6: the ensemble's agreement between its models; 5: its lists, test images in the key

__all__ = [
    "MEASUREMENT",
    "METHODS",
    "InfluenceEntry",
    "InfluenceError",
    "InfluenceIndex",
    "InfluenceResult",
    "MethodChoice",
    "Task",
    "TrakEnsemble",
    "available_methods",
    "build_estimate",
    "build_timing_key",
    "best_ranking",
    "class_lookup",
    "default_method",
    "ensemble_members",
    "ensemble_scores",
    "index_key",
    "index_path",
    "index_ready",
    "how_sure",
    "load_or_fit",
    "lookup",
    "loss_ranking",
    "margin_ranking",
    "ranking_meaning",
    "method_choice",
    "method_class",
    "suspicious",
    "suspicious_rankings",
    "trained_positions",
    "training_losses",
]


def method_class(method: str) -> type[InfluenceIndex]:
    try:
        return METHODS[method]
    except KeyError:
        raise InfluenceError(f"Unknown influence method {method!r}. Methods: {', '.join(METHODS)}.") from None


_MEMBERS: dict = {}  # (file, mtime, size) -> Checkpoint: loaded once per process (a rerun asks every time)
_MEMBERS_LOCK = threading.Lock()


def ensemble_members(checkpoint) -> list:
    """The other models an ensemble method averages over with `checkpoint` (core.checkpoint.ensemble_member_files),
    loaded and checked: each must be the checkpoint's architecture with its arguments and classes."""
    from cifarviz.core.checkpoint import ensemble_member_files, load_checkpoint

    members = []
    for path in ensemble_member_files(checkpoint):
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with _MEMBERS_LOCK:
            member = _MEMBERS.get(key)
            if member is None:
                member = _MEMBERS[key] = load_checkpoint(path)
        ours, theirs = checkpoint.model, member.model
        named = [c.meta.get("classes") for c in (checkpoint, member) if isinstance(c.meta, dict)]
        if (theirs.arch_name, theirs.arch_args) != (ours.arch_name, ours.arch_args) or \
                (len(named) == 2 and all(named) and list(named[0]) != list(named[1])):  # older files name none
            raise InfluenceError(f"{path.name} is not a model of {checkpoint.name}'s kind ({theirs.arch_name} "
                                 f"{theirs.arch_args}, not {ours.arch_name} {ours.arch_args}, or other classes): it "
                                 "cannot be averaged with it. Remove it, or retrain it with the same recipe.")
        members.append(member)
    return members


def available_methods(checkpoint) -> list[str]:
    """The methods that can run for this checkpoint: an ensemble needs other models of its recipe."""
    from cifarviz.core.checkpoint import ensemble_member_files

    has_members = bool(ensemble_member_files(checkpoint))
    return [name for name, cls in METHODS.items() if has_members or not cls.needs_members]


def trained_positions(checkpoint, dataset) -> tuple[np.ndarray, str | None]:
    """Positions in `dataset.train` of the images the checkpoint was trained on (its provenance), and a note for
    the page when that record is missing or does not match this data (then every training image is used).

    A run trained on a 10,000-image subset gets influence over those 10,000 only: the 35,000 it never saw (high
    loss, high self-influence) would otherwise fill the lists."""
    everything = np.arange(len(dataset.train))
    meta = checkpoint.meta if isinstance(checkpoint.meta, dict) else {}
    record = meta.get("provenance")
    if not isinstance(record, dict):
        return everything, (f"{checkpoint.name} records no list of its training images (trained before cifarviz kept "
                            f"one, or uploaded): influence is over all {len(everything):,} training images.")
    if record.get("data_fingerprint") != dataset.fingerprint:
        return everything, (f"{checkpoint.name} was trained on other data than {dataset.root}: influence is over all "
                            f"{len(everything):,} training images here.")
    images = record.get("train_images") if isinstance(record.get("train_images"), dict) else {}
    listed = images.get("indices")
    if listed is not None:
        problem = _recorded_indices_problem(listed, len(dataset.train) + len(dataset.val))
        if problem:
            return everything, (f"{checkpoint.name}'s record of its training images (provenance.train_images."
                                f"indices) {problem}: the record is damaged or was edited, so influence is over all "
                                f"{len(everything):,} training images.")
        wanted = np.unique(np.asarray(listed, dtype=np.int64))
        at, found = positions_of_sources(dataset, wanted)
        positions = np.unique(at[found])
        if not found.all():
            missing = int((~found).sum())
            return positions, (f"{missing:,} of the {len(wanted):,} images {checkpoint.name} was trained on are not in "
                               "this training split (another split seed or validation size): influence is over the "
                               f"other {len(positions):,}.")
        return positions, None
    digest = hashlib.sha256(np.ascontiguousarray(dataset.train.source_index, dtype=np.int64).tobytes()).hexdigest()
    if images.get("digest") == digest:
        return everything, None
    return everything, (f"{checkpoint.name} was trained on other images than this training split (another split "
                        f"seed or validation size): influence is over all {len(everything):,} training images.")


MIN_RECORDED_IMAGES = 100  # the smallest training set cifarviz records (the Train page's is 1,000)


def _recorded_indices_problem(listed, n_source: int) -> str | None:
    """What is wrong with a checkpoint's list of training images (indices into the data's own training order),
    or None. Checked in plain Python before numpy sees it: an index above 2^63 must be a message, not an error."""
    if not isinstance(listed, list):
        return f"is a {type(listed).__name__}, not a list"
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in listed):
        return "holds entries that are not whole numbers"
    if len(listed) < MIN_RECORDED_IMAGES:
        return f"lists {len(listed):,} image(s), fewer than the {MIN_RECORDED_IMAGES} any training records"
    outside = sum(1 for i in listed if not 0 <= i < n_source)
    if outside:
        return f"holds {outside:,} index(es) outside 0-{n_source - 1:,}, the training images this data has"
    if len(set(listed)) != len(listed):
        return f"lists {len(listed) - len(set(listed)):,} image(s) twice"
    return None


def positions_of_sources(dataset, sources) -> tuple[np.ndarray, np.ndarray]:
    """(positions in dataset.train, found): where each of `sources` (indices in the dataset's own training order,
    e.g. a checkpoint's record) stands in this training split, in their order; `found` False where it does not."""
    source = dataset.train.source_index
    order = np.argsort(source, kind="stable")
    wanted = np.asarray(sources, dtype=np.int64)
    at = np.clip(np.searchsorted(source[order], wanted), 0, max(len(source) - 1, 0))
    return order[at], source[order][at] == wanted


def _training_subset(dataset, positions: np.ndarray):
    """The dataset with its training split cut to `positions` (the same object when that is all of it)."""
    if len(positions) == len(dataset.train):
        return dataset
    train = dataset.train
    subset = Split("train", train.images[positions], train.labels[positions], train.source_index[positions])
    return dataclasses.replace(dataset, train=subset)


def index_key(method: str, checkpoint, dataset) -> CacheKey:
    """The store key of one method's index: the model's identity, its task (the training loss it was trained with,
    checked, and the measurement: task.py), the exact training images it was trained on (trained_positions), and
    the method with its settings."""
    cls = method_class(method)
    positions, _ = trained_positions(checkpoint, dataset)
    parts = {"method": method, "settings": cls.settings(), "model": model_identity(checkpoint),
             "task": Task.from_checkpoint(checkpoint).key(), "images": subset_digest(dataset, "train", positions)}
    if cls.needs_members:  # the ensemble's other models, and the test images its lists are computed for
        parts["members"] = [checkpoint_digest(m) for m in ensemble_members(checkpoint)]
        parts["test_images"] = split_digest(dataset, "test")
    portable = {**parts, "images": subset_digest(dataset, "train", positions, portable=True)}  # a shipped copy's
    if cls.needs_members:
        portable["test_images"] = split_digest(dataset, "test", portable=True)
    return CacheKey("influence", INDEX_VERSION, parts, label=method, portable=portable)


def index_path(method: str, checkpoint, dataset) -> Path:
    """The cache file of one method's index (see index_key)."""
    return default_store().path(index_key(method, checkpoint, dataset))


def index_ready(method: str, checkpoint, dataset) -> bool:
    """Whether the method's index is at hand (stored, or kept in memory without a disk) without fitting it."""
    return default_store().has(index_key(method, checkpoint, dataset))


def build_timing_key(method: str, checkpoint, dataset) -> str:
    """What an index's build time depends on: the method, the network and its size, the images, the device."""
    from cifarviz.core.utils import pick_device

    parameters = sum(p.numel() for p in checkpoint.model.parameters())
    return (f"influence/{method}/{checkpoint.model.arch_name}/{parameters}/{len(dataset.train)}/"
            f"{pick_device('auto').type}")


def build_estimate(method: str, checkpoint, dataset, *, probe: bool = True) -> tuple[float | None, str]:
    """Seconds the method's index should take to build on this machine, and where that figure comes from: the last
    build here (store/timings.py), else, for the gradient methods, per-example gradients timed on 128 training
    images and scaled to every image and model (`probe`; about a second). (None, "") when neither is known."""
    measured = timings.expected_seconds(build_timing_key(method, checkpoint, dataset))
    if measured is not None:
        return measured, "as long as it took on this machine last time"
    cls = method_class(method)
    if not probe or not cls.takes_minutes:
        return None, ""
    from .trak import BATCH, MarginGradients, chosen_parameters, projection_dim

    positions, _ = trained_positions(checkpoint, dataset)
    models = 1 + (len(ensemble_members(checkpoint)) if cls.needs_members else 0)
    gradients = MarginGradients(checkpoint.model, chosen_parameters(checkpoint.model),
                                projection_dim(2048, len(positions)), 0)
    images, labels = dataset.train.images[:BATCH], dataset.train.labels[:BATCH]
    gradients(images, labels)  # the first call pays for tracing
    started = time.perf_counter()
    for _ in range(2):
        gradients(images, labels)
        gradients.probabilities(images)
    per_image = (time.perf_counter() - started) / (2 * BATCH)
    return per_image * len(positions) * models * 1.1, "estimated from per-example gradients timed just now"


def _origin(checkpoint, dataset) -> dict:
    return {"model": checkpoint_digest(checkpoint), "images": split_digest(dataset, "train"),
            "train_images": len(dataset.train)}


def load_or_fit(method: str, checkpoint, dataset, *, on_progress: Progress | None = None,
                progress: bool = False) -> InfluenceIndex:
    """The method's index for (checkpoint, dataset.train): read from the store (checked: one row per training
    image, finite, the method's arrays), or fitted once and saved atomically. A file lock makes a second process
    wait for the first one's index instead of fitting it again."""
    cls = method_class(method)
    positions, _ = trained_positions(checkpoint, dataset)
    fitted: list[InfluenceIndex] = []

    extra = {"members": ensemble_members(checkpoint)} if cls.needs_members else {}

    def fit() -> dict:
        bar = _terminal_bar(f"{method} index for {checkpoint.name}") if progress else None
        started = time.monotonic()
        index = cls.fit(checkpoint, _training_subset(dataset, positions), on_progress=_both(on_progress, bar),
                        **extra)
        timings.record(build_timing_key(method, checkpoint, dataset), time.monotonic() - started)  # next estimate
        if bar is not None:
            bar.close()
        fitted.append(index)
        return index.state()

    state = default_store().cached(index_key(method, checkpoint, dataset), fit, Schema(cls.arrays),
                                   dims=_index_dims(positions, dataset),
                                   memo=False)  # the app keeps indexes itself
    index = fitted[0] if fitted else cls.from_state(state)
    index.origin = _origin(checkpoint, dataset)
    index.positions = positions
    return index


def ship_index(method: str, checkpoint, dataset) -> Path:
    """Build (or read) the method's index and copy it into the shipped folder (checkpoints/store/): for the
    maintainers of a shipped checkpoint whose default index takes minutes (lenet's ensemble). A fresh clone on the
    same data then reads it at once; any other data, weights or settings miss its key and build their own."""
    index = load_or_fit(method, checkpoint, dataset, progress=True)
    return default_store().ship(index_key(method, checkpoint, dataset), Schema(method_class(method).arrays),
                                dims=_index_dims(index.positions, dataset))


def _index_dims(positions, dataset) -> dict:
    """The sizes an index's schema checks: its training images, the test split, the classes."""
    return {"n": len(positions), "t": len(dataset.test), "c": len(dataset.classes)}


def _check_origin(index: InfluenceIndex, checkpoint, dataset) -> None:
    """An index answers only for the checkpoint and training images it was built from."""
    if index.origin is not None and index.origin != _origin(checkpoint, dataset):
        raise InfluenceError(f"This {index.name} index was built for another checkpoint or other training images "
                             f"than {checkpoint.name} on {dataset.root}: build it with load_or_fit for this pair.")
    if index.n_train != len(_positions(index, dataset)):
        raise InfluenceError(f"This {index.name} index covers {index.n_train:,} training images, but the training "
                             f"split has {len(dataset.train):,}: build it with load_or_fit for this data.")


@dataclass
class InfluenceEntry:
    train_index: int  # position in the training split the checkpoint was trained on (dataset.train)
    source_index: int  # the image's index in the dataset's own training order
    label: str
    predicted: str  # the model's prediction on this training image
    score: float


@dataclass
class InfluenceResult:
    method: str
    checkpoint: str
    checkpoint_digest: str
    data_fingerprint: str
    query: dict  # {"test_index": i} or {"class": name, "test_images": n}
    helpful: list[InfluenceEntry]
    harmful: list[InfluenceEntry]
    training_images: int = 0  # how many training images were ranked (those the checkpoint was trained on)
    # an ensemble's: how many of its models rank each listed image in their own top 100 (TrakEnsemble.agreement)
    agreement: dict | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _positions(index: InfluenceIndex, dataset) -> np.ndarray:
    """Index row -> position in dataset.train (rows are the images the checkpoint was trained on)."""
    return index.positions if index.positions is not None else np.arange(len(dataset.train))


def _entries(rows: np.ndarray, scores: np.ndarray, positions: np.ndarray, dataset,
             predicted: np.ndarray) -> list[InfluenceEntry]:
    """rows: index rows, scores: their scores (in the same order)."""
    classes, train = dataset.classes, dataset.train
    entries = []
    for row, score in zip(rows, scores):
        i = int(positions[row])
        entries.append(InfluenceEntry(i, int(train.source_index[i]), classes[int(train.labels[i])],
                                      classes[int(predicted[i])], float(score)))
    return entries


def _result(index, checkpoint, dataset, query: dict, ranked) -> InfluenceResult:
    helpful, helpful_scores, harmful, harmful_scores = ranked
    predicted = split_artifacts(checkpoint, dataset, "train").predicted
    positions = _positions(index, dataset)
    return InfluenceResult(index.name, checkpoint.name, checkpoint_digest(checkpoint), dataset.fingerprint, query,
                           helpful=_entries(helpful, helpful_scores, positions, dataset, predicted),
                           harmful=_entries(harmful, harmful_scores, positions, dataset, predicted),
                           training_images=len(positions))


def _ranked(scores: np.ndarray, k: int):
    order = np.argsort(-scores, kind="stable")
    k = max(0, min(int(k), len(scores)))
    return order[:k], scores[order[:k]], order[::-1][:k], scores[order[::-1][:k]]


def lookup(index: InfluenceIndex, checkpoint, dataset, test_index: int, k: int = 10) -> InfluenceResult:
    """The k most helpful and k most harmful training images for one test image."""
    if not 0 <= int(test_index) < len(dataset.test):
        raise InfluenceError(f"Test index {test_index} is out of range: the test split has {len(dataset.test):,} images.")
    _check_origin(index, checkpoint, dataset)
    ranked = index.ranked(checkpoint, dataset, int(test_index), int(k))
    result = _result(index, checkpoint, dataset, {"test_index": int(test_index)}, ranked)
    if hasattr(index, "agreement"):
        result.agreement = index.agreement(int(test_index), len(result.helpful))
    return result


def class_lookup(index: InfluenceIndex, checkpoint, dataset, class_name: str, k: int = 10) -> InfluenceResult:
    """The training images that most help and most hurt a whole test class (mean score over its test images)."""
    if class_name not in dataset.classes:
        raise InfluenceError(f"Unknown class {class_name!r}. Classes: {', '.join(dataset.classes)}.")
    _check_origin(index, checkpoint, dataset)
    label = dataset.classes.index(class_name)
    scores = index.class_scores(checkpoint, dataset, label)
    members = int((dataset.test.labels == label).sum())
    return _result(index, checkpoint, dataset, {"class": class_name, "test_images": members}, _ranked(scores, k))


def suspicious(index: InfluenceIndex, top: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training indices ranked by self-influence (likely mislabelled or atypical first), with their scores."""
    scores = index.self_influence()
    order = np.argsort(-scores, kind="stable")
    order = order if top is None else order[:top]
    positions = index.positions if index.positions is not None else np.arange(len(scores))
    return positions[order], scores[order]  # positions in dataset.train: only the images it was trained on


def suspicious_rankings(index: InfluenceIndex, checkpoint, dataset, top: int | None = None) -> dict:
    """Rankings of the training images the checkpoint was trained on, most suspicious (likely mislabelled) first:
    name -> (positions in dataset.train, values). "training loss" always; MARGIN_RANKING where training recorded each
    image's margin (margin_ranking); "self-influence (METHOD)" where the method has one; "mean training loss" (each
    image's plain loss averaged over the ensemble's models) for an ensemble."""
    rankings = {"training loss": loss_ranking(checkpoint, dataset, top)}
    margins = margin_ranking(checkpoint, dataset, top)
    if margins is not None:
        rankings[MARGIN_RANKING] = margins
    if index.has_self_influence:
        rankings[f"self-influence ({index.name})"] = suspicious(index, top)
    mean_losses = getattr(index, "mean_losses", None)
    if mean_losses is not None:
        order = np.argsort(-mean_losses, kind="stable")[:top]
        rankings["mean training loss"] = (_positions(index, dataset)[order], mean_losses[order])
    return rankings


def best_ranking(checkpoint, names) -> tuple[str, float | None]:
    """Of the rankings `names`, the one that found flipped labels best in the card's measurement
    (bench/bench_suspicious.py), with its recall; unmeasured: the training loss, which found them better than
    self-influence in every measurement so far (README)."""
    from cifarviz.core.errors import ModelError
    from cifarviz.core.models import model_card

    try:
        figures = model_card(checkpoint.model.arch_name).mislabels
    except ModelError:
        figures = None
    measured = {n: figures.recall[n] for n in names if figures and n in figures.recall}
    if measured:
        best = max(measured, key=measured.get)
        return best, measured[best]
    return "training loss", None


MARGIN_RANKING = "area under the margin"
RANKING_MEANINGS = {  # what each suspicious ranking measures, in a sentence for the page (by the name's first part)
    "training loss": "how wrong this one checkpoint is about the image's given label (its plain cross-entropy)",
    MARGIN_RANKING: ("how far below the other classes the model kept the given label while it trained, averaged over "
                     "the second half of training (recorded by the run itself: runs trained with this version)"),
    "mean training loss": ("the plain cross-entropy of the image's given label averaged over the ensemble's models "
                           "(this checkpoint and other seeds of its recipe), not one checkpoint's"),
    "self-influence": "how much the image's own loss depends on it being in the training set",
}


def ranking_meaning(name: str) -> str:
    """The sentence for a suspicious ranking's name ("self-influence (head)" -> self-influence's)."""
    return RANKING_MEANINGS.get(name, RANKING_MEANINGS.get(name.split(" (")[0], ""))



def margin_ranking(checkpoint, dataset, top: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The training images by the margin they kept while the checkpoint trained (Pleiss et al.'s area under the
    margin: their label's logit minus the largest other, on the augmented copies the network trained on, averaged
    over epochs), lowest first, as (positions in dataset.train, minus the mean margin: higher = more suspicious).
    One training run's own record, no other model needed. None when the checkpoint recorded none, or recorded it
    for images that are not in this training split."""
    stats = getattr(checkpoint, "statistics", None) or {}
    if "mean_margin" not in stats or "source_index" not in stats:
        return None
    positions, found = positions_of_sources(dataset, stats["source_index"])
    if not found.all():
        return None  # another split or data: the record is not of these images
    suspicion = -np.asarray(stats["mean_margin"], dtype=np.float64)
    ranked = np.argsort(-suspicion, kind="stable")
    ranked = ranked if top is None else ranked[:top]
    return positions[ranked], suspicion[ranked]


def loss_ranking(checkpoint, dataset, top: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The plain ranking beside self-influence: training images (positions in dataset.train) by their training
    loss, highest first, over the images the checkpoint was trained on."""
    positions, _ = trained_positions(checkpoint, dataset)
    losses = training_losses(checkpoint, dataset)[positions]
    order = np.argsort(-losses, kind="stable")
    order = order if top is None else order[:top]
    return positions[order], losses[order]


def training_losses(checkpoint, dataset) -> np.ndarray:
    """Each training image's cross-entropy under the model: the plain 'highest loss' ranking beside self-influence."""
    arts = split_artifacts(checkpoint, dataset, "train")
    logits = arts.logits.astype(np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return -log_probs[np.arange(len(arts.labels)), arts.labels]


def _terminal_bar(desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=100, desc=desc, unit="%")


def _both(report: Progress | None, bar) -> Progress | None:
    if bar is None:
        return report

    def both(fraction: float) -> None:
        percent = round(100 * fraction)
        if percent != bar.n:  # drawn once per percent, not once per batch (a log file filled with redraws)
            bar.n = percent
            bar.refresh()
        if report is not None:
            report(fraction)

    return both
