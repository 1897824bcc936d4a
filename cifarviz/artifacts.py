"""Derived artifacts (logits, penultimate features, labels) computed once per (checkpoint, data, split).

They are cached on disk under the cache directory, keyed by the checkpoint's content
hash and the data fingerprint, so the CLI, the app, a second browser tab and a
restarted server all reuse one computation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint
from .inference import Predictions, predict
from .utils import atomic_write, cache_dir

ARTIFACT_VERSION = 1


@dataclass
class SplitArtifacts:
    logits: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    split: str

    @cached_property  # pages read these many times per rerun
    def probs(self) -> np.ndarray:
        return Predictions(self.logits, None).probs

    @cached_property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(1)


def checkpoint_digest(checkpoint: Checkpoint) -> str:
    """Content hash of the weights (not the path), so a re-trained file never serves stale artifacts."""
    cached = getattr(checkpoint, "_digest", None)
    if cached:
        return cached
    digest = hashlib.sha256()
    for key, value in sorted(checkpoint.model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    digest.update(checkpoint.tta.encode())
    checkpoint._digest = digest.hexdigest()[:16]
    return checkpoint._digest


def split_tta(checkpoint: Checkpoint, split: str) -> str:
    """Test-time augmentation for a split: the checkpoint's for val/test (reported metrics), none for the
    training split, whose artifacts feed neighbour search and embeddings (one pass instead of two)."""
    return "none" if split == "train" else checkpoint.tta


def artifact_path(checkpoint: Checkpoint, dataset, split: str) -> Path:
    key = (f"v{ARTIFACT_VERSION}-{checkpoint_digest(checkpoint)}-{dataset.fingerprint}-s{dataset.split_seed}-{split}"
           f"-{split_tta(checkpoint, split)}")
    return cache_dir() / "artifacts" / f"{key}.npz"


def split_artifacts(checkpoint: Checkpoint, dataset, split: str = "test", *, progress: bool = False,
                    device: str = "auto", on_progress=None) -> SplitArtifacts:
    """Logits, features and labels of `split`, from the disk cache or computed (and cached) now."""
    path = artifact_path(checkpoint, dataset, split)
    if path.is_file():
        try:
            with np.load(path) as z:
                return SplitArtifacts(z["logits"], z["features"], z["labels"], split)
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
            pass
    data = dataset.split(split)
    preds = predict(checkpoint.model, data.images, tta=split_tta(checkpoint, split), progress=progress, device=device,
                    desc=f"{checkpoint.name} on {split}", on_progress=on_progress)
    arts = SplitArtifacts(preds.logits.astype(np.float32), preds.features.astype(np.float32), data.labels, split)
    with atomic_write(path) as fh:
        np.savez(fh, logits=arts.logits, features=arts.features, labels=arts.labels)
    return arts
