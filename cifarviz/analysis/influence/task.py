"""What influence is computed against (Kronfluence's `Task`): the loss the checkpoint was trained with, and the
quantity a test image is measured by. The two differ, and mixing them swaps answers.

* **Training loss** (the Hessian and the training images' gradients): the cross-entropy the checkpoint was trained
  with, label smoothing included, plus its weight decay as an L2 penalty (lambda/2)|theta|^2. SGD and Adam add
  `weight_decay * theta` to the gradient, which is that penalty; AdamW decouples the decay from the adaptive step,
  which is the same penalty at the optimum up to the learning-rate schedule, so it is read the same way. A decay
  written per step at the peak lr (`weight_decay_mode` "per_step", airbench's convention) is that value / lr.
* **Measurement** (the test side): the *plain* cross-entropy of the test image's true label, -log p(y | x), for every
  method and every checkpoint. A smoothed loss would be the wrong question: with smoothing 0.2 it is lowest at
  p(y) = 0.82, so for a test image the model is surer of than that, "removing it raises the smoothed loss" would mean
  "the model would become *more* sure", and helpful and harmful would swap.

Sign convention (every method): helpful = removing the training image raises the test image's plain loss.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import asdict, dataclass

from .base import InfluenceError

MEASUREMENT = "cross_entropy"  # -log p(true label): what "the test image's loss" means on every page


@dataclass(frozen=True)
class Task:
    label_smoothing: float  # of the training loss
    l2: float  # weight decay as the L2 coefficient of the training loss
    optimizer: str
    measurement: str = MEASUREMENT

    def key(self) -> dict:
        """What the task contributes to an index's store key."""
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, checkpoint) -> "Task":
        """The task of a checkpoint's own training, read from its metadata and checked (metadata is untrusted:
        `label_smoothing 5` or `weight_decay 1e308` would silently scale every score, "abc" or NaN would crash)."""
        meta = checkpoint.meta if isinstance(checkpoint.meta, dict) else {}
        config = meta.get("train_config") or {}
        if not isinstance(config, dict):
            raise InfluenceError(f"{checkpoint.name}: its train_config is not a mapping, so the loss it was trained "
                                 "with is unknown.")
        smoothing = _number(checkpoint, config, "label_smoothing", 0.0)
        if not 0 <= smoothing < 1:
            raise InfluenceError(f"{checkpoint.name}: label_smoothing {smoothing:g} in its metadata is outside [0, 1); "
                                 "re-save the checkpoint with its real training configuration.")
        decay = _number(checkpoint, config, "weight_decay", 0.0)
        if decay < 0 or decay > 10:
            raise InfluenceError(f"{checkpoint.name}: weight_decay {decay:g} in its metadata is not a plausible decay "
                                 "(0 to 10); re-save the checkpoint with its real training configuration.")
        if config.get("weight_decay_mode", "coefficient") == "per_step":
            lr = _number(checkpoint, config, "lr", 0.0)
            if not lr > 0:
                raise InfluenceError(f"{checkpoint.name}: a per-step weight decay needs a positive lr in its metadata "
                                     f"to give the L2 coefficient, not {lr:g}.")
            decay /= lr
        elif config.get("weight_decay_mode", "coefficient") != "coefficient":
            mode = reprlib.repr(config.get("weight_decay_mode"))
            raise InfluenceError(f"{checkpoint.name}: weight_decay_mode {mode} "
                                 "in its metadata is neither coefficient nor per_step.")
        optimizer = str(config.get("optimizer") or "sgd")
        return cls(label_smoothing=smoothing, l2=decay, optimizer=optimizer)


def _number(checkpoint, config: dict, name: str, default: float) -> float:
    value = config.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InfluenceError(f"{checkpoint.name}: {name} {reprlib.repr(value)} in its metadata is not a finite number; "
                             "re-save the checkpoint with its real training configuration.")
    return float(value)
