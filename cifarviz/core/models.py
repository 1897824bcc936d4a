"""The model zoo: every network of the source projects plus one fast modern net.

Adding a network is one function decorated with ``@register_model("name")``; build
one with ``create_model("name", **kwargs)`` (the shape of timm's registry).

Every zoo model takes images as floats in [0, 1], shape (N, 3, 32, 32), and
normalises them itself with the per-channel statistics stored in its buffers (the
training split's, set by the trainer and saved in the checkpoint), so a checkpoint
is self-contained. Each model splits into ``forward_features`` (the penultimate
features that embeddings and influence use) and ``forward_head`` (the classifier).
"""

from __future__ import annotations

import inspect
import os
import reprlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., ZooModel]
    source: str
    description: str

    def defaults(self) -> dict:
        sig = inspect.signature(self.builder)
        return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, source: str, description: str):
    def decorator(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, source, description)
        return fn

    return decorator


def list_models() -> list[str]:
    return list(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"Unknown model {name!r}. Available: {', '.join(_REGISTRY)}.") from None


def create_model(name: str, **kwargs) -> ZooModel:
    entry = model_entry(name)
    try:
        model = entry.builder(**kwargs)
    except TypeError as exc:
        raise ModelError(f"Bad arguments for model {name!r}: {exc}. Its arguments: {entry.defaults()}.") from None
    model.arch_name = name
    model.arch_args = {**entry.defaults(), **kwargs}
    return model


@dataclass(frozen=True)
class ArgRange:
    """Inclusive [low, high], or [low, high) with `open_high`; sequence arguments are checked element-wise."""

    low: float
    high: float
    open_high: bool = False

    def __contains__(self, value) -> bool:  # NaN fails both comparisons
        return self.low <= value and (value < self.high if self.open_high else value <= self.high)

    def __str__(self) -> str:
        return f"[{self.low}, {self.high}{')' if self.open_high else ']'}"


# Sane ranges for every numeric builder argument, keyed by name (the zoo shares its argument names).
# Checkpoint metadata is untrusted: without bounds a 4 MB file asks for a 2 GB model or 20,000 blocks.
ARG_BOUNDS: dict[str, ArgRange] = {
    "num_classes": ArgRange(1, 1000),
    "widths": ArgRange(1, 1024),  # fastnet's conv widths
    "hidden": ArgRange(1, 1024),  # deepnet's conv width
    "hidden_fc": ArgRange(1, 4096),
    "fc1": ArgRange(1, 4096),
    "fc2": ArgRange(1, 4096),
    "blocks": ArgRange(1, 64),
    "groups": ArgRange(1, 64),
    "input_size": ArgRange(32, 256),
    "dropout": ArgRange(0, 1, open_high=True),
}


def _same_kind(value, default) -> bool:
    if default is None:
        return True
    if isinstance(default, float) and not isinstance(value, bool):
        return isinstance(value, (int, float))  # JSON may write 0.0 as 0
    return type(value) is type(default)


def validate_arch_args(name: str, args) -> dict:
    """Check builder arguments read from a file: the default's type and ARG_BOUNDS; returns the ones the
    builder takes (others are dropped: older or newer files may carry extra ones). Raises ModelError."""
    defaults = model_entry(name).defaults()
    if not isinstance(args, dict):
        raise ModelError(f"Arguments for model {name!r} must be a mapping of name to value, not {type(args).__name__} "
                         f"{reprlib.repr(args)}. Its arguments: {defaults}.")
    checked = {}
    for key, value in args.items():
        if key not in defaults:
            continue
        default = defaults[key]
        if isinstance(default, (tuple, list)):
            if not isinstance(value, (tuple, list)) or len(value) != len(default):
                raise ModelError(f"Model {name!r}: argument {key} must be a list of {len(default)} values like "
                                 f"{list(default)}, not {reprlib.repr(value)}.")
            items, kind = value, default[0]
        else:
            items, kind = [value], default
        for item in items:
            if not _same_kind(item, kind):
                raise ModelError(f"Model {name!r}: argument {key} must be of type {type(kind).__name__} (default "
                                 f"{default!r}), not {type(item).__name__} {reprlib.repr(item)}.")
            if key in ARG_BOUNDS and item not in ARG_BOUNDS[key]:
                each = " for each value" if len(items) > 1 else ""
                raise ModelError(f"Model {name!r}: argument {key}={reprlib.repr(value)} is out of range; allowed "
                                 f"{ARG_BOUNDS[key]}{each} (default {default!r}).")
        checked[key] = value
    return checked


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------- base


class ZooModel(nn.Module):
    """Input normalisation + features + head. Subclasses define `features` and `head` modules."""

    arch_name: str = ""
    arch_args: dict = {}
    features: nn.Module
    head: nn.Module

    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def set_normalization(self, mean, std) -> None:
        self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.input_std.copy_(torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def param_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """(parameters, learning-rate multiplier) pairs; fastnet gives its biases a larger rate."""
        return [([p for p in self.parameters() if p.requires_grad], 1.0)]

    def prepare(self, train_images: torch.Tensor) -> None:
        """Data-dependent initialisation before training (fastnet's whitening); most models need none."""


def kaiming_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------- lenet


class LeNet(ZooModel):
    """The PyTorch CIFAR-10 tutorial network (sc1015 and simple-cnn sources): 62,006 parameters."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(84, num_classes)


@register_model("lenet", source="sc1015-influence-functions, simple-cnn-misclassified",
                description="PyTorch-tutorial LeNet: 2 conv (5x5) + 3 FC")
def lenet(num_classes: int = 10) -> ZooModel:
    return LeNet(num_classes)


# --------------------------------------------------------------------------- s8net


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(groups, channels)
    if kind == "ln":  # layer norm over (C, H, W) per sample, with per-channel affine: GroupNorm with one group
        return nn.GroupNorm(1, channels)
    raise ModelError(f"norm must be bn, gn or ln, not {kind!r}")


class S8Net(ZooModel):
    """The < 50K-parameter all-convolutional net of the s8 source (37,664 parameters).

    Blocks are conv(3x3, no bias) -> ReLU -> norm -> dropout; 1x1 "transition" convs with max-pool
    shrink channels to 8 between stages, and a global average pool + 1x1 conv classify.
    """

    def __init__(self, norm: str = "bn", dropout: float = 0.05, groups: int = 2, num_classes: int = 10):
        super().__init__()

        def block(cin, cout, padding=1):
            return [nn.Conv2d(cin, cout, 3, padding=padding, bias=False), nn.ReLU(), _norm(norm, cout, groups), nn.Dropout(dropout)]

        def transition(cin, cout):
            return [nn.Conv2d(cin, cout, 1, bias=False), nn.MaxPool2d(2)]

        self.features = nn.Sequential(
            *block(3, 32), *block(32, 32), *transition(32, 8),  # 32x32 -> 16x16
            *block(8, 32), *block(32, 32), *block(32, 32, padding=0), *transition(32, 8),  # 16 -> 14 -> 7
            *block(8, 16), *block(16, 16), *block(16, 16),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(16, num_classes, bias=False)  # the source's final 1x1 conv (160 weights)


def _s8(norm: str, dropout: float, doc: str):
    @register_model(f"s8net-{norm}", source="s8-normalization-50k-params", description=doc)
    def build(dropout: float = dropout, groups: int = 2, num_classes: int = 10) -> ZooModel:
        return S8Net(norm, dropout, groups, num_classes)

    return build


_s8("bn", 0.05, "< 50K-param all-conv net with BatchNorm (37,664 params)")
_s8("gn", 0.01, "< 50K-param all-conv net with GroupNorm, 2 groups (37,664 params)")
_s8("ln", 0.01, "< 50K-param all-conv net with LayerNorm (GroupNorm with 1 group; 37,664 params)")


# --------------------------------------------------------------------------- cifar10net (cs231n-style)


class CIFAR10Net(ZooModel):
    """Two conv + BN layers, then three FC layers with BN (cs231n-style source), Kaiming-normal init."""

    def __init__(self, fc1: int = 124, fc2: int = 64, dropout: float = 0.0, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 20, 3), nn.BatchNorm2d(20), nn.ReLU(), nn.MaxPool2d(2),  # 32 -> 30 -> 15
            nn.Conv2d(20, 40, 4), nn.BatchNorm2d(40), nn.ReLU(), nn.MaxPool2d(2),  # 15 -> 12 -> 6
            # No dropout on the convolutional output (the source put it in the FC layers only); the Identity keeps
            # the layer numbering, and so the tensor names, of earlier checkpoints.
            nn.Flatten(), nn.Identity(),
            nn.Linear(40 * 6 * 6, fc1), nn.BatchNorm1d(fc1), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(fc1, fc2), nn.BatchNorm1d(fc2), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(fc2, num_classes))
        self.apply(kaiming_init)


@register_model("cifar10net", source="cs231n-style-cnn-tsne-optuna-transfer",
                description="2 conv + BN, 3 FC (124/64/10) with BN, Kaiming init")
def cifar10net(fc1: int = 124, fc2: int = 64, dropout: float = 0.0, num_classes: int = 10) -> ZooModel:
    return CIFAR10Net(fc1, fc2, dropout, num_classes)


@register_model("cifar10net-small", source="cs231n-style-cnn-tsne-optuna-transfer",
                description="cifar10net with narrow FC layers 32/16 (the source's change #1)")
def cifar10net_small(fc1: int = 32, fc2: int = 16, dropout: float = 0.0, num_classes: int = 10) -> ZooModel:
    return CIFAR10Net(fc1, fc2, dropout, num_classes)


@register_model("cifar10net-dropout", source="cs231n-style-cnn-tsne-optuna-transfer",
                description="cifar10net with dropout 0.5 in the FC layers (the source's change #6)")
def cifar10net_dropout(fc1: int = 124, fc2: int = 64, dropout: float = 0.5, num_classes: int = 10) -> ZooModel:
    return CIFAR10Net(fc1, fc2, dropout, num_classes)


# --------------------------------------------------------------------------- deepnet: plain / residual / skip


class _Block(nn.Module):
    """conv(C -> C/2) + BN + ReLU, conv(C/2 -> C or C/2); the three kinds differ only in how input rejoins."""

    def __init__(self, channels: int, kind: str):
        super().__init__()
        if kind == "skip" and channels % 2:
            raise ModelError("skip blocks need an even channel count so input and output sizes match")
        self.kind = kind
        half = channels // 2
        self.conv1 = nn.Conv2d(channels, half, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half if kind == "skip" else channels, 3, padding=1)

    def forward(self, x):
        if self.kind == "skip":  # concatenate the first conv's output with the second's
            x1 = F.relu(self.conv1(x))
            return torch.cat((x1, self.conv2(F.relu(self.bn1(x1)))), 1)
        out = self.conv2(F.relu(self.bn1(self.conv1(F.relu(x)))))
        return out + x if self.kind == "res" else out


class DeepNet(ZooModel):
    """Three conv/pool stages, `blocks` blocks of one kind, then dropout and two FC layers."""

    def __init__(self, kind: str, hidden: int = 32, hidden_fc: int = 32, blocks: int = 6, dropout: float = 0.5,
                 num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            *[_Block(hidden, kind) for _ in range(blocks)],
            nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(hidden * 4 * 4, hidden_fc), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(hidden_fc, num_classes)


def _deepnet(kind: str, doc: str):
    @register_model(f"deepnet-{kind}", source="resnet-conv-skip-comparison", description=doc)
    def build(hidden: int = 32, hidden_fc: int = 32, blocks: int = 6, dropout: float = 0.5, num_classes: int = 10):
        return DeepNet(kind, hidden, hidden_fc, blocks, dropout, num_classes)

    return build


_deepnet("conv", "3 conv stages + 6 plain conv blocks + 2 FC (Custom_ConvNet)")
_deepnet("res", "3 conv stages + 6 residual blocks + 2 FC (Custom_ResNet)")
_deepnet("skip", "3 conv stages + 6 skip-concatenation blocks + 2 FC (Custom_SkipNet)")


# --------------------------------------------------------------------------- resnet18


class TorchvisionResNet(ZooModel):
    def __init__(self, net: nn.Module, mean, std, input_size: int | None = None, frozen_backbone: bool = False):
        super().__init__(mean, std)
        self.head = net.fc
        net.fc = nn.Identity()
        self.features = net
        self.input_size = input_size
        self.frozen_backbone = frozen_backbone

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_backbone:  # a frozen feature extractor keeps its BatchNorm statistics
            self.features.eval()
        return self

    def forward_features(self, x):
        x = self.normalize(x)
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return self.features(x)


@register_model("resnet18", source="cs231n-style-cnn-tsne-optuna-transfer",
                description="torchvision ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), from scratch")
def resnet18(num_classes: int = 10) -> ZooModel:
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return TorchvisionResNet(net, CIFAR10_MEAN, CIFAR10_STD)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _imagenet_resnet18_state_dict() -> dict:
    """torchvision's ImageNet weights: from the local hub cache, else downloaded, else a clear error in seconds."""
    from torchvision.models import ResNet18_Weights

    from .utils import host_reachable, offline

    weights = ResNet18_Weights.IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(cached) and (offline() or not host_reachable("download.pytorch.org")):
        raise ModelError(
            "resnet18-transfer needs torchvision's ImageNet ResNet-18 weights, which are not cached at "
            f"{cached} and cannot be downloaded from here. Fix: on a machine with internet access run "
            "`python -c \"import torchvision; torchvision.models.resnet18(weights='IMAGENET1K_V1')\"` and copy "
            f"the file to {cached}; or pass pretrained=False (random backbone, for tests)."
        )
    return weights.get_state_dict(progress=True, check_hash=True)


@register_model("resnet18-transfer", source="cs231n-style-cnn-tsne-optuna-transfer",
                description="ImageNet ResNet-18 as a frozen feature extractor + new 10-class head")
def resnet18_transfer(pretrained: bool = True, input_size: int = 224, num_classes: int = 10) -> ZooModel:
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18()
    if pretrained:
        net.load_state_dict(_imagenet_resnet18_state_dict())
    for p in net.parameters():
        p.requires_grad = False
    net.fc = nn.Linear(net.fc.in_features, num_classes)  # the only trainable layer
    return TorchvisionResNet(net, IMAGENET_MEAN, IMAGENET_STD, input_size=input_size, frozen_backbone=True)


# --------------------------------------------------------------------------- fastnet (airbench94-style)


class _FrozenWeightBN(nn.BatchNorm2d):
    """BatchNorm with a learned bias only (the scale is fixed at 1), as in airbench."""

    def __init__(self, channels: int, momentum: float = 0.6, eps: float = 1e-12):
        super().__init__(channels, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class _ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _FrozenWeightBN(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _FrozenWeightBN(cout)
        for conv in (self.conv1, self.conv2):  # identity-like init: dirac on the first in-channels
            nn.init.dirac_(conv.weight.data[: conv.weight.size(1)])

    def forward(self, x):
        x = F.gelu(self.norm1(self.pool(self.conv1(x))))
        return F.gelu(self.norm2(self.conv2(x)))


class FastNet(ZooModel):
    """airbench94-style: frozen 2x2 patch-whitening conv, three conv groups (conv, max-pool, BN, GELU),
    a max-pool to 1x1 and a scaled linear head."""

    def __init__(self, widths=(32, 128, 128), scaling: float = 1 / 9, num_classes: int = 10):
        super().__init__()
        w1, w2, w3 = widths
        whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
        whiten.weight.requires_grad = False  # set once from data by prepare(), never trained
        self.features = nn.Sequential(
            whiten, nn.GELU(),
            _ConvGroup(24, w1), _ConvGroup(w1, w2), _ConvGroup(w2, w3),
            nn.MaxPool2d(3), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(w3, num_classes, bias=False)
        self.scaling = scaling

    @property
    def whiten(self) -> nn.Conv2d:
        return self.features[0]

    def forward_head(self, features):
        return self.head(features) * self.scaling

    @torch.no_grad()
    def prepare(self, train_images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from the eigenvectors of 2x2 patch covariance (first 5,000 images)."""
        x = self.normalize(train_images[:5000].float())
        patches = x.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 3, 2, 2).flatten(1).double()
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).flip(0).view(12, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat((filters, -filters)).float())

    def param_groups(self):
        biases = [self.whiten.bias] + [m.bias for m in self.modules() if isinstance(m, _FrozenWeightBN)]
        ids = {id(p) for p in biases}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [(biases, 64.0), (rest, 1.0)]


@register_model("fastnet", source="airbench94 (modern speed-run recipe)",
                description="airbench94-style net: patch whitening + 3 conv groups; widths configurable")
def fastnet(widths: tuple = (32, 128, 128), num_classes: int = 10) -> ZooModel:
    return FastNet(tuple(widths), num_classes=num_classes)
