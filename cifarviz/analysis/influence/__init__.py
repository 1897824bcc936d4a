"""Which training images made the model decide what it decided: influence methods behind one interface.

    index = load_or_fit("head", checkpoint, dataset)          # once per (checkpoint, training data), cached on disk
    result = lookup(index, checkpoint, dataset, test_index=42, k=10)   # then any test image, in milliseconds
    result.helpful, result.harmful                             # lists of InfluenceEntry

Methods (`METHODS`): "head" (Koh & Liang's influence function on the classifier head, exact Hessian: the
default), "trak" (TRAK-style projected gradients over the whole network or its last layers), "similarity"
(a baseline: label-signed feature similarity). Every method follows one sign convention (base.py):
positive = helpful = removing the image would raise the test image's loss.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cifarviz.store.artifacts import checkpoint_digest, model_identity, split_artifacts, split_digest
from cifarviz.store.cache import CacheKey, Schema, default_store

from .base import InfluenceError, InfluenceIndex, Progress
from .task import MEASUREMENT, Task
from .head import HeadInfluence
from .similarity import FeatureSimilarity
from .trak import TrakInfluence

METHODS: dict[str, type[InfluenceIndex]] = {m.name: m for m in (HeadInfluence, TrakInfluence, FeatureSimilarity)}
DEFAULT_METHOD = "head"
INDEX_VERSION = 4  # 4: the head's test side is the plain loss (task.py); keyed by the task

__all__ = [
    "DEFAULT_METHOD",
    "MEASUREMENT",
    "Task",
    "METHODS",
    "InfluenceEntry",
    "InfluenceError",
    "InfluenceIndex",
    "InfluenceResult",
    "class_lookup",
    "index_key",
    "index_path",
    "load_or_fit",
    "lookup",
    "method_class",
    "suspicious",
    "training_losses",
]


def method_class(method: str) -> type[InfluenceIndex]:
    try:
        return METHODS[method]
    except KeyError:
        raise InfluenceError(f"Unknown influence method {method!r}. Methods: {', '.join(METHODS)}.") from None


def index_key(method: str, checkpoint, dataset) -> CacheKey:
    """The store key of one method's index: the model's identity, its task (the training loss it was trained with,
    checked, and the measurement: task.py), the exact training images, and the method with its settings."""
    cls = method_class(method)
    return CacheKey("influence", INDEX_VERSION, {
        "method": method, "settings": cls.settings(), "model": model_identity(checkpoint),
        "task": Task.from_checkpoint(checkpoint).key(), "images": split_digest(dataset, "train"),
    }, label=method)


def index_path(method: str, checkpoint, dataset) -> Path:
    """The cache file of one method's index (see index_key)."""
    return default_store().path(index_key(method, checkpoint, dataset))


def _origin(checkpoint, dataset) -> dict:
    return {"model": checkpoint_digest(checkpoint), "images": split_digest(dataset, "train"),
            "train_images": len(dataset.train)}


def load_or_fit(method: str, checkpoint, dataset, *, on_progress: Progress | None = None,
                progress: bool = False) -> InfluenceIndex:
    """The method's index for (checkpoint, dataset.train): read from the store (checked: one row per training
    image, finite, the method's arrays), or fitted once and saved atomically. A file lock makes a second process
    wait for the first one's index instead of fitting it again."""
    cls = method_class(method)

    def fit() -> dict:
        bar = _terminal_bar(f"{method} index for {checkpoint.name}") if progress else None
        index = cls.fit(checkpoint, dataset, on_progress=_both(on_progress, bar))
        if bar is not None:
            bar.close()
        fitted.append(index)
        return index.state()

    fitted: list[InfluenceIndex] = []
    state = default_store().cached(index_key(method, checkpoint, dataset), fit, Schema(cls.arrays),
                                   dims={"n": len(dataset.train)}, memo=False)  # the app keeps indexes itself
    index = fitted[0] if fitted else cls.from_state(state)
    index.origin = _origin(checkpoint, dataset)
    return index


def _check_origin(index: InfluenceIndex, checkpoint, dataset) -> None:
    """An index answers only for the checkpoint and training images it was built from."""
    if index.origin is not None and index.origin != _origin(checkpoint, dataset):
        raise InfluenceError(f"This {index.name} index was built for another checkpoint or other training images "
                             f"than {checkpoint.name} on {dataset.root}: build it with load_or_fit for this pair.")
    if index.n_train != len(dataset.train):
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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _entries(order: np.ndarray, scores: np.ndarray, dataset, predicted: np.ndarray) -> list[InfluenceEntry]:
    classes, train = dataset.classes, dataset.train
    return [InfluenceEntry(int(i), int(train.source_index[i]), classes[int(train.labels[i])],
                           classes[int(predicted[i])], float(scores[i])) for i in order]


def _result(method, checkpoint, dataset, query: dict, scores: np.ndarray, k: int) -> InfluenceResult:
    k = max(0, min(int(k), len(scores)))
    predicted = split_artifacts(checkpoint, dataset, "train").predicted
    order = np.argsort(-scores, kind="stable")
    return InfluenceResult(method, checkpoint.name, checkpoint_digest(checkpoint), dataset.fingerprint, query,
                           helpful=_entries(order[:k], scores, dataset, predicted),
                           harmful=_entries(order[::-1][:k], scores, dataset, predicted))


def lookup(index: InfluenceIndex, checkpoint, dataset, test_index: int, k: int = 10) -> InfluenceResult:
    """The k most helpful and k most harmful training images for one test image."""
    if not 0 <= int(test_index) < len(dataset.test):
        raise InfluenceError(f"Test index {test_index} is out of range: the test split has {len(dataset.test):,} images.")
    _check_origin(index, checkpoint, dataset)
    scores = index.scores(checkpoint, dataset, [int(test_index)])[0]
    return _result(index.name, checkpoint, dataset, {"test_index": int(test_index)}, scores, k)


def class_lookup(index: InfluenceIndex, checkpoint, dataset, class_name: str, k: int = 10) -> InfluenceResult:
    """The training images that most help and most hurt a whole test class (mean score over its test images)."""
    if class_name not in dataset.classes:
        raise InfluenceError(f"Unknown class {class_name!r}. Classes: {', '.join(dataset.classes)}.")
    _check_origin(index, checkpoint, dataset)
    members = np.flatnonzero(dataset.test.labels == dataset.classes.index(class_name))
    scores = index.mean_scores(checkpoint, dataset, members)
    return _result(index.name, checkpoint, dataset, {"class": class_name, "test_images": len(members)}, scores, k)


def suspicious(index: InfluenceIndex, top: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training indices ranked by self-influence (likely mislabelled or atypical first), with their scores."""
    scores = index.self_influence()
    order = np.argsort(-scores, kind="stable")
    order = order if top is None else order[:top]
    return order, scores[order]


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
        bar.n = round(100 * fraction)
        bar.refresh()
        if report is not None:
            report(fraction)

    return both
