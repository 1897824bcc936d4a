"""The explorer's selection logic and analyses, called directly (the app's views only draw them)."""

import numpy as np
import torch

from cifarviz.analysis.explore import (
    channel_histograms,
    class_mean_images,
    confusion_cell_indices,
    filter_indices,
    grad_cam,
    misclassified_by_confidence,
    nearest_neighbours,
    overlay_heatmap,
    sample_per_class,
)
from cifarviz.core.models import create_model


def test_confusion_cell_indices_match_the_matrix():
    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    for t in range(4):
        for p in range(4):
            idx = confusion_cell_indices(labels, predicted, t, p)
            assert len(idx) == ((labels == t) & (predicted == p)).sum()
            assert (labels[idx] == t).all() and (predicted[idx] == p).all()


def test_misclassified_sorted_by_confidence():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3]])
    labels = np.array([0, 0, 0, 1])  # wrong: 1 (0.8 sure), 2 (0.6), 3 (0.7)
    assert misclassified_by_confidence(probs, labels).tolist() == [1, 3, 2]


def test_filters_and_samples():
    labels = np.array([0, 1, 2, 1, 0, 2, 2])
    assert filter_indices(labels, [2]).tolist() == [2, 5, 6]
    assert filter_indices(labels, []).tolist() == list(range(7))
    a, b = sample_per_class(labels, 2, seed=0), sample_per_class(labels, 2, seed=0)
    assert all(np.array_equal(a[c], b[c]) and (labels[a[c]] == c).all() for c in a)
    assert len(a[2]) == 2 and len(a[0]) == 2


def test_nearest_neighbours_cosine():
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    idx, sims = nearest_neighbours(np.array([2.0, 0.1]), bank, k=2)
    assert idx.tolist() == [0, 2] and sims[0] > sims[1]
    idx, _ = nearest_neighbours(bank[0], bank, k=1, exclude=0)  # an image is not its own neighbour
    assert idx.tolist() == [2]


def test_class_means_and_histograms():
    images = np.zeros((4, 32, 32, 3), np.uint8)
    images[2:] = 200
    means = class_mean_images(images, np.array([0, 0, 1, 1]), 2)
    assert means[0].max() == 0 and means[1].min() == 200
    hist = channel_histograms(images, bins=4)
    assert hist["red"].tolist() == [2 * 1024, 0, 0, 2 * 1024]


def test_grad_cam_highlights_what_drives_the_class():
    torch.manual_seed(0)
    model = create_model("lenet").eval()
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    heat, target = grad_cam(model, image)
    assert heat.shape == (32, 32) and 0 <= heat.min() and heat.max() <= 1 and 0 <= target < 10
    heat_other, other = grad_cam(model, image, target_class=(target + 1) % 10)
    assert other == (target + 1) % 10 and not np.allclose(heat, heat_other)
    blended = overlay_heatmap(image, heat)
    assert blended.shape == image.shape and blended.dtype == np.uint8


def test_grad_cam_is_safe_on_a_model_shared_between_threads(cifar):
    """The app caches one model per server; concurrent inspectors must not corrupt each other's maps."""
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from cifarviz.core.checkpoint import load_checkpoint

    model = load_checkpoint(Path(__file__).resolve().parent.parent / "checkpoints" / "fastnet.safetensors").model
    images = cifar.test.images[:12]
    serial = [grad_cam(model, image)[0] for image in images]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(2):
            parallel = list(pool.map(lambda image: grad_cam(model, image)[0], images))
            for a, b in zip(serial, parallel):
                np.testing.assert_allclose(a, b, atol=1e-5)
    # and the shared model is left as it was: no hooks, no gradients
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_explains_the_class_it_is_asked_for(cifar):
    from pathlib import Path

    from cifarviz.core.checkpoint import load_checkpoint

    model = load_checkpoint(Path(__file__).resolve().parent.parent / "checkpoints" / "lenet.safetensors").model
    image = cifar.test.images[5]
    maps = {c: grad_cam(model, image, target_class=c) for c in (0, 3)}
    assert [target for _, target in maps.values()] == [0, 3]
    assert not np.allclose(maps[0][0], maps[3][0])
