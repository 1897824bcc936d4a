"""Head influence: Koh & Liang's influence function on the classifier head over frozen penultimate features.

Every zoo model ends in a linear head, logits = s * (W f + b), trained with (label-smoothed) cross-entropy
and weight decay, i.e. an L2 penalty (lambda/2)|theta|^2: the *training loss* (task.py). With theta = [W b] and
f~ = s [f, 1] the logits are theta f~, so for training image i (residual r_i = p_i - y_i, y_i the smoothed target)

    gradient    g_i = r_i (x) f~_i                       (Kronecker product, C * D~ numbers)
    Hessian     H   = 1/n sum_i (diag(p_i) - p_i p_i^T) (x) f~_i f~_i^T  +  (lambda + damping) I

exactly: no approximation beyond freezing the features. H is formed and Cholesky-factorised once.
Removing image i moves theta by about H^-1 g_i / n, so the test loss changes by

    score_i = g_test^T H^-1 g_i / n        (> 0: removing i raises the test loss, i.e. i helps)

where g_test is the gradient of the *measurement*, the plain cross-entropy of the test image's true label (residual
p_test - onehot(y_test)), not of the smoothed training loss: with smoothing the two point in opposite directions for
every test image the model is surer of than 1 - smoothing + smoothing / C, which would swap helpful and harmful.

A lookup is one solve (u = H^-1 g_test) and one pass over the stored features: F~ u -> scores.
Features are the plain images' (no test-time augmentation on either side), as the head saw them in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from scipy.linalg import cho_factor, cho_solve, solve_triangular

from cifarviz.store.cache import Array

from .base import InfluenceError, InfluenceIndex, Progress
from .task import Task

DAMPING_SCALE = 1e-4  # default damping: this multiple of the Hessian's mean diagonal


@dataclass
class LinearHead:
    """logits = scale * (features @ weight.T + bias)."""

    weight: np.ndarray  # (C, D)
    bias: np.ndarray | None  # (C,)
    scale: float

    @property
    def theta(self) -> np.ndarray:
        """(C, D~): the head's parameters as one matrix, bias last."""
        return self.weight if self.bias is None else np.hstack([self.weight, self.bias[:, None]])

    def augmented(self, features: np.ndarray) -> np.ndarray:
        """f~ = scale * [f, 1]: logits = f~ @ theta.T."""
        features = np.asarray(features, dtype=np.float64)
        if self.bias is not None:
            features = np.hstack([features, np.ones((len(features), 1))])
        return self.scale * features


def linear_head(model) -> LinearHead:
    """The zoo model's head as (W, b, scale), checked on random features; refuses heads that are not linear."""
    linears = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)]
    if len(linears) != 1:
        raise InfluenceError(f"{model.arch_name}: the head influence method needs a head with one linear layer.")
    linear = linears[0]
    probe = torch.randn(8, linear.in_features, generator=torch.Generator().manual_seed(0))
    probe = probe.to(linear.weight.device, linear.weight.dtype)
    with torch.no_grad():
        out, plain = model.forward_head(probe).double(), linear(probe).double()
    scale = float((out * plain).sum() / (plain * plain).sum())
    if model.training or not torch.allclose(out, scale * plain, rtol=1e-4, atol=1e-5):
        raise InfluenceError(f"{model.arch_name}: its head is not a (scaled) linear layer in eval mode.")
    bias = None if linear.bias is None else linear.bias.detach().double().cpu().numpy()
    return LinearHead(linear.weight.detach().double().cpu().numpy(), bias, scale)


def training_loss_settings(checkpoint) -> tuple[float, float]:
    """(L2 strength, label smoothing) of the loss the checkpoint was trained with, checked (see task.py)."""
    task = Task.from_checkpoint(checkpoint)
    return task.l2, task.label_smoothing


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def smoothed_targets(labels: np.ndarray, classes: int, smoothing: float) -> np.ndarray:
    targets = np.full((len(labels), classes), smoothing / classes)
    targets[np.arange(len(labels)), labels] += 1.0 - smoothing
    return targets


class HeadInfluence(InfluenceIndex):
    name = "head"
    title = "Head influence (influence function)"
    explanation = ("Koh & Liang's influence function on the network's last layer: how much the test image's loss "
                   "would change if the classifier were retrained without each training image (exact Hessian).")
    arrays: ClassVar[dict] = {"features": Array("f", ("n", "dim")), "residuals": Array("f", ("n", "classes")),
              "cholesky": Array("f", ("params", "params")), "weight": Array("f", ("classes", None)),
              "bias": Array("f", (None,)), "has_bias": Array("b"), "scale": Array("f"),
              "label_smoothing": Array("f", low=0.0, below=1.0), "self_scores": Array("f", ("n",), finite=False)}

    def __init__(self, features: np.ndarray, residuals: np.ndarray, head: LinearHead, cholesky: np.ndarray,
                 label_smoothing: float, self_scores: np.ndarray | None = None):
        self.features = features  # (n, D~) float32: f~ of every training image
        self.residuals = residuals  # (n, C) float32: p - y
        self.head = head
        self.cholesky = cholesky  # (P, P) lower-triangular factor of H
        self.label_smoothing = label_smoothing
        # computed once at fit time: a fitted index is shared by every user and never changes afterwards
        self.self_scores = self._self_influence() if self_scores is None else self_scores

    @classmethod
    def settings(cls) -> dict:
        return {"damping_scale": DAMPING_SCALE}

    @property
    def n_train(self) -> int:
        return len(self.features)

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(cls, checkpoint, dataset, *, on_progress: Progress | None = None, damping: float | None = None):
        from cifarviz.store.artifacts import split_artifacts

        arts = split_artifacts(checkpoint, dataset, "train", on_progress=_part(on_progress, 0.0, 0.6))
        l2, smoothing = training_loss_settings(checkpoint)
        return cls.fit_arrays(arts.features, arts.labels, linear_head(checkpoint.model), l2=l2,
                              label_smoothing=smoothing, damping=damping, on_progress=_part(on_progress, 0.6, 1.0))

    @classmethod
    def fit_arrays(cls, features: np.ndarray, labels: np.ndarray, head: LinearHead, *, l2: float,
                   label_smoothing: float = 0.0, damping: float | None = None,
                   on_progress: Progress | None = None, self_influence: bool = True) -> HeadInfluence:
        """`damping` None: a small multiple (1e-4) of the Hessian's mean diagonal, for numerical safety.
        `self_influence=False` skips the self-influence pass (for callers that only need the factorised Hessian)."""
        report = on_progress or (lambda fraction: None)
        f = head.augmented(features)  # (n, D~) float64
        n, dim = f.shape
        classes = head.weight.shape[0]
        probs = softmax(f @ head.theta.T)
        residuals = probs - smoothed_targets(np.asarray(labels), classes, label_smoothing)
        # H[(c, d), (c', e)] = 1/n sum_i (p_ic [c = c'] - p_ic p_ic') f_id f_ie, one (D~ x D~) block per class pair
        hessian = np.zeros((classes, dim, classes, dim))
        pairs = [(c, k) for c in range(classes) for k in range(c, classes)]
        for done, (c, k) in enumerate(pairs):
            weight = probs[:, c] * ((c == k) - probs[:, k])
            block = (f * weight[:, None]).T @ f / n
            hessian[c, :, k, :] = block
            hessian[k, :, c, :] = block.T
            report(0.9 * (done + 1) / len(pairs))
        hessian = hessian.reshape(classes * dim, classes * dim)
        if damping is None:
            damping = DAMPING_SCALE * float(np.mean(np.diag(hessian)))
        hessian[np.diag_indices_from(hessian)] += l2 + damping
        try:
            lower, _ = cho_factor(hessian, lower=True)
        except np.linalg.LinAlgError:
            raise InfluenceError("The head's Hessian is not positive definite; add damping.") from None
        report(1.0)
        return cls(f.astype(np.float32), residuals.astype(np.float32), head, np.tril(lower), label_smoothing,
                   None if self_influence else np.full(n, np.nan))

    # ------------------------------------------------------------------ queries

    def test_gradients(self, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(T, C * D~) gradients of the test images' *measurement* with respect to the head's parameters: the plain
        cross-entropy of the true label (task.py), never the training loss's smoothed one."""
        f = self.head.augmented(features)
        targets = smoothed_targets(np.asarray(labels), self.head.weight.shape[0], 0.0)
        residuals = softmax(f @ self.head.theta.T) - targets
        return (residuals[:, :, None] * f[:, None, :]).reshape(len(f), -1)

    def scores_for_gradients(self, gradients: np.ndarray) -> np.ndarray:
        """(T, n) scores g_test^T H^-1 g_i / n for test gradients (T, P)."""
        solved = cho_solve((self.cholesky, True), gradients.T)  # (P, T) = H^-1 g_test
        classes, dim = self.residuals.shape[1], self.features.shape[1]
        u = solved.T.reshape(len(gradients), classes, dim).astype(np.float32)
        projected = self.features @ u.transpose(2, 0, 1).reshape(dim, -1)  # (n, T * C)
        projected = projected.reshape(self.n_train, len(gradients), classes)
        return np.einsum("ntc,nc->tn", projected, self.residuals) / self.n_train

    def scores_for_features(self, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.scores_for_gradients(self.test_gradients(features, labels))

    def scores(self, checkpoint, dataset, test_indices) -> np.ndarray:
        from cifarviz.store.artifacts import split_artifacts

        test = split_artifacts(checkpoint, dataset, "test")
        idx = np.atleast_1d(np.asarray(test_indices))
        return self.scores_for_features(test.features[idx], test.labels[idx])

    def mean_scores(self, checkpoint, dataset, test_indices, chunk: int = 256) -> np.ndarray:
        """Linear in the test gradient: one solve for the mean gradient of all the test images."""
        from cifarviz.store.artifacts import split_artifacts

        test = split_artifacts(checkpoint, dataset, "test")
        idx = np.atleast_1d(np.asarray(test_indices))
        mean_gradient = self.test_gradients(test.features[idx], test.labels[idx]).mean(0, keepdims=True)
        return self.scores_for_gradients(mean_gradient)[0]

    def self_influence(self) -> np.ndarray:
        return self.self_scores

    def _self_influence(self, chunk: int = 2048) -> np.ndarray:
        """g_i^T H^-1 g_i / n for every training image: |L^-1 g_i|^2 / n with the Cholesky factor L."""
        out = np.empty(self.n_train)
        for start in range(0, self.n_train, chunk):
            r = self.residuals[start:start + chunk].astype(np.float64)
            f = self.features[start:start + chunk].astype(np.float64)
            g = (r[:, :, None] * f[:, None, :]).reshape(len(r), -1)
            out[start:start + chunk] = (solve_triangular(self.cholesky, g.T, lower=True) ** 2).sum(0)
        return out / self.n_train

    # ------------------------------------------------------------------ persistence

    def state(self) -> dict[str, np.ndarray]:
        return {"features": self.features, "residuals": self.residuals, "cholesky": self.cholesky,
                "weight": self.head.weight, "bias": np.zeros(0) if self.head.bias is None else self.head.bias,
                "has_bias": np.array(self.head.bias is not None), "scale": np.array(self.head.scale),
                "label_smoothing": np.array(self.label_smoothing), "self_scores": self.self_scores}

    @classmethod
    def from_state(cls, state):
        head = LinearHead(state["weight"], state["bias"] if bool(state["has_bias"]) else None, float(state["scale"]))
        return cls(state["features"], state["residuals"], head, state["cholesky"], float(state["label_smoothing"]),
                   state["self_scores"])


def _part(report: Progress | None, start: float, end: float) -> Progress | None:
    """Map a sub-task's progress in [0, 1] onto [start, end] of the whole."""
    if report is None:
        return None
    return lambda fraction: report(start + (end - start) * fraction)
