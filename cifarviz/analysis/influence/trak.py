"""TRAK-style influence over the whole network (or its last layers): randomly projected per-example gradients.

Following TRAK (Park et al., 2023) with one checkpoint: each training image i gets phi_i, a random projection
of the gradient of its margin  m = logit_y - logsumexp(other logits)  with respect to the chosen parameters;
with Phi stacking them and q_i = 1 - p_i(y_i),

    score_i(test) = phi_test^T (Phi^T Phi + ridge I)^-1 phi_i * q_i

(positive: image i raises the test image's margin, so removing it would raise its loss: it helps).
The index stores (Phi (Phi^T Phi + ridge I)^-1) * q, so a lookup is one per-example gradient and one matrix-vector
product.

The projection is a CountSketch (each gradient coordinate is added, with a random sign, to one of k
buckets): a sparse Johnson-Lindenstrauss transform that costs O(parameters) per image and needs no k x d
random matrix, which keeps the whole training split within minutes on two CPU cores. Models with more than
`PARAM_BUDGET` trainable parameters use their last layers only (walking back from the head until the budget
is reached); the index records which.
"""

from __future__ import annotations

import copy
import threading
from typing import ClassVar

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from cifarviz.core.augment import to_float
from cifarviz.store.cache import Array

from .base import InfluenceIndex, Progress

PARAM_BUDGET = 350_000
PROJECTION_DIM = 2048
BATCH = 64
RIDGE = 1e-3  # added to Phi^T Phi: this multiple of its mean diagonal


def chosen_parameters(model: torch.nn.Module, budget: int = PARAM_BUDGET) -> list[str]:
    """All trainable parameters if they fit the budget, else the last ones (nearest the output) that do."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if sum(p.numel() for _, p in named) <= budget:
        return [name for name, _ in named]
    chosen, total = [], 0
    for name, p in reversed(named):
        if chosen and total + p.numel() > budget:
            break
        chosen.append(name)
        total += p.numel()
    return chosen[::-1]


class CountSketch:
    """A seeded sparse random projection R^d -> R^k: coordinate j goes to bucket[j] with sign[j]."""

    def __init__(self, dim: int, k: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.k = k
        self.bucket = torch.randint(0, k, (dim,), generator=generator)
        self.sign = torch.randint(0, 2, (dim,), generator=generator).float() * 2 - 1

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, k)
        out = torch.zeros(len(vectors), self.k, dtype=vectors.dtype)
        return out.index_add_(1, self.bucket, vectors * self.sign)


class MarginGradients:
    """Per-example gradients of the margin, projected. Works on a private copy of the model: functional calls
    swap parameters in place for a moment, and the app's model is shared by every user."""

    def __init__(self, model: torch.nn.Module, names: list[str], k: int = PROJECTION_DIM, seed: int = 0):
        self.model = copy.deepcopy(model).float().eval().cpu()
        self.names = names
        params = dict(self.model.named_parameters())
        self.chosen = {n: params[n].detach() for n in names}
        self.fixed = {n: p.detach() for n, p in params.items() if n not in self.chosen}
        self.fixed.update(dict(self.model.named_buffers()))
        self.sketch = CountSketch(sum(p.numel() for p in self.chosen.values()), k, seed)

        def margin(chosen, x, y):
            logits = functional_call(self.model, {**self.fixed, **chosen}, (x[None],))[0]
            is_label = torch.arange(logits.shape[0]) == y  # no one_hot/.item(): vmap needs static shapes
            others = torch.where(is_label, torch.full_like(logits, -torch.inf), logits)
            return (logits * is_label).sum() - torch.logsumexp(others, 0)

        self._per_example = vmap(grad(margin), in_dims=(None, 0, 0))
        self._lock = threading.Lock()  # functional_call swaps the copy's parameters: one call at a time

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        """(B, k) projected margin gradients of uint8 images (B, 32, 32, 3)."""
        x = to_float(torch.from_numpy(np.ascontiguousarray(images)))
        with self._lock:
            grads = self._per_example(self.chosen, x, torch.from_numpy(np.asarray(labels, dtype=np.int64)))
        return self.sketch(torch.cat([grads[n].flatten(1) for n in self.names], 1))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(to_float(torch.from_numpy(np.ascontiguousarray(images)))).softmax(1).numpy()



def projection_dim(k: int, n_train: int) -> int:
    """Far fewer dimensions than images keeps Phi^T Phi well posed."""
    return min(k, max(64, n_train // 8))


def whitened_gradients(gradients: MarginGradients, train, on_progress: Progress | None = None):
    """For one model: W = Phi (Phi^T Phi + ridge I)^-1 (n, k) float32, q_i = 1 - p_i(y_i), and the raw self-scores
    phi_i^T (Phi^T Phi + ridge I)^-1 phi_i. In chunks, Phi overwritten in place by W: peak memory stays one Phi."""
    report = on_progress or (lambda fraction: None)
    k = gradients.sketch.k
    phi = np.empty((len(train), k), dtype=np.float32)
    q = np.empty(len(train))
    for start in range(0, len(train), BATCH):
        images, labels = train.images[start:start + BATCH], train.labels[start:start + BATCH]
        phi[start:start + BATCH] = gradients(images, labels).numpy()
        q[start:start + BATCH] = 1 - gradients.probabilities(images)[np.arange(len(labels)), labels]
        report(0.95 * min(1.0, (start + BATCH) / len(train)))
    kernel = np.zeros((k, k))
    for start in range(0, len(phi), 4096):
        chunk = phi[start:start + 4096].astype(np.float64)
        kernel += chunk.T @ chunk
    kernel[np.diag_indices_from(kernel)] += RIDGE * float(np.mean(np.diag(kernel)))  # ridge for stability
    inverse = np.linalg.inv(kernel).astype(np.float32)
    self_raw = np.empty(len(phi))
    for start in range(0, len(phi), 4096):
        rows = phi[start:start + 4096]
        weighted = rows @ inverse
        self_raw[start:start + 4096] = np.einsum("nk,nk->n", weighted, rows)
        rows[:] = weighted
    report(1.0)
    return phi, q, self_raw


class TrakInfluence(InfluenceIndex):
    name = "trak"
    title = "TRAK (whole network, projected gradients)"
    takes_minutes = True  # per-example gradients of the whole network, 45,000 images
    explanation = ("TRAK: compares the test image's gradient with every training image's gradient over the whole "
                   "network (its last layers for large models), randomly projected, and corrects for how "
                   "redundant the training images are with one another.")
    score_meaning = ("the predicted drop of this image's margin (its label's logit against the others') if the "
                     "training image were removed; its plain loss rises by about 1 - p times that")
    arrays: ClassVar[dict] = {"weighted": Array("f", ("n", "k")), "self_scores": Array("f", ("n",)),
                              "names": Array("U", (None,)), "k": Array("i", low=1), "seed": Array("i")}

    def __init__(self, weighted: np.ndarray, self_scores: np.ndarray, names: list[str], k: int, seed: int):
        self.weighted = weighted  # (n, k) float32: Phi (Phi^T Phi + ridge I)^-1, each row times q_i
        self.self_scores = self_scores
        self.names = names
        self.k = k
        self.seed = seed
        self._gradients = None  # built once, from the checkpoint, at the first query
        self._building = threading.Lock()

    @classmethod
    def settings(cls) -> dict:
        return {"projection_dim": PROJECTION_DIM, "param_budget": PARAM_BUDGET, "ridge": RIDGE, "seed": 0}

    @property
    def n_train(self) -> int:
        return len(self.weighted)

    @classmethod
    def fit(cls, checkpoint, dataset, *, on_progress: Progress | None = None, k: int = PROJECTION_DIM,
            seed: int = 0, budget: int = PARAM_BUDGET):
        k = projection_dim(k, len(dataset.train))
        names = chosen_parameters(checkpoint.model, budget)
        gradients = MarginGradients(checkpoint.model, names, k, seed)
        weighted, q, self_raw = whitened_gradients(gradients, dataset.train, on_progress)
        weighted *= q[:, None].astype(np.float32)
        index = cls(weighted, self_raw * q, names, k, seed)
        index._gradients = gradients
        return index

    def scores(self, checkpoint, dataset, test_indices) -> np.ndarray:
        with self._building:  # an index is shared by every user of the server
            if self._gradients is None:
                self._gradients = MarginGradients(checkpoint.model, self.names, self.k, self.seed)
        idx = np.atleast_1d(np.asarray(test_indices))
        phi_test = self._gradients(dataset.test.images[idx], dataset.test.labels[idx]).numpy()
        return phi_test @ self.weighted.T

    def mean_scores(self, checkpoint, dataset, test_indices, chunk: int = 256, limit: int = 256) -> np.ndarray:
        """Linear in phi_test; each test image costs a per-example gradient, so a class's mean uses a fixed
        random sample of at most `limit` of its images."""
        idx = np.atleast_1d(np.asarray(test_indices))
        if len(idx) > limit:
            idx = np.sort(np.random.default_rng(0).choice(idx, limit, replace=False))
        return super().mean_scores(checkpoint, dataset, idx, chunk)

    def self_influence(self) -> np.ndarray:
        return self.self_scores

    def predicted_loss_change(self, score_sum: float, true_probability: float) -> float | None:
        """Scores are margin changes; the plain loss log(1 + e^-margin) changes by -(1 - p) per unit of margin."""
        return float((1 - true_probability) * score_sum)

    def state(self) -> dict[str, np.ndarray]:
        return {"weighted": self.weighted, "self_scores": self.self_scores, "names": np.array(self.names),
                "k": np.array(self.k), "seed": np.array(self.seed)}

    @classmethod
    def from_state(cls, state):
        return cls(state["weighted"], state["self_scores"], [str(n) for n in state["names"]], int(state["k"]),
                   int(state["seed"]))
