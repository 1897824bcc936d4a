"""Run a model over uint8 images in batches: logits, probabilities, penultimate features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .augment import to_float
from .utils import pick_device

TTA_MODES = ("none", "flip")
# Images per forward pass. On a CPU small batches stay in the caches (faster, with identical logits: the README's
# Benchmarks); a GPU wants large ones.
CPU_BATCH, CUDA_BATCH = 64, 1000


@dataclass
class Predictions:
    logits: np.ndarray  # (N, classes) float32, averaged over test-time augmentations
    features: np.ndarray | None  # (N, D) float32 penultimate features of the plain image

    @property
    def probs(self) -> np.ndarray:
        return torch.from_numpy(self.logits).softmax(1).numpy()

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(1)


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU (bf16 is ~20x slower on CPUs without AMX)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def ready_for(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether `model` is on `device` in channels_last (about 2x faster convolutions, on CPU too).

    The app prepares each model once when it loads it, so a model shared by many users is not
    converted under their feet; `predict` converts only a model that is not ready."""
    def same(d: torch.device) -> bool:  # "cuda" means any current CUDA device, "cuda:0" one
        return d == device or (device.index is None and d.type == device.type)

    weights = [p for p in model.parameters() if p.dim() == 4]
    return all(same(p.device) for p in model.parameters()) and all(
        p.is_contiguous(memory_format=torch.channels_last) for p in weights)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    tta: str = "none",
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    features: bool = True,
    progress: bool = False,
    desc: str = "predicting",
    on_progress=None,
    on_batch=None,
) -> Predictions:
    """Evaluate `model` (in eval mode) on uint8 images (N, 32, 32, 3).

    `progress` shows a terminal bar; `on_progress(fraction)` feeds a GUI one; `on_batch(logits)` is given each
    batch's logits (a NumPy array) as soon as they are computed, for previews.
    """
    from tqdm.auto import tqdm

    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, not {tta!r}")
    device = pick_device(device) if isinstance(device, str) else device
    batch_size = batch_size or (CUDA_BATCH if device.type == "cuda" else CPU_BATCH)
    was_training = model.training
    if was_training:
        model.eval()
    if not ready_for(model, device):
        model.to(device, memory_format=torch.channels_last)
    images = torch.as_tensor(images)
    all_logits, all_features = [], []
    try:
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress):
            x = to_float(images[start : start + batch_size].to(device, non_blocking=True))
            x = x.contiguous(memory_format=torch.channels_last)
            with autocast_context(device):
                feats = model.forward_features(x)
                logits = model.forward_head(feats).float()
                if tta == "flip":
                    logits = 0.5 * (logits + model(x.flip(3)).float())
            all_logits.append(logits.cpu())
            if on_batch is not None:
                on_batch(all_logits[-1].numpy())
            if features:
                all_features.append(feats.float().cpu())
            if on_progress is not None:
                on_progress(min(1.0, (start + batch_size) / len(images)))
    finally:
        if was_training:
            model.train()
    return Predictions(
        logits=torch.cat(all_logits).numpy() if all_logits else np.zeros((0, 10), np.float32),
        features=torch.cat(all_features).numpy() if features and all_features else None,
    )


def loss_and_accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    t_logits, t_labels = torch.from_numpy(logits), torch.from_numpy(np.asarray(labels))
    loss = F.cross_entropy(t_logits, t_labels).item()
    return loss, float((t_logits.argmax(1) == t_labels).float().mean())


def layer_features(model: torch.nn.Module, images: np.ndarray, layer: str, *, batch_size: int | None = None,
                   device: str | torch.device = "auto", on_progress=None) -> np.ndarray:
    """(N, C) float32: what module `layer` (one of the model's own module names) outputs for each uint8 image,
    averaged over its spatial positions (a convolution's channels), without test-time augmentation. Hooked on a
    private copy: the model is shared by every user of the server."""
    import copy

    if layer not in dict(model.named_modules()):
        raise ValueError(f"The model has no layer {layer!r}.")
    device = pick_device(device) if isinstance(device, str) else device
    batch_size = batch_size or (CUDA_BATCH if device.type == "cuda" else CPU_BATCH)
    model = copy.deepcopy(model).eval().to(device)
    outputs: list[torch.Tensor] = []

    def keep(_module, _inputs, out):
        out = out.float()
        outputs.append((out.mean((2, 3)) if out.dim() == 4 else out.flatten(1)).cpu())

    hook = dict(model.named_modules())[layer].register_forward_hook(keep)
    images = torch.as_tensor(images)
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                model(to_float(images[start : start + batch_size].to(device)))
                if on_progress is not None:
                    on_progress(min(1.0, (start + batch_size) / len(images)))
    finally:
        hook.remove()
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), np.float32)
