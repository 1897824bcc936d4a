"""Baseline: plain feature similarity, signed by the label.

A training image that the network sees as similar to the test image (cosine similarity of penultimate
features) helps when it carries the test image's true label and hurts when it carries another. No
gradients, no Hessian: the page shows it beside the real influence methods so a class can see where
"looks alike" and "was influential" agree and where they do not.
"""

from __future__ import annotations

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
        self.unit_features = unit_features  # (n, D) float32, rows of length 1
        self.labels = labels

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

        test = split_artifacts(checkpoint, dataset, "test")
        idx = np.atleast_1d(np.asarray(test_indices))
        similarity = self._unit(test.features[idx]) @ self.unit_features.T  # (T, n)
        same_label = self.labels[None, :] == test.labels[idx][:, None]
        return np.where(same_label, similarity, -similarity)

    def predicted_loss_change(self, score_sum: float, true_probability: float) -> float | None:
        return None  # a baseline: "looks alike" predicts no change

    def state(self) -> dict[str, np.ndarray]:
        return {"unit_features": self.unit_features, "labels": self.labels}

    @classmethod
    def from_state(cls, state):
        return cls(state["unit_features"], state["labels"])
