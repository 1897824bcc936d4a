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

from ..artifacts import checkpoint_digest, split_artifacts, split_digest
from ..jobs import file_lock
from ..utils import atomic_write, cache_dir
from .base import InfluenceError, InfluenceIndex, Progress
from .head import HeadInfluence
from .similarity import FeatureSimilarity
from .trak import TrakInfluence

METHODS: dict[str, type[InfluenceIndex]] = {m.name: m for m in (HeadInfluence, TrakInfluence, FeatureSimilarity)}
DEFAULT_METHOD = "head"
INDEX_VERSION = 2

__all__ = ["METHODS", "DEFAULT_METHOD", "InfluenceError", "InfluenceIndex", "InfluenceEntry", "InfluenceResult",
           "index_path", "load_or_fit", "lookup", "class_lookup", "suspicious", "training_losses", "method_class"]


def method_class(method: str) -> type[InfluenceIndex]:
    try:
        return METHODS[method]
    except KeyError:
        raise InfluenceError(f"Unknown influence method {method!r}. Methods: {', '.join(METHODS)}.") from None


def index_path(method: str, checkpoint, dataset) -> Path:
    """The cache file of one method's index: keyed by the weights, the TTA-free training split, and the method."""
    method_class(method)
    key = f"v{INDEX_VERSION}-{method}-{checkpoint_digest(checkpoint)}-{split_digest(dataset, 'train')}"
    return cache_dir() / "influence" / f"{key}.npz"


def load_or_fit(method: str, checkpoint, dataset, *, on_progress: Progress | None = None,
                progress: bool = False) -> InfluenceIndex:
    """The method's index for (checkpoint, dataset.train): read from disk, or fitted once and saved atomically.
    A file lock makes a second process wait for the first one's index instead of fitting it again."""
    cls = method_class(method)
    path = index_path(method, checkpoint, dataset)
    if (index := _read(cls, path)) is not None:
        return index
    with file_lock(path):
        if (index := _read(cls, path)) is not None:
            return index
        bar = _terminal_bar(f"{method} index for {checkpoint.name}") if progress else None
        report = _both(on_progress, bar)
        index = cls.fit(checkpoint, dataset, on_progress=report)
        if bar is not None:
            bar.close()
        with atomic_write(path) as fh:
            np.savez(fh, **index.state())
    return index


def _read(cls, path: Path) -> InfluenceIndex | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return cls.from_state({name: z[name] for name in z.files})
    except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt, never trusted
        return None


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
    scores = index.scores(checkpoint, dataset, [int(test_index)])[0]
    return _result(index.name, checkpoint, dataset, {"test_index": int(test_index)}, scores, k)


def class_lookup(index: InfluenceIndex, checkpoint, dataset, class_name: str, k: int = 10) -> InfluenceResult:
    """The training images that most help and most hurt a whole test class (mean score over its test images)."""
    if class_name not in dataset.classes:
        raise InfluenceError(f"Unknown class {class_name!r}. Classes: {', '.join(dataset.classes)}.")
    members = np.flatnonzero(dataset.test.labels == dataset.classes.index(class_name))
    scores = index.mean_scores(checkpoint, dataset, members)
    return _result(index.name, checkpoint, dataset, {"class": class_name, "test_images": int(len(members))}, scores, k)


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
