"""The interface every influence method shares: fit once per (checkpoint, training data), query many times.

Sign convention, for every method: a training image's score for a test image is positive when the image
*helps* it, meaning that removing the image from training would increase the test image's loss, and
negative when it *hurts* it (removing it would lower the loss). Helpful images are the highest scores,
harmful ones the lowest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from cifarviz.core.errors import CifarvizError

Progress = Callable[[float], None]


class InfluenceError(CifarvizError):
    """An influence method cannot run on this model or input."""


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The positions of the k largest scores, largest first: a partition then a sort of k, not a sort of every
    training image (a lookup's main cost over 45,000 scores)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))]  # by score, then position: the order a stable sort gives


class InfluenceIndex(ABC):
    """Fitted once (`fit`), saved and loaded as plain arrays (`state` / `from_state`), queried many times."""

    name: str = ""
    title: str = ""
    explanation: str = ""  # one sentence for the page
    score_meaning: str = "the predicted change of this image's loss if the training image were removed"
    has_self_influence: bool = True
    needs_members: bool = False  # fitted over the checkpoint and other models of its recipe (ensemble_members)
    takes_minutes: bool = False  # its fit is minutes of work on a CPU: the app asks before starting it
    arrays: ClassVar[dict] = {}  # the store schema of `state()`: name -> Array, with "n" the training images
    origin: dict | None = None  # what the index was built from (set by load_or_fit): model, images, method
    positions = None  # row -> position in dataset.train of the images it covers (set by load_or_fit); None: all

    @classmethod
    @abstractmethod
    def fit(cls, checkpoint, dataset, *, on_progress: Progress | None = None) -> InfluenceIndex:
        """Build the index over `dataset.train` for `checkpoint` (the expensive step)."""

    @abstractmethod
    def scores(self, checkpoint, dataset, test_indices) -> np.ndarray:
        """(len(test_indices), n_train) scores of every training image for each test image of `dataset.test`."""

    def mean_scores(self, checkpoint, dataset, test_indices, chunk: int = 256) -> np.ndarray:
        """(n_train,) the mean score over many test images: what helps or hurts a whole test class."""
        test_indices = np.asarray(test_indices)
        total = np.zeros(self.n_train)
        for start in range(0, len(test_indices), chunk):
            total += self.scores(checkpoint, dataset, test_indices[start:start + chunk]).sum(0)
        return total / max(len(test_indices), 1)

    def ranked(self, checkpoint, dataset, test_index: int, k: int):
        """(helpful rows, their scores, harmful rows, their scores): the k highest and k lowest scores of one test
        image, in order. Methods that keep precomputed lists override it with a read."""
        scores = self.scores(checkpoint, dataset, [int(test_index)])[0]
        k = max(0, min(int(k), len(scores)))
        helpful, harmful = top_k(scores, k), top_k(-scores, k)
        return helpful, scores[helpful], harmful, scores[harmful]

    def class_scores(self, checkpoint, dataset, class_index: int) -> np.ndarray:
        """(n_train,) the mean score over the test images of one class."""
        return self.mean_scores(checkpoint, dataset, np.flatnonzero(dataset.test.labels == class_index))

    def predicted_loss_change(self, score_sum: float, true_probability: float) -> float | None:
        """The method's own first-order estimate of how the test image's plain loss changes when the scored images
        are removed together: the sum of their scores here (the head's scores are loss changes); None for a method
        that predicts no change (the similarity baseline)."""
        return float(score_sum)

    def self_influence(self) -> np.ndarray:
        """(n_train,) how much each training image's own loss depends on it: high = atypical or mislabelled."""
        raise InfluenceError(f"The {self.title} method has no self-influence; use the head method.")

    @classmethod
    def settings(cls) -> dict:
        """The method's fixed settings that change its answers (part of the index's store key)."""
        return {}

    @property
    @abstractmethod
    def n_train(self) -> int: ...

    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """Arrays that restore the index (saved with numpy, never pickled)."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> InfluenceIndex: ...
