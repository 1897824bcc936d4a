"""Batched augmentation on float image tensors (N, 3, H, W) in [0, 1]: no per-image PIL work.

Every function takes a torch.Generator so a seeded run sees the same augmentations,
and works on whatever device the batch lives on.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .errors import TrainingError

MAX_TRANSLATE = 31  # reflect padding needs pad < image side, and images are 32x32


def check_range(name: str, value, low: float, high: float | None = None, *, whole: bool = False,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise TrainingError naming the setting, its CLI flag and the allowed range unless `value` lies in it."""
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if whole:
        is_number = is_number and float(value).is_integer()
    inside = is_number and (value > low if low_open else value >= low)
    if high is not None:
        inside = inside and (value < high if high_open else value <= high)
    if not inside:
        bounds = f"above {low:g}" if low_open else f"at least {low:g}"
        if high is not None:
            bounds += f" and below {high:g}" if high_open else f" and at most {high:g}"
        flag = "--" + name.replace("_", "-")
        kind = "a whole number" if whole else "a number"
        raise TrainingError(f"{name} ({flag}) must be {kind} {bounds}, not {value!r}.")


@dataclass
class AugmentConfig:
    translate: int = 0  # random crop after reflect-padding by this many pixels
    flip: bool = False  # random horizontal flip
    rotate: float = 0.0  # random rotation in [-rotate, rotate] degrees
    color_jitter: float = 0.0  # brightness/contrast/saturation factors drawn from [1-j, 1+j]

    def __post_init__(self):
        check_range("translate", self.translate, 0, MAX_TRANSLATE, whole=True)
        self.translate = int(self.translate)
        if self.flip not in (True, False):
            raise TrainingError(f"flip (--flip/--no-flip) must be true or false, not {self.flip!r}.")
        self.flip = bool(self.flip)
        check_range("rotate", self.rotate, 0, 180)
        check_range("color_jitter", self.color_jitter, 0, 1)  # above 1 a factor 1-j would turn negative

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def active(self) -> bool:
        return bool(self.translate or self.flip or self.rotate or self.color_jitter)


def _uniform(n: int, low: float, high: float, like: torch.Tensor, generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device).to(like.device, like.dtype) * (high - low) + low


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    mask = torch.rand(len(x), generator=generator, device=generator.device).to(x.device) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)


def random_translate(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Reflect-pad by `pad`, then cut a random HxW window per image (one gather for the whole batch)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return cropped.gather(3, cols)


def random_rotate(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    angles = _uniform(len(x), -degrees, degrees, x, generator) * (math.pi / 180)
    cos, sin = torch.cos(angles), torch.sin(angles)
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    n = len(x)
    brightness = _uniform(n, 1 - strength, 1 + strength, x, generator).view(n, 1, 1, 1)
    contrast = _uniform(n, 1 - strength, 1 + strength, x, generator).view(n, 1, 1, 1)
    saturation = _uniform(n, 1 - strength, 1 + strength, x, generator).view(n, 1, 1, 1)
    x = x * brightness
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray.mean((2, 3), keepdim=True)) * contrast + gray.mean((2, 3), keepdim=True)
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray) * saturation + gray
    return x.clamp(0, 1)


def augment_batch(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Apply the configured augmentations in a fixed order: colour, rotation, translation, flip."""
    if config.color_jitter:
        x = color_jitter(x, config.color_jitter, generator)
    if config.rotate:
        x = random_rotate(x, config.rotate, generator)
    if config.translate:
        x = random_translate(x, config.translate, generator)
    if config.flip:
        x = random_flip(x, generator)
    return x


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 -> (N, 3, 32, 32) float in [0, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float().div_(255.0)
