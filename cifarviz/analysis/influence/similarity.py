"""Baseline: plain feature similarity, signed by the label.

A training image that the network sees as similar to the test image (cosine similarity of penultimate
features) helps when it carries the test image's true label and hurts when it carries another. No
gradients, no Hessian: the page shows it beside the real influence methods so a class can see where
"looks alike" and "was influential" agree and where they do not.
"""

from __future__ import annotations

import threading
from typing import ClassVar

import numpy as np

from cifarviz.store.cache import Array

from .base import InfluenceIndex, Progress


class FeatureSimilarity(InfluenceIndex):
    name = "similarity"
    title = "Feature similarity (baseline)"
    explanation = ("Baseline: how alike the network finds each training image and the test image (cosine similarity "
                   "of their features), counted as helpful when the labels match and harmful when they differ.")
    score_meaning = "feature similarity, signed by whether the labels agree (not a predicted change)"
    has_self_influence = False
    arrays: ClassVar[dict] = {"unit_features": Array("f", ("n", None)), "labels": Array("i", ("n",), low=0)}

    def __init__(self, unit_features: np.ndarray, labels: np.ndarray):
        self.unit_features = np.ascontiguousarray(unit_features, dtype=np.float32)  # (n, D), rows of length 1
        self.labels = labels
        self._test = None  # (unit test features, test labels): read once at the first lookup, then kept
        self._reading = threading.Lock()  # an index is shared by every viewer of the server

    @property
    def n_train(self) -> int:
        return len(self.labels)

    @staticmethod
    def _unit(features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float32)
        return features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-12)

    @classmethod
    def fit(cls, checkpoint, dataset, *, on_progress: Progress | None = None):
        from cifarviz.store.artifacts import split_artifacts

        arts = split_artifacts(checkpoint, dataset, "train", on_progress=on_progress)
        return cls(cls._unit(arts.features), arts.labels.astype(np.int64))

    def scores(self, checkpoint, dataset, test_indices) -> np.ndarray:
        from cifarviz.store.artifacts import split_artifacts

        with self._reading:  # the index answers only for the checkpoint and data it was built from (lookup checks)
            if self._test is None:
                test = split_artifacts(checkpoint, dataset, "test")
                self._test = (self._unit(test.features), np.asarray(test.labels))
        unit, labels = self._test
        idx = np.atleast_1d(np.asarray(test_indices))
        similarity = unit[idx] @ self.unit_features.T  # (T, n)
        same_label = self.labels[None, :] == labels[idx][:, None]
        return np.where(same_label, similarity, -similarity)

    def predicted_loss_change(self, score_sum: float, true_probability: float) -> float | None:
        return None  # a baseline: "looks alike" predicts no change

    def state(self) -> dict[str, np.ndarray]:
        return {"unit_features": self.unit_features, "labels": self.labels}

    @classmethod
    def from_state(cls, state):
        return cls(state["unit_features"], state["labels"])
