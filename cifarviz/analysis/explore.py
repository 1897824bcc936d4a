"""Analyses behind the explorer's views, as plain functions (the app calls them; tests call them directly).

Selections are lists of image indices into one split, so "test image 42" means the
same picture in every view and in the image inspector.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cifarviz.core.augment import to_float


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


def _last_spatial_conv(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """The last Conv2d whose output is still a map (at least 4x4): where Grad-CAM looks."""
    found: list[tuple[torch.nn.Module, tuple]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, out: found.append((mod, tuple(out.shape))))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]  # fmt: skip
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    spatial = [m for m, shape in found if shape[-1] >= 4]
    return (spatial or [m for m, _ in found])[-1]


def grad_cam(model: torch.nn.Module, image: np.ndarray, target_class: int | None = None) -> tuple[np.ndarray, int]:
    """Grad-CAM heat map (32, 32) in [0, 1] for one uint8 image, and the class it explains.

    Pass the class the page calls predicted (with test-time augmentation the plain argmax can differ).
    Hooks and gradients go on a private copy: the model is shared by every user of the server."""
    model = copy.deepcopy(model).eval()
    x = to_float(torch.from_numpy(image[None]).to(next(model.parameters()).device))
    layer = _last_spatial_conv(model, x)
    store = {}
    forward = layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("act", out))
    backward = layer.register_full_backward_hook(lambda _m, _gi, go: store.__setitem__("grad", go[0]))
    try:
        with torch.enable_grad():
            x.requires_grad_(True)  # makes frozen backbones (transfer) still produce gradients
            logits = model(x)
            target = int(logits.argmax(1)) if target_class is None else int(target_class)
            model.zero_grad(set_to_none=True)
            logits[0, target].backward()
    finally:
        forward.remove()
        backward.remove()
    weights = store["grad"].mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * store["act"]).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    cam = cam / cam.max() if cam.max() > 0 else cam
    return cam.detach().cpu().numpy(), target


def overlay_heatmap(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] heat map (as a red-yellow ramp) over an RGB uint8 image."""
    ramp = np.stack([np.clip(heat * 2, 0, 1), np.clip(heat * 2 - 1, 0, 1), np.zeros_like(heat)], -1) * 255
    return (image * (1 - alpha * heat[..., None]) + ramp * alpha * heat[..., None]).clip(0, 255).astype(np.uint8)
