"""The training engine: one readable loop over uint8 tensors that stay on the device.

    config = TrainConfig(model="lenet", epochs=10, lr=0.05)
    result = train(config, dataset, callback=print)

Per step the loop slices a uint8 batch, converts it to float, augments it as a
batch, and steps the optimiser. It reports through `callback` ({"event": "step"}
and {"event": "epoch"} dicts: losses, accuracies, lr, images/s, elapsed), hands
the model to `on_epoch` after every finished epoch (checkpoints, snapshots), stops
between batches when `cancel()` returns True, and raises TrainingError on a
non-finite loss with the history so far. CUDA gets bf16 autocast; CPU runs fp32
on all cores; both use channels_last.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .augment import AugmentConfig, augment_batch, check_range, to_float
from .errors import ModelError, TrainingError
from .inference import TTA_MODES, autocast_context, loss_and_accuracy, predict
from .models import ZooModel, create_model, model_entry, validate_arch_args
from .utils import pick_device, seed_everything

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")
# How `weight_decay` is read. "coefficient": the optimiser's own coefficient, so each step shrinks the weights by
# lr x weight_decay and a new lr changes the decay too. "per_step": the shrink per step at the peak lr (lr x
# coefficient); the coefficient is weight_decay / lr, so a new lr keeps the recipe's decay (airbench's convention).
WEIGHT_DECAY_MODES = ("coefficient", "per_step")


@dataclass
class TrainConfig:
    model: str = "lenet"
    model_args: dict = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd is Nesterov SGD
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    weight_decay_mode: str = "coefficient"  # see WEIGHT_DECAY_MODES
    label_smoothing: float = 0.0
    schedule: str = "onecycle"  # linear warm-up then linear decay; or cosine; or constant
    warmup: float = 0.2  # fraction of steps spent warming up (onecycle, cosine)
    final_lr: float = 0.0  # last learning rate as a fraction of lr
    lookahead: bool = False  # airbench-style lookahead with an EMA whose decay ramps up
    warmup_start: float = 0.2  # the warm-up's first learning rate, as a fraction of lr
    lookahead_every: int = 5  # steps between lookahead updates
    lookahead_decay: float = 0.95  # the EMA's decay per step at the end of training
    lookahead_power: float = 3.0  # the decay ramps up as (step / total steps) ** power
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tta: str = "none"  # test-time augmentation used for validation and reported metrics
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        """Check every setting here, so a bad value fails at once (CLI and library alike), not mid-training."""
        if isinstance(self.augment, dict):
            try:
                self.augment = AugmentConfig(**self.augment)
            except TypeError as exc:
                raise TrainingError(f"augment: {exc}. Its settings: translate, flip, rotate, color_jitter.") from None
        if not isinstance(self.model_args, dict):
            raise TrainingError(f'model_args (--model-args) must be a JSON object such as {{"widths": [32, 128, 128]}}, '
                                f"not {self.model_args!r}.")
        entry = model_entry(self.model)  # an unknown name fails here, listing the zoo
        try:
            inspect.signature(entry.builder).bind(**self.model_args)
        except TypeError as exc:
            raise ModelError(f"Bad model_args (--model-args) for {self.model!r}: {exc}. "
                             f"Its arguments: {entry.defaults()}.") from None
        validate_arch_args(self.model, self.model_args)  # the card's bounds: a run's config.json is a file too
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("tta", TTA_MODES),
                              ("weight_decay_mode", WEIGHT_DECAY_MODES)):
            if getattr(self, name) not in allowed:
                raise TrainingError(f"{name} (--{name}) must be one of {', '.join(allowed)}, not {getattr(self, name)!r}.")
        check_range("epochs", self.epochs, 1, whole=True)
        check_range("batch_size", self.batch_size, 1, whole=True)
        check_range("lr", self.lr, 0, low_open=True)
        check_range("momentum", self.momentum, 0, 1, high_open=True)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        check_range("warmup", self.warmup, 0, 1)
        check_range("final_lr", self.final_lr, 0)
        check_range("warmup_start", self.warmup_start, 0, 1)
        check_range("lookahead_every", self.lookahead_every, 1, whole=True)
        check_range("lookahead_decay", self.lookahead_decay, 0, 1)
        check_range("lookahead_power", self.lookahead_power, 0)
        check_range("seed", self.seed, 0, 2**63, whole=True, high_open=True)
        self.epochs, self.batch_size, self.seed = int(self.epochs), int(self.batch_size), int(self.seed)
        check_device_name(self.device)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def decay_coefficient(self) -> float:
        """The optimiser's weight-decay coefficient (at lr scale 1), whichever way `weight_decay` is written."""
        return self.weight_decay / self.lr if self.weight_decay_mode == "per_step" else self.weight_decay


def check_device_name(device: str) -> None:
    """`auto`, `cpu`, `cuda`, `cuda:N` or `mps`; anything else (a typo, `tpu`) gets one clear message."""
    try:
        kind = "auto" if device == "auto" else torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("auto", "cpu", "cuda", "mps"):
        raise TrainingError(f"device (--device) must be auto, cpu, cuda, cuda:N or mps, not {device!r}.")


def resolve_device(preference: str = "auto") -> torch.device:
    """The torch device for `preference`, or a clear error when that device is not on this machine."""
    check_device_name(preference)
    device = pick_device(preference)  # explains a missing CUDA GPU
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise TrainingError(f"--device {preference}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            "numbered from 0.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingError("--device mps was asked for but Apple's MPS backend is not available; use cpu or auto.")
    return device


@dataclass
class TrainResult:
    model: ZooModel
    config: TrainConfig
    history: list[dict]  # one dict per finished epoch
    status: str  # "completed" or "cancelled"
    seconds: float
    device: str
    # Each training image's margin (its label's logit minus the largest other logit) on its augmented copies,
    # averaged over the second half of training (area_under_margin): Pleiss et al.'s area under the margin. Low or
    # negative = the network kept fighting the label: a mislabelled image, or an atypical one. Rows: dataset.train.
    mean_margins: np.ndarray | None = None
    epoch_margins: np.ndarray | None = None  # (finished epochs, images): each epoch's margin, for benchmarks

    def statistics(self, dataset) -> dict:
        """What save_checkpoint stores beside the weights: each training image's source index and mean margin."""
        if self.mean_margins is None:
            return {}
        return {"source_index": np.asarray(dataset.train.source_index, dtype=np.int64),
                "mean_margin": self.mean_margins.astype(np.float32)}


def lr_factor(config: TrainConfig, step: int, total_steps: int) -> float:
    progress = step / max(total_steps, 1)
    if config.schedule == "constant":
        return 1.0
    if progress < config.warmup:
        return config.warmup_start + (1 - config.warmup_start) * progress / config.warmup
    rest = (progress - config.warmup) / max(1 - config.warmup, 1e-8)
    if config.schedule == "onecycle":
        return 1.0 + (config.final_lr - 1.0) * rest
    return config.final_lr + (1 - config.final_lr) * 0.5 * (1 + math.cos(math.pi * rest))


def build_optimizer(model: ZooModel, config: TrainConfig) -> torch.optim.Optimizer:
    # Groups with a larger lr keep the same absolute decay (airbench's bias trick), hence wd / scale.
    groups = [
        {"params": params, "lr": config.lr * scale, "weight_decay": config.decay_coefficient / scale, "lr_scale": scale}
        for params, scale in model.param_groups()
        if params
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.AdamW(groups, lr=config.lr)


class Lookahead:
    """Every few steps, pull the weights towards an EMA of themselves and reset to it (airbench94)."""

    def __init__(self, model: torch.nn.Module):
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float) -> None:
        state = model.state_dict()
        for key, ema in self.ema.items():
            ema.lerp_(state[key], 1 - decay)
            state[key].copy_(ema)


def train(
    config: TrainConfig,
    dataset,
    *,
    callback: Callable[[dict], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    model: ZooModel | None = None,
    step_every: int = 10,
    on_epoch: Callable[[ZooModel, list[dict]], None] | None = None,
    validate_partial: bool = True,
) -> TrainResult:
    """Train `config.model` on `dataset.train`, validating on `dataset.val` after every epoch.

    A `model` passed in is trained as it is: its normalisation and any data-dependent
    initialisation (fastnet's whitening) are kept. Only a model created here from
    `config.model` gets the training split's statistics and `prepare()`.

    `on_epoch(model, history)` runs after each finished epoch (the model in train mode on the device: save it,
    don't change it). A cancelled epoch is validated and recorded as partial unless `validate_partial` is False,
    in which case `cancel()` ends training at once and the history holds finished epochs only.
    """
    seed_everything(config.seed)
    device = resolve_device(config.device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    notify = callback or (lambda event: None)

    images = torch.from_numpy(dataset.train.images).to(device)
    labels = torch.from_numpy(dataset.train.labels).to(device)
    fresh = model is None
    if fresh:
        model = create_model(config.model, **config.model_args)
        if not getattr(model, "frozen_backbone", False):  # a frozen pretrained backbone keeps its own statistics
            model.set_normalization(dataset.mean, dataset.std)
    # channels_last suits both cuDNN and oneDNN: about 2x faster convolutions on this 2-core CPU too.
    model = model.to(device, memory_format=torch.channels_last)
    if fresh and model.prepare_images:
        # Data-dependent init (fastnet's whitening) sees random images: the split is ordered by class.
        chosen = torch.randperm(len(images), generator=generator, device=device)[: model.prepare_images]
        model.prepare(to_float(images[chosen]))

    optimizer = build_optimizer(model, config)
    steps_per_epoch = math.ceil(len(labels) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    lookahead = Lookahead(model) if config.lookahead else None

    history: list[dict] = []
    status, step, start = "completed", 0, time.perf_counter()
    margin_sum = torch.zeros(len(labels), device=device)  # this epoch's margin per training image (AUM)
    epoch_margins: list[torch.Tensor] = []  # one per finished epoch
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(labels), generator=generator, device=device)
        seen, loss_sum, correct_sum, epoch_start = 0, 0.0, 0, time.perf_counter()
        for batch_start in range(0, len(labels), config.batch_size):
            if cancel is not None and cancel():
                status = "cancelled"
                break
            index = order[batch_start : batch_start + config.batch_size]
            x = augment_batch(to_float(images[index]), config.augment, generator)
            y = labels[index]
            x = x.contiguous(memory_format=torch.channels_last)

            factor = lr_factor(config, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * group["lr_scale"] * factor

            with autocast_context(device):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
            with torch.no_grad():  # the assigned label's margin on what the network trained on (AUM)
                scored = logits.detach().float()
                own = scored.gather(1, y[:, None])[:, 0]
                other = scored.scatter(1, y[:, None], float("-inf")).amax(1)
                margin_sum.index_add_(0, index, own - other)  # each image once per epoch (a permutation)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"The loss became {loss_value} at epoch {epoch}, step {step} (lr {config.lr * factor:.3g}): "
                    "the weights diverged. Training stopped; the history so far is kept. Try a smaller learning "
                    f"rate (e.g. {config.lr / 10:.3g}), a warm-up, or a different optimizer.",
                    history=history,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if lookahead is not None and step % config.lookahead_every == 0:
                ramp = (step / total_steps) ** config.lookahead_power
                lookahead.update(model, decay=config.lookahead_decay**config.lookahead_every * ramp)

            n = len(y)
            seen += n
            loss_sum += loss_value * n
            correct_sum += int((logits.argmax(1) == y).sum())
            if step % step_every == 0 or batch_start + n >= len(labels):
                notify({
                    "event": "step", "step": step, "total_steps": total_steps, "epoch": epoch,
                    "loss": loss_value, "lr": config.lr * factor, "steps_per_epoch": steps_per_epoch,
                    "train_loss": loss_sum / seen, "train_acc": correct_sum / seen,
                    "images_per_s": seen / (time.perf_counter() - epoch_start),
                    "elapsed": time.perf_counter() - start,
                })  # fmt: skip
        if status != "cancelled":
            epoch_margins.append(margin_sum.clone())
        margin_sum.zero_()
        if status == "cancelled" and (seen == 0 or not validate_partial):
            break

        if lookahead is not None and epoch == config.epochs and status == "completed":
            lookahead.update(model, decay=1.0)  # finish on the averaged weights
        val = evaluate_split(model, dataset.val, config.tta, device) if len(dataset.val) else {}
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct_sum / max(seen, 1),
            "val_loss": val.get("loss"),
            "val_acc": val.get("accuracy"),
            "lr": config.lr * factor,
            "images_per_s": seen / (time.perf_counter() - epoch_start),
            "elapsed": time.perf_counter() - start,
            "partial": status == "cancelled",
        }
        history.append(record)
        notify({"event": "epoch", **record})
        if status == "cancelled":
            break
        if on_epoch is not None:
            on_epoch(model, history)

    model.eval()
    by_epoch = torch.stack(epoch_margins).cpu().numpy() if epoch_margins else None  # finished epochs only
    return TrainResult(model, config, history, status, time.perf_counter() - start, str(device),
                       area_under_margin(by_epoch) if by_epoch is not None else None, by_epoch)


AUM_FROM = 0.5  # the share of epochs left out at the start: every margin is near 0 while the network is untrained


def area_under_margin(epoch_margins: np.ndarray) -> np.ndarray:
    """Each training image's margin averaged over the second half of training (Pleiss et al. 2020 average over all
    epochs; leaving out the first half found more flipped labels in both measurements here: lenet, 5% of 45,000
    labels flipped, top 10%: 84.3% and 85.0% against 83.3% and 83.5% over every epoch, flip seeds 0 and 1,
    bench/bench_suspicious.py)."""
    margins = np.asarray(epoch_margins, dtype=np.float64)
    return margins[int(len(margins) * AUM_FROM):].mean(0).astype(np.float32)


def evaluate_split(model: ZooModel, split, tta: str = "none", device="auto") -> dict:
    preds = predict(model, split.images, tta=tta, device=device, features=False)
    loss, accuracy = loss_and_accuracy(preds.logits, split.labels)
    return {"loss": loss, "accuracy": accuracy}
