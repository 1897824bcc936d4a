"""TRAK over an ensemble of models of one recipe: the faithful whole-network method, as TRAK's paper does it.

One model's TRAK scores are noisy (its authors say so; measured here too: bench/bench_retrain.py). TRAK averages
over M models trained by the same recipe with other seeds (or, where replicas are too expensive, snapshots of
one run), each with its own random projection:

    score_i(test) = mean_m[ phi_test,m^T (Phi_m^T Phi_m + ridge I)^-1 phi_i,m ] * mean_m[ 1 - p_m(y_i | x_i) ]

with phi the projected gradient of the margin  logit_y - logsumexp(other logits)  (trak.py); the (1 - p) term is
averaged separately, as the paper does. Positive: image i raises the test image's margin, so removing it would
raise its plain loss (loss = log(1 + e^-margin), so d loss = -(1 - p_test) d margin): it helps.

A lookup must take milliseconds, but one test image's scores cost M per-example gradients and M products with a
(n, k) matrix. So the index is the answer itself, computed once over the whole test split: each test image's
`LIST_LENGTH` most helpful and most harmful training images, each test class's mean scores, and each training
image's self-influence. A few MB, where the M (n, k) matrices would be gigabytes.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from cifarviz.store.cache import Array

from .base import InfluenceError, InfluenceIndex, Progress
from .trak import (
    BATCH,
    PARAM_BUDGET,
    PROJECTION_DIM,
    RIDGE,
    MarginGradients,
    chosen_parameters,
    projection_dim,
    whitened_gradients,
)

LIST_LENGTH = 100  # per test image, its top helpful and harmful: the page's lists and "retrain without the top 100"
AGREE_TOP = 100  # a member "agrees" with a listed image when it ranks it among its own top AGREE_TOP of that side


class MemberLists:
    """Each member's own top-AGREE_TOP helpful and harmful training images per test image, gathered while the
    ensemble's scores are summed (ensemble_scores' each_member), then counted against the ensemble's lists."""

    def __init__(self, models: int, tests: int, n_train: int):
        keep = min(AGREE_TOP, n_train)
        self.helpful = np.empty((models, tests, keep), dtype=np.int32)
        self.harmful = np.empty((models, tests, keep), dtype=np.int32)
        self.n_train = n_train

    def __call__(self, m: int, start: int, scores: np.ndarray) -> None:
        keep = self.helpful.shape[2]
        values = torch.from_numpy(scores)
        for table, largest in ((self.helpful, True), (self.harmful, False)):
            # torch's top-k: about 4x faster than numpy's argpartition on (1024, 45,000) rows, and threaded
            rows = torch.topk(values, keep, dim=1, largest=largest, sorted=False).indices
            table[m, start:start + len(scores)] = rows.numpy()

    def votes(self, listed: np.ndarray, side: str) -> np.ndarray:
        """(T, L) uint8 (ensembles have at most a few dozen models): for each listed training image, how many members
        rank it in their own top AGREE_TOP."""
        tables = self.helpful if side == "helpful" else self.harmful
        out = np.zeros(listed.shape, dtype=np.uint8)
        for start in range(0, len(listed), 256):
            rows = np.arange(min(256, len(listed) - start))
            marks = np.zeros((len(rows), self.n_train), dtype=bool)
            for member in tables:
                marks[:] = False
                marks[rows[:, None], member[start:start + len(rows)]] = True
                out[start:start + len(rows)] += marks[rows[:, None], listed[start:start + len(rows)]]
        return out


def ensemble_scores(models, dataset, test_indices, *, k: int = PROJECTION_DIM, seed: int = 0,
                    budget: int = PARAM_BUDGET, class_means: bool = False, on_progress: Progress | None = None,
                    each_member=None):
    """TRAK over `models` for `dataset.test[test_indices]` against every image of `dataset.train`.

    Returns (scores (T, n) float32, self-influence (n,), class mean scores (C, n) or None, each training image's
    plain cross-entropy of its label averaged over the models (n,)). Model m projects with seed `seed + m`.
    `each_member(m, start, scores)`: called with model m's own TRAK scores (its q_m applied) of test rows
    start.. in chunks, for what one model alone would rank (the answer's agreement between models).
    Memory: one (T, n) float32 table and one model's (n, k) matrix at a time."""
    report = on_progress or (lambda fraction: None)
    train, test = dataset.train, dataset.test
    idx = np.atleast_1d(np.asarray(test_indices, dtype=np.int64))
    k = projection_dim(k, len(train))
    total = np.zeros((len(idx), len(train)), dtype=np.float32)
    q = np.zeros(len(train))
    losses = np.zeros(len(train))
    self_raw = np.zeros(len(train))
    n_classes = len(dataset.classes)
    classes = np.zeros((n_classes, len(train)), dtype=np.float32) if class_means else None
    for m, model in enumerate(models):
        def part(fraction, m=m):
            report((m + 0.85 * fraction) / len(models))

        gradients = MarginGradients(model, chosen_parameters(model, budget), k, seed + m)
        weighted, q_m, self_m = whitened_gradients(gradients, train, part)
        phi_test = np.empty((len(idx), k), dtype=np.float32)
        for start in range(0, len(idx), BATCH):
            rows = idx[start:start + BATCH]
            phi_test[start:start + BATCH] = gradients(test.images[rows], test.labels[rows]).numpy()
            report((m + 0.85 + 0.1 * min(1.0, (start + BATCH) / len(idx))) / len(models))
        for start in range(0, len(idx), 1024):
            chunk = phi_test[start:start + 1024] @ weighted.T
            total[start:start + 1024] += chunk
            if each_member is not None:
                chunk *= q_m[None, :].astype(np.float32)
                each_member(m, start, chunk)
        if classes is not None:
            labels = test.labels[idx]
            for c in range(n_classes):
                if (labels == c).any():
                    classes[c] += phi_test[labels == c].mean(0) @ weighted.T
        q += q_m
        losses -= np.log(np.maximum(1 - q_m, 1e-12))
        self_raw += self_m
        report((m + 1) / len(models))
    q_mean = (q / len(models)).astype(np.float32)
    total /= len(models)
    total *= q_mean[None, :]
    if classes is not None:
        classes *= q_mean[None, :] / len(models)
    return total, (self_raw / len(models)) * q_mean, classes, losses / len(models)


def _top(scores: np.ndarray, keep: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the `keep` largest (or smallest) scores in order, and their columns."""
    values, rows = torch.topk(torch.from_numpy(np.ascontiguousarray(scores)), keep, dim=1, largest=largest)
    return rows.numpy().astype(np.int32), values.numpy().astype(np.float32)


class TrakEnsemble(InfluenceIndex):
    name = "trak-ensemble"
    title = "TRAK, ensemble of models"
    takes_minutes = True  # per-example gradients of the whole network, 45,000 images
    explanation = ("TRAK over several models of the same recipe (other seeds): each compares the test image's "
                   "gradient with every training image's over the whole network, projected and corrected for "
                   "redundant training images; averaging the models removes most of one model's noise.")
    score_meaning = ("the predicted drop of this image's margin (its label's logit against the others') if the "
                     "training image were removed; its plain loss rises by about 1 - p times that")
    needs_members = True
    arrays: ClassVar[dict] = {
        "helpful_rows": Array("i", ("t", "l"), low=0, below="n"), "helpful_scores": Array("f", ("t", "l")),
        "harmful_rows": Array("i", ("t", "l"), low=0, below="n"), "harmful_scores": Array("f", ("t", "l")),
        "class_scores": Array("f", ("c", "n")), "self_scores": Array("f", ("n",)), "models": Array("i", low=2),
        "mean_losses": Array("f", ("n",), low=0),
        "helpful_votes": Array("u", ("t", "l")), "harmful_votes": Array("u", ("t", "l")),
    }

    def __init__(self, helpful_rows, helpful_scores, harmful_rows, harmful_scores, class_scores, self_scores,
                 models: int, mean_losses, helpful_votes, harmful_votes):
        self.helpful_rows, self.helpful_scores = helpful_rows, helpful_scores
        self.harmful_rows, self.harmful_scores = harmful_rows, harmful_scores
        self.class_scores_table = class_scores
        self.self_scores = self_scores
        self.models = models
        self.mean_losses = mean_losses  # each training image's plain loss averaged over the models
        # per listed image, how many of the models rank it in their own top AGREE_TOP (how sure the list is)
        self.helpful_votes, self.harmful_votes = helpful_votes, harmful_votes

    @classmethod
    def settings(cls) -> dict:
        return {"projection_dim": PROJECTION_DIM, "param_budget": PARAM_BUDGET, "ridge": RIDGE, "seed": 0,
                "list_length": LIST_LENGTH, "q": "averaged separately"}

    @property
    def n_train(self) -> int:
        return len(self.self_scores)

    @property
    def list_length(self) -> int:
        return self.helpful_rows.shape[1]

    @classmethod
    def fit(cls, checkpoint, dataset, *, on_progress: Progress | None = None, members=()):
        if not members:
            raise InfluenceError(f"{checkpoint.name} has no other models of its recipe to average over (replicas or "
                                 "per-epoch snapshots): use the single-model TRAK method.")
        models = [checkpoint.model, *(m.model for m in members)]
        lists = MemberLists(len(models), len(dataset.test), len(dataset.train))
        scores, self_scores, class_scores, mean_losses = ensemble_scores(
            models, dataset, np.arange(len(dataset.test)), class_means=True, on_progress=on_progress,
            each_member=lists)
        keep = min(LIST_LENGTH, scores.shape[1])
        tables = [np.empty((len(scores), keep), dtype=dtype) for dtype in (np.int32, np.float32) * 2]
        for start in range(0, len(scores), 512):  # argpartition's int64 indices for 512 rows at a time
            chunk = scores[start:start + 512]
            for offset, largest in ((0, True), (2, False)):
                rows, values = _top(chunk, keep, largest)
                tables[offset][start:start + 512], tables[offset + 1][start:start + 512] = rows, values
        return cls(*tables, class_scores, self_scores.astype(np.float32), len(models),
                   mean_losses.astype(np.float32), lists.votes(tables[0], "helpful"), lists.votes(tables[2], "harmful"))

    def ranked(self, checkpoint, dataset, test_index: int, k: int):
        if k > self.list_length:
            raise InfluenceError(f"The {self.title} index keeps each test image's top {self.list_length} lists; "
                                 f"ask for at most {self.list_length}, not {k}.")
        return (self.helpful_rows[test_index, :k], self.helpful_scores[test_index, :k],
                self.harmful_rows[test_index, :k], self.harmful_scores[test_index, :k])

    def scores(self, checkpoint, dataset, test_indices) -> np.ndarray:
        raise InfluenceError(f"The {self.title} index keeps each test image's top {self.list_length} lists, not "
                             "every score: use lookup(), or ensemble_scores() for full rows.")

    def class_scores(self, checkpoint, dataset, class_index: int) -> np.ndarray:
        return self.class_scores_table[class_index]

    def self_influence(self) -> np.ndarray:
        return self.self_scores

    def predicted_loss_change(self, score_sum: float, true_probability: float) -> float | None:
        """Scores are margin changes; the plain loss log(1 + e^-margin) changes by -(1 - p) per unit of margin."""
        return float((1 - true_probability) * score_sum)

    def state(self) -> dict[str, np.ndarray]:
        return {"helpful_rows": self.helpful_rows, "helpful_scores": self.helpful_scores,
                "harmful_rows": self.harmful_rows, "harmful_scores": self.harmful_scores,
                "class_scores": self.class_scores_table, "self_scores": self.self_scores,
                "models": np.array(self.models), "mean_losses": self.mean_losses,
                "helpful_votes": self.helpful_votes, "harmful_votes": self.harmful_votes}

    @classmethod
    def from_state(cls, state):
        return cls(state["helpful_rows"], state["helpful_scores"], state["harmful_rows"], state["harmful_scores"],
                   state["class_scores"], state["self_scores"], int(state["models"]), state["mean_losses"],
                   state["helpful_votes"], state["harmful_votes"])

    def agreement(self, test_index: int, k: int) -> dict:
        """How many of the models rank each of the k listed images in their own top AGREE_TOP: per side, and the
        share of the listed images that at least half of the models agree on."""
        helpful = self.helpful_votes[test_index, :k].astype(int)
        harmful = self.harmful_votes[test_index, :k].astype(int)
        half = self.models / 2
        return {"models": self.models, "top": AGREE_TOP, "helpful": helpful.tolist(), "harmful": harmful.tolist(),
                "helpful_share": float((helpful >= half).mean()) if k else 0.0,
                "harmful_share": float((harmful >= half).mean()) if k else 0.0}
