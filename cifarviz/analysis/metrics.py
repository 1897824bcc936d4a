"""Classification metrics on predictions (accuracy, per-class precision/recall/F1, the confusion matrix), the
accuracy of a random sample with its interval, and calibration."""

from __future__ import annotations

import numpy as np


def classification_report(labels: np.ndarray, predicted: np.ndarray, classes) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro averages and the confusion matrix (rows: true class).

    scikit-learn's definitions with zero_division=0 (a class never predicted has precision 0), computed from the
    confusion matrix with NumPy: importing sklearn.metrics cost a cold Evaluate 0.9 s (tests compare the two)."""
    k = len(classes)
    confusion = np.bincount(np.asarray(labels) * k + np.asarray(predicted), minlength=k * k).reshape(k, k)
    right = np.diag(confusion).astype(float)
    support, predicted_as = confusion.sum(1), confusion.sum(0)
    precision = np.divide(right, predicted_as, out=np.zeros(k), where=predicted_as > 0)
    recall = np.divide(right, support, out=np.zeros(k), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(k), where=both > 0)
    return {
        "accuracy": float(right.sum() / max(len(labels), 1)),
        "per_class": [
            {"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
            for c, p, r, f, n in zip(classes, precision, recall, f1, support)
        ],
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
        "confusion_matrix": confusion.tolist(),
    }


def most_confused_pairs(confusion: np.ndarray, classes, top: int = 10) -> list[dict]:
    """Unordered class pairs ranked by how often either is mistaken for the other."""
    confusion = np.asarray(confusion)
    both = confusion + confusion.T
    pairs = [(both[i, j], i, j) for i in range(len(classes)) for j in range(i + 1, len(classes))]
    pairs.sort(reverse=True)
    return [
        {"pair": f"{classes[i]} / {classes[j]}", "count": int(n), f"{classes[i]}->{classes[j]}": int(confusion[i, j]),
         f"{classes[j]}->{classes[i]}": int(confusion[j, i])}
        for n, i, j in pairs[:top]
    ]


def sample_accuracy(predicted: np.ndarray, labels: np.ndarray, population: int) -> tuple[float, float]:
    """The accuracy on a random sample of a split's images (drawn without replacement), and the half-width of its
    95% interval for the whole split's accuracy: 1.96 standard errors, with the finite-population correction
    (the sample is part of the split, and the whole split has no sampling error at all)."""
    n = len(predicted)
    accuracy = float((predicted == labels).mean())
    if n >= population:
        return accuracy, 0.0
    spread = accuracy * (1 - accuracy) / n * (population - n) / max(population - 1, 1)
    return accuracy, 1.96 * float(np.sqrt(spread))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> tuple[list[dict], float]:
    """Reliability-diagram bins (confidence vs accuracy) and the expected calibration error."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    rows, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (confidence > lo) & (confidence <= hi)
        if mask.any():
            acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
            ece += mask.mean() * abs(acc - conf)
            rows.append({"bin_low": float(lo), "bin_high": float(hi), "confidence": conf, "accuracy": acc,
                         "count": int(mask.sum())})
    return rows, float(ece)
