"""Analyses behind the explorer's views, as plain functions (the app calls them; tests call them directly).

Selections are lists of image indices into one split, so "test image 42" means the
same picture in every view and in the image inspector.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ImageRef:
    """One image of the dataset: the inspector's state. `split` is train/val/test, or "upload"."""

    split: str
    index: int


# --------------------------------------------------------------------------- selections


def confusion_cell_indices(labels: np.ndarray, predicted: np.ndarray, true_class: int, predicted_class: int) -> np.ndarray:
    """Indices of the images whose true class and predicted class match one confusion-matrix cell."""
    return np.flatnonzero((labels == true_class) & (predicted == predicted_class))


def misclassified_by_confidence(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices of wrong predictions, most confident first (the most instructive mistakes)."""
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    return wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")]


def filter_indices(labels: np.ndarray, classes: list[int] | None = None) -> np.ndarray:
    """Indices of images whose label is among `classes` (all when None or empty)."""
    if not classes:
        return np.arange(len(labels))
    return np.flatnonzero(np.isin(labels, classes))


def sample_per_class(labels: np.ndarray, per_class: int, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.choice(np.flatnonzero(labels == c), size=min(per_class, int((labels == c).sum())), replace=False)
            for c in np.unique(labels)}  # fmt: skip


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (cosine similarity is then a dot product)."""
    return vectors / (np.linalg.norm(vectors, axis=-1, keepdims=True) + 1e-12)


def nearest_neighbours(query: np.ndarray, bank: np.ndarray, k: int = 8, exclude: int | None = None, *,
                       unit_bank: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine similarities of `query` (D,) against `bank` (N, D): (indices, similarities).

    `unit_bank`: the bank's rows already have length 1 (`SplitArtifacts.unit_features`), so a query costs one
    matrix-vector product instead of a pass that normalises every row first."""
    sims = (bank if unit_bank else unit_rows(bank)) @ unit_rows(query)
    if exclude is not None:
        sims[exclude] = -np.inf
    top = np.argpartition(-sims, min(k, len(sims) - 1))[:k]
    top = top[np.argsort(-sims[top], kind="stable")]
    return top, sims[top]


# --------------------------------------------------------------------------- images


def class_mean_images(images: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(classes, 32, 32, 3) uint8: the average picture of each class."""
    return np.stack([images[labels == c].mean(0) for c in range(n_classes)]).round().astype(np.uint8)


def channel_histograms(images: np.ndarray, bins: int = 32) -> dict[str, np.ndarray]:
    """Pixel-value histograms per colour channel (counts over `bins` equal-width bins of 0..255)."""
    edges = np.linspace(0, 256, bins + 1)
    return {name: np.histogram(images[..., c], bins=edges)[0] for c, name in enumerate(("red", "green", "blue"))}


def to_png(image: np.ndarray, scale: int = 1) -> bytes:
    """PNG bytes of a uint8 image enlarged `scale` times; memoised, since pages redraw the same images on every rerun."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    return _png(image.tobytes(), image.shape, scale)


@lru_cache(maxsize=4096)  # ~4096 small PNGs of a few KB each
def _png(pixels: bytes, shape: tuple, scale: int) -> bytes:
    image = np.frombuffer(pixels, dtype=np.uint8).reshape(shape)
    pil = Image.fromarray(image)
    if scale != 1:
        pil = pil.resize((image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- saliency


from cifarviz.analysis.saliency import grad_cam  # noqa: E402,F401 - its old home; pages import it from here


def overlay_heatmap(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] heat map (as a red-yellow ramp) over an RGB uint8 image."""
    ramp = np.stack([np.clip(heat * 2, 0, 1), np.clip(heat * 2 - 1, 0, 1), np.zeros_like(heat)], -1) * 255
    return (image * (1 - alpha * heat[..., None]) + ramp * alpha * heat[..., None]).clip(0, 255).astype(np.uint8)
