"""Temperature scaling (Guo et al., 2017): one number T that divides the model's logits so that its confidence
matches how often it is right. It never changes a prediction (argmax), only how sure the model says it is.

What is computed, exactly:
* the temperature minimises the **plain** negative log-likelihood, mean over images of -log softmax(z / T)[label],
  on the *validation* split (held out from training). The training loss (label smoothing, weight decay) plays no
  part: fastnet was trained with label smoothing 0.2, which leaves it underconfident, and T < 1 sharpens it;
* z is taken as log p of the stored probabilities (log-softmax is the logits up to a constant per image, which
  softmax ignores), so the flip-averaged probabilities of a TTA checkpoint are calibrated as they are shown;
* calibration is then *measured* on another split (the test split): expected calibration error (15 equal-width
  confidence bins, `metrics.reliability`) and NLL, before and after.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cifarviz.analysis.metrics import reliability
from cifarviz.core.errors import CifarvizError

LOWEST, HIGHEST = 0.05, 20.0  # temperatures searched; the optimum of a trained CIFAR-10 net is near 0.5-2


def scaled_probabilities(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T), row by row (float64 inside, the input's dtype out)."""
    logits = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)) / float(temperature)
    logits -= logits.max(1, keepdims=True)
    out = np.exp(logits)
    out /= out.sum(1, keepdims=True)
    return out.astype(np.asarray(probs).dtype, copy=False)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """The plain negative log-likelihood, mean over images (natural log)."""
    picked = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the plain NLL of `probs` at temperature T. The NLL is convex in 1/T,
    so a golden-section search over 1/T finds the one minimum (to 1e-6 in 1/T)."""
    probs, labels = np.asarray(probs), np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(labels) or len(labels) == 0:
        raise CifarvizError(f"Temperature scaling needs one probability row per label; got {probs.shape} "
                            f"probabilities for {len(labels)} labels.")
    logp = np.log(np.clip(probs.astype(np.float64), 1e-12, None))

    def loss(beta: float) -> float:  # beta = 1 / T
        z = logp * beta
        z -= z.max(1, keepdims=True)
        return float((np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels]).mean())

    low, high = 1.0 / HIGHEST, 1.0 / LOWEST
    ratio = (np.sqrt(5.0) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    while high - low > 1e-6:
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return float(1.0 / ((low + high) / 2))


@dataclass(frozen=True)
class Calibration:
    """A temperature fitted on one split and measured on another."""

    temperature: float
    fitted_on: str  # "val"
    fitted_images: int
    measured_on: str  # "test"
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    bins_before: tuple
    bins_after: tuple

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def calibrate(fit_probs, fit_labels, measure_probs, measure_labels, *, fitted_on: str = "val",
              measured_on: str = "test") -> Calibration:
    """Fit T on (fit_probs, fit_labels), then measure ECE and NLL on (measure_probs, measure_labels)."""
    temperature = fit_temperature(fit_probs, fit_labels)
    after = scaled_probabilities(measure_probs, temperature)
    bins_before, ece_before = reliability(measure_probs, measure_labels)
    bins_after, ece_after = reliability(after, measure_labels)
    return Calibration(temperature, fitted_on, len(fit_labels), measured_on, ece_before, ece_after,
                       nll(measure_probs, measure_labels), nll(after, measure_labels),
                       tuple(bins_before), tuple(bins_after))
