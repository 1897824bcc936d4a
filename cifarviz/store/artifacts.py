"""Derived artifacts (logits, penultimate features, labels) computed once per (checkpoint, data, split).

They go through the store (cache.py), keyed by everything that determines their content:
the architecture and its arguments, the weights, the test-time augmentation, the data's
content and the exact images of the split (so another validation size, split seed or
subset never reads a stale file), and are checked on read (row counts, classes, labels).
The CLI, the app, a second browser tab and a restarted server all reuse one computation;
a file lock per artifact makes two processes that ask at once compute it once.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from cifarviz.core.checkpoint import Checkpoint, output_classes
from cifarviz.core.errors import DataError
from cifarviz.core.inference import Predictions, predict
from cifarviz.store.cache import Array, CacheKey, Schema, canonical, default_store

ARTIFACT_VERSION = 3  # 3: keyed by architecture and arguments too, stored through the store
ARTIFACT_ARRAYS = {"logits": Array("f", ("n", "classes")), "features": Array("f", ("n", None)),
                   "labels": Array("i", ("n",), low=0)}


PREVIEW_SEED = 0  # the order a previewed split is predicted in (any prefix of it is a random sample)


def preview_order(n: int) -> np.ndarray:
    """The seeded random order of a split's images for a preview: the first k of it are k images drawn at random
    without replacement, so the accuracy on them estimates the whole split's (a split stored class by class, as
    an image folder is, would otherwise preview one class)."""
    return np.random.default_rng(PREVIEW_SEED).permutation(n)


@dataclass
class PartialPredictions:
    """What a split's first pass has predicted so far: `positions` (indices into the split, a random sample in
    the order of preview_order) and the class predicted for each."""
    positions: np.ndarray
    predicted: np.ndarray
    total: int


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
        return (self.features / (np.linalg.norm(self.features, axis=-1, keepdims=True) + 1e-12)).astype(np.float32)


_WEIGHT_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> digest, never stored on it


def weights_digest(model) -> str:
    """Content hash of a model's tensors (names, dtypes, shapes, values), remembered per model object."""
    weights = _WEIGHT_DIGESTS.get(model)
    if weights is None:
        digest = hashlib.sha256()
        for key, value in sorted(model.state_dict().items()):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update((tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy().tobytes())
        weights = _WEIGHT_DIGESTS[model] = digest.hexdigest()
    return weights


def model_identity(checkpoint: Checkpoint) -> dict:
    """Everything about a checkpoint that changes its forward pass: architecture, its arguments, weights, TTA.
    (The same tensors loaded as deepnet-res and as deepnet-conv compute different things.)"""
    model = checkpoint.model
    return {"architecture": model.arch_name, "arch_args": canonical(model.arch_args), "weights": weights_digest(model),
            "tta": checkpoint.tta}


def checkpoint_digest(checkpoint: Checkpoint) -> str:
    """A short hash of `model_identity`: what results computed from this checkpoint are keyed and labelled by."""
    text = json.dumps(model_identity(checkpoint), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]



_SPLIT_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Split -> (data content, digest)


def split_digest(dataset, split: str, *, portable: bool = False) -> str:
    """Which images a split holds: the data's content and the images' indices in the source, so val size, split
    seed, subsets and a replaced image all count. Remembered per split object (pages ask several times a rerun).
    portable: the data by its fingerprint alone (files' names and sizes, not their times): the same on every copy
    of the same data (CacheKey.portable)."""
    data = dataset.split(split)
    if portable:
        digest = hashlib.sha256(f"{dataset.fingerprint}-{split}-{len(data)}".encode())
        digest.update(np.ascontiguousarray(data.source_index, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]
    content = getattr(dataset, "content_key", "") or dataset.fingerprint
    known = _SPLIT_DIGESTS.get(data)
    if known is not None and known[0] == content:
        return known[1]
    digest = hashlib.sha256(f"{content}-{split}-{len(data)}".encode())
    digest.update(np.ascontiguousarray(data.source_index, dtype=np.int64).tobytes())
    _SPLIT_DIGESTS[data] = (content, digest.hexdigest()[:16])
    return _SPLIT_DIGESTS[data][1]


def subset_digest(dataset, split: str, positions: np.ndarray, *, portable: bool = False) -> str:
    """split_digest of the split cut to `positions`, without building that split (equal to it when it is built)."""
    data = dataset.split(split)
    if len(positions) == len(data):
        return split_digest(dataset, split, portable=portable)
    content = dataset.fingerprint if portable else getattr(dataset, "content_key", "") or dataset.fingerprint
    digest = hashlib.sha256(f"{content}-{split}-{len(positions)}".encode())
    digest.update(np.ascontiguousarray(data.source_index[positions], dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def split_tta(checkpoint: Checkpoint, split: str) -> str:
    """Test-time augmentation for a split: the checkpoint's for val/test (reported metrics), none for the
    training split, whose artifacts feed neighbour search and embeddings (one pass instead of two)."""
    return "none" if split == "train" else checkpoint.tta


def artifact_key(checkpoint: Checkpoint, dataset, split: str, tta: str | None = None) -> CacheKey:
    """The store key of a split's artifacts with test-time augmentation `tta` (default: the split's own)."""
    tta = split_tta(checkpoint, split) if tta is None else tta
    identity = {**model_identity(checkpoint), "tta": tta}
    return CacheKey("artifacts", ARTIFACT_VERSION, {"model": identity, "images": split_digest(dataset, split),
                                                    "split": split}, label=f"{split}-{tta}")


def artifact_path(checkpoint: Checkpoint, dataset, split: str, tta: str | None = None) -> Path:
    """The cache file of a split's artifacts (see artifact_key)."""
    return default_store().path(artifact_key(checkpoint, dataset, split, tta))


def _schema(labels: np.ndarray) -> Schema:
    def same_labels(arrays, dims):
        return None if np.array_equal(arrays["labels"], labels) else "labels differ from the split's labels"

    return Schema(ARTIFACT_ARRAYS, check=same_labels)


def _dims(checkpoint: Checkpoint, dataset, split: str) -> dict:
    return {"n": len(dataset.split(split)), "classes": output_classes(checkpoint.model)}


def artifacts_cached(checkpoint: Checkpoint, dataset, split: str, tta: str | None = None) -> bool:
    """Whether the split's artifacts are at hand (on disk and valid, or in memory) without computing them."""
    tta = split_tta(checkpoint, split) if tta is None else tta
    key = artifact_key(checkpoint, dataset, split, tta)
    return default_store().read(key, _schema(dataset.split(split).labels), _dims(checkpoint, dataset, split)) \
        is not None


def split_artifacts(checkpoint: Checkpoint, dataset, split: str = "test", *, tta: str | None = None,
                    progress: bool = False, device: str = "auto", on_progress=None,
                    on_partial=None) -> SplitArtifacts:
    """Logits, features and labels of `split`, from the store or computed (and stored) now.

    With flip test-time augmentation the plain pass is computed and cached first, on its own: a page can
    show those predictions while the flipped pass runs, and the second pass reuses the first.

    `on_partial(PartialPredictions)`: the plain pass then predicts the images in preview_order and reports after
    every batch what it has so far, so a page can show a first estimate within a second or two. The stored
    result is the same (put back in the split's order; each image's logits do not depend on its batch)."""
    tta = split_tta(checkpoint, split) if tta is None else tta
    data = dataset.split(split)
    if len(data) == 0:
        raise DataError(f"The {split} split of {dataset.root} has no images"
                        + (" (a validation size of 0)" if split == "val" else "")
                        + ": choose another split, or a validation size of at least 1 (--val-size).")
    key = artifact_key(checkpoint, dataset, split, tta)

    def compute() -> dict:
        desc = f"{checkpoint.name} on {split}"
        if tta == "none" and on_partial is None:
            preds = predict(checkpoint.model, data.images, progress=progress, device=device, desc=desc,
                            on_progress=on_progress)
            logits, features = preds.logits, preds.features
        elif tta == "none":
            order, so_far = preview_order(len(data)), []

            def batch_done(batch_logits: np.ndarray) -> None:
                so_far.append(batch_logits.argmax(1))
                predicted = np.concatenate(so_far)
                on_partial(PartialPredictions(order[:len(predicted)], predicted, len(data)))

            preds = predict(checkpoint.model, data.images[order], progress=progress, device=device, desc=desc,
                            on_progress=on_progress, on_batch=batch_done)
            back = np.argsort(order)
            logits, features = preds.logits[back], preds.features[back]
        else:  # "flip": the mean of the plain and the mirrored image's logits
            half = (lambda start: lambda f: on_progress(start + 0.5 * f)) if on_progress else (lambda start: None)
            plain = split_artifacts(checkpoint, dataset, split, tta="none", progress=progress, device=device,
                                    on_progress=half(0.0), on_partial=on_partial)
            mirrored = predict(checkpoint.model, np.ascontiguousarray(data.images[:, :, ::-1]), features=False,
                               progress=progress, device=device, desc=f"{desc}, mirrored", on_progress=half(0.5))
            logits, features = 0.5 * (plain.logits + mirrored.logits), plain.features
        return {"logits": logits.astype(np.float32), "features": features.astype(np.float32), "labels": data.labels}

    arrays = default_store().cached(key, compute, _schema(data.labels), _dims(checkpoint, dataset, split))
    return _artifacts(arrays, split, tta)


def _artifacts(arrays: dict, split: str, tta: str) -> SplitArtifacts:
    """One SplitArtifacts per stored result (its cached properties are computed once for every reader)."""
    ident = id(arrays["logits"])
    with _ARTS_LOCK:
        known = _ARTS.get(ident)
        if known is not None and known.logits is arrays["logits"]:
            return known
        arts = _ARTS[ident] = SplitArtifacts(arrays["logits"], arrays["features"], arrays["labels"], split, tta)
        while len(_ARTS) > 64:
            _ARTS.pop(next(iter(_ARTS)))
    return arts


_ARTS: dict[int, SplitArtifacts] = {}
_ARTS_LOCK = threading.Lock()
