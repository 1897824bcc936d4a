"""Where in an image a model found its evidence: Grad-CAM at a chosen convolution, and two pixel attributions
computed by Captum (Integrated Gradients and occlusion).

Each returns a (H, W) map in [0, 1] for one uint8 image and one class: what the inspector overlays. The model is
shared by every user of the server, so hooks and gradients go on a private copy.

* Grad-CAM: the chosen layer's activations weighted by the mean gradient of the class's logit, ReLU, upsampled.
  Coarse (the layer's resolution), cheap (one backward pass).
* Integrated Gradients (Sundararajan et al. 2017, Captum's IntegratedGradients): gradients of the class's logit
  along the straight path from a baseline to the image, times (image - baseline); the baseline is an image of the
  training set's mean colour (what the model's normalisation maps to zero). Per pixel: the sum of |attribution| over colour channels.
* Occlusion (Zeiler & Fergus 2014, Captum's Occlusion): how much the class's logit falls when a 4x4 patch is
  painted with the mean colour, slid with stride 2; only falls are shown (evidence for the class).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from cifarviz.core.augment import to_float

METHODS = {
    "grad-cam": "Grad-CAM",
    "integrated-gradients": "Integrated Gradients (Captum)",
    "occlusion": "Occlusion (Captum)",
}
IG_STEPS = 32  # Captum's convergence delta on the shipped models is < 2% of the logit gap at 32 steps
OCCLUSION_WINDOW, OCCLUSION_STRIDE = 4, 2


def _input(model: torch.nn.Module, image: np.ndarray) -> torch.Tensor:
    return to_float(torch.from_numpy(np.ascontiguousarray(image[None])).to(next(model.parameters()).device))


def _mean_colour(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An image of the model's training mean colour (what its normalisation maps to zero), shaped like `x`."""
    mean = getattr(model, "input_mean", None)
    mean = mean if isinstance(mean, torch.Tensor) else torch.full((1, 3, 1, 1), 0.5)
    return mean.to(x.device, x.dtype).expand_as(x).contiguous()


def conv_layers(model: torch.nn.Module, image: np.ndarray) -> list[tuple[str, tuple[int, int, int]]]:
    """The model's convolutions whose output is still a map (at least 2x2), in forward order, with their output
    shape (channels, height, width): the layers Grad-CAM can look at. Names are the model's own module names."""
    names = {module: name for name, module in model.named_modules()}
    found: list[tuple[str, tuple]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, out: found.append((names[mod], tuple(out.shape[1:]))))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]  # fmt: skip
    try:
        with torch.no_grad():
            model.eval()(_input(model, image))
    finally:
        for h in hooks:
            h.remove()
    seen, layers = set(), []
    for name, shape in found:  # a module called twice is listed once
        if name not in seen and shape[-1] >= 2:
            seen.add(name)
            layers.append((name, shape))
    return layers


def default_cam_layer(layers: list[tuple[str, tuple]]) -> str:
    """The last convolution whose map is at least 4x4: fine enough to point at a part of a 32x32 image."""
    spatial = [name for name, shape in layers if shape[-1] >= 4]
    return (spatial or [name for name, _ in layers])[-1]


def _normalised(heat: torch.Tensor) -> np.ndarray:
    heat = heat - heat.min()
    heat = heat / heat.max() if heat.max() > 0 else heat
    return heat.detach().cpu().numpy().astype(np.float32)


def grad_cam(model: torch.nn.Module, image: np.ndarray, target_class: int | None = None,
             layer: str | None = None) -> tuple[np.ndarray, int]:
    """Grad-CAM heat map (H, W) in [0, 1] for one uint8 image, and the class it explains.

    Pass the class the page calls predicted (with test-time augmentation the plain argmax can differ). `layer`
    is one of `conv_layers`' names (default: `default_cam_layer`); any other name is refused."""
    model = copy.deepcopy(model).eval()
    layers = conv_layers(model, image)
    name = default_cam_layer(layers) if layer is None else layer
    if name not in {n for n, _ in layers}:
        raise ValueError(f"Grad-CAM cannot look at layer {name!r}: pick one of {[n for n, _ in layers]}.")
    module = dict(model.named_modules())[name]
    x = _input(model, image)
    store = {}
    forward = module.register_forward_hook(lambda _m, _i, out: store.__setitem__("act", out))
    backward = module.register_full_backward_hook(lambda _m, _gi, go: store.__setitem__("grad", go[0]))
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
    return _normalised(cam), target


def integrated_gradients(model: torch.nn.Module, image: np.ndarray, target_class: int,
                         steps: int = IG_STEPS) -> tuple[np.ndarray, float]:
    """Integrated Gradients by Captum: the (H, W) map in [0, 1], and the convergence delta relative to the logit
    gap (how far the attributions' sum is from logit(image) - logit(baseline); near 0 when `steps` suffice)."""
    from captum.attr import IntegratedGradients  # imported here: a second or two, only when asked for

    model = copy.deepcopy(model).eval()
    x = _input(model, image)
    baseline = _mean_colour(model, x)
    with torch.enable_grad():
        attributions, delta = IntegratedGradients(model).attribute(
            x, baselines=baseline, target=int(target_class), n_steps=steps, return_convergence_delta=True)
    with torch.no_grad():
        gap = (model(x)[0, target_class] - model(baseline)[0, target_class]).abs().item()
    return _normalised(attributions[0].abs().sum(0)), abs(delta.item()) / max(gap, 1e-6)


def occlusion(model: torch.nn.Module, image: np.ndarray, target_class: int,
              window: int = OCCLUSION_WINDOW, stride: int = OCCLUSION_STRIDE) -> np.ndarray:
    """Occlusion by Captum: per pixel, the mean fall of the class's logit over the patches covering it when they
    are painted with the mean colour, in [0, 1] (rises, evidence against the class, are shown as 0)."""
    from captum.attr import Occlusion

    model = copy.deepcopy(model).eval()
    x = _input(model, image)
    with torch.no_grad():
        attributions = Occlusion(model).attribute(
            x, sliding_window_shapes=(x.shape[1], window, window), strides=(x.shape[1], stride, stride),
            baselines=_mean_colour(model, x), target=int(target_class), perturbations_per_eval=64)
    return _normalised(F.relu(attributions[0].mean(0)))


def attribution(method: str, model: torch.nn.Module, image: np.ndarray, target_class: int,
                layer: str | None = None) -> np.ndarray:
    """One of METHODS' maps for `image` and `target_class`."""
    if method == "grad-cam":
        return grad_cam(model, image, target_class, layer=layer)[0]
    if method == "integrated-gradients":
        return integrated_gradients(model, image, target_class)[0]
    if method == "occlusion":
        return occlusion(model, image, target_class)
    raise ValueError(f"Unknown attribution {method!r}: pick one of {sorted(METHODS)}.")
