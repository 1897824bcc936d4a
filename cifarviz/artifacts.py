"""Derived artifacts (logits, penultimate features, labels) computed once per (checkpoint, data, split).

They are cached on disk under the cache directory, keyed by everything that determines
their content: the checkpoint's weights and test-time augmentation, the data's
fingerprint, and the exact images of the split (so another validation size, split seed or
subset never reads a stale file). The CLI, the app, a second browser tab and a restarted
server all reuse one computation; a file lock per artifact makes two processes that ask
at once compute it once.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint
from .inference import Predictions, predict
from .jobs import file_lock
from .utils import atomic_write, cache_dir

ARTIFACT_VERSION = 2


@dataclass
class SplitArtifacts:
    logits: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    split: str
    tta: str = "none"  # the test-time augmentation the logits were computed with

    @cached_property  # pages read these many times per rerun
    def probs(self) -> np.ndarray:
        return Predictions(self.logits, None).probs

    @cached_property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(1)

    @cached_property  # the inspector's neighbour search, once per split instead of once per query
    def unit_features(self) -> np.ndarray:
        from .explore import unit_rows

        return unit_rows(self.features).astype(np.float32)


_WEIGHT_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> digest, never stored on it


def checkpoint_digest(checkpoint: Checkpoint) -> str:
    """Content hash of the weights (not the path) and the TTA, so a re-trained file never serves stale artifacts."""
    weights = _WEIGHT_DIGESTS.get(checkpoint.model)
    if weights is None:
        digest = hashlib.sha256()
        for key, value in sorted(checkpoint.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        weights = _WEIGHT_DIGESTS[checkpoint.model] = digest.hexdigest()
    return hashlib.sha256(f"{weights}-{checkpoint.tta}".encode()).hexdigest()[:16]


_SPLIT_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Split -> (data fingerprint, digest)


def split_digest(dataset, split: str) -> str:
    """Which images a split holds (their indices in the source), so val size, split seed and subsets all count.
    Remembered per split object: pages ask for it several times a rerun (a hash of 45,000 indices each time)."""
    data = dataset.split(split)
    known = _SPLIT_DIGESTS.get(data)
    if known is not None and known[0] == dataset.fingerprint:
        return known[1]
    digest = hashlib.sha256(f"{dataset.fingerprint}-{split}-{len(data)}".encode())
    digest.update(np.ascontiguousarray(data.source_index, dtype=np.int64).tobytes())
    _SPLIT_DIGESTS[data] = (dataset.fingerprint, digest.hexdigest()[:16])
    return _SPLIT_DIGESTS[data][1]


def split_tta(checkpoint: Checkpoint, split: str) -> str:
    """Test-time augmentation for a split: the checkpoint's for val/test (reported metrics), none for the
    training split, whose artifacts feed neighbour search and embeddings (one pass instead of two)."""
    return "none" if split == "train" else checkpoint.tta


def artifact_path(checkpoint: Checkpoint, dataset, split: str, tta: str | None = None) -> Path:
    """The cache file of a split's artifacts with test-time augmentation `tta` (default: the split's own)."""
    tta = split_tta(checkpoint, split) if tta is None else tta
    key = f"v{ARTIFACT_VERSION}-{checkpoint_digest(checkpoint)}-{split_digest(dataset, split)}-{split}-{tta}"
    return cache_dir() / "artifacts" / f"{key}.npz"


def _read(path: Path, split: str, tta: str) -> SplitArtifacts | None:
    try:
        return _load(path, split, tta)
    except Exception:  # noqa: BLE001 - a missing or damaged cache file is (re)computed
        return None


@lru_cache(maxsize=12)  # the files are content-addressed and never rewritten; failures raise, so are not kept
def _load(path: Path, split: str, tta: str) -> SplitArtifacts:
    with np.load(path) as z:
        return SplitArtifacts(z["logits"], z["features"], z["labels"], split, tta)


def split_artifacts(checkpoint: Checkpoint, dataset, split: str = "test", *, tta: str | None = None,
                    progress: bool = False, device: str = "auto", on_progress=None) -> SplitArtifacts:
    """Logits, features and labels of `split`, from the disk cache or computed (and cached) now.

    With flip test-time augmentation the plain pass is computed and cached first, on its own: a page can
    show those predictions while the flipped pass runs, and the second pass reuses the first."""
    tta = split_tta(checkpoint, split) if tta is None else tta
    path = artifact_path(checkpoint, dataset, split, tta)
    if path.is_file() and (arts := _read(path, split, tta)) is not None:
        return arts
    with file_lock(path):  # another process may be computing it: wait, then read its result
        if path.is_file() and (arts := _read(path, split, tta)) is not None:
            return arts
        data = dataset.split(split)
        desc = f"{checkpoint.name} on {split}"
        if tta == "none":
            preds = predict(checkpoint.model, data.images, progress=progress, device=device, desc=desc,
                            on_progress=on_progress)
            logits, features = preds.logits, preds.features
        else:  # "flip": the mean of the plain and the mirrored image's logits
            half = (lambda start: lambda f: on_progress(start + 0.5 * f)) if on_progress else (lambda start: None)
            plain = split_artifacts(checkpoint, dataset, split, tta="none", progress=progress, device=device,
                                    on_progress=half(0.0))
            mirrored = predict(checkpoint.model, np.ascontiguousarray(data.images[:, :, ::-1]), features=False,
                               progress=progress, device=device, desc=f"{desc}, mirrored", on_progress=half(0.5))
            logits, features = 0.5 * (plain.logits + mirrored.logits), plain.features
        arts = SplitArtifacts(logits.astype(np.float32), features.astype(np.float32), data.labels, split, tta)
        with atomic_write(path) as fh:
            np.savez(fh, logits=arts.logits, features=arts.features, labels=arts.labels)
    return arts
