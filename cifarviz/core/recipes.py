"""The recipes that trained the shipped checkpoints (read from the model cards), and the function that trains,
measures and saves one.

`python -m cifarviz train --recipe NAME` reruns a recipe; every figure it stores
(test accuracy on the named data, training seconds, device) is re-measured by
tests/test_shipped_checkpoints.py.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

from .checkpoint import save_checkpoint
from .errors import CheckpointError, ModelError
from .models import model_card, model_cards
from .train import TrainConfig, TrainResult, evaluate_split, train

def recipe_config(name: str) -> TrainConfig:
    """The shipped recipe of zoo model NAME (its card's `recipe`) as a TrainConfig; ModelError if it has none."""
    card = model_card(name)
    if card.recipe is None:
        raise ModelError(f"{name} has no shipped recipe. Recipes: {', '.join(RECIPES)}.")
    return TrainConfig(model=card.name, **card.recipe)


# The recipes, read from the cards (the one place per model): {model name: TrainConfig}.
RECIPES: dict[str, TrainConfig] = {card.name: TrainConfig(model=card.name, **card.recipe)
                                   for card in model_cards() if card.recipe is not None}


def train_and_save(
    config: TrainConfig,
    dataset,
    out: str | Path,
    *,
    callback: Callable[[dict], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    notes: str = "",
    snapshot_dir: str | Path | None = None,
) -> tuple[Path, TrainResult]:
    """Train, measure test accuracy on `dataset.test` (with the config's TTA), and save a checkpoint.

    With `snapshot_dir`, every finished epoch is also saved there as epoch-NNN.safetensors (no test metrics)."""
    on_epoch = None
    if snapshot_dir is not None:
        def on_epoch(model, history):
            save_snapshot(snapshot_dir, model, checkpoint_meta(config, dataset, model, history, "running"))
    result = train(config, dataset, callback=callback, cancel=cancel, on_epoch=on_epoch)
    meta = checkpoint_meta(config, dataset, result.model, result.history, result.status, result.seconds,
                           measure_test=True, notes=notes)
    statistics = result.statistics(dataset)
    try:
        path = save_checkpoint(out, result.model, meta, statistics=statistics)
    except OSError as exc:  # a full or read-only disk: minutes of training are not thrown away
        kept = Path(tempfile.gettempdir()) / f"cifarviz-unsaved-{Path(out).stem}-{os.getpid()}.safetensors"
        try:
            save_checkpoint(kept, result.model, meta, statistics=statistics)
        except OSError:
            raise CheckpointError(f"The training finished, but its checkpoint could not be written to {out} "
                                  f"({exc.strerror or exc}) nor to {kept.parent}: free disk space and train "
                                  "again.") from exc
        raise CheckpointError(f"The training finished, but its checkpoint could not be written to {out} "
                              f"({exc.strerror or exc}). The trained weights are kept in {kept}: move them where "
                              "you want them once there is space.") from exc
    return path, result


def checkpoint_meta(config: TrainConfig, dataset, model, history: list[dict], status: str,
                    seconds: float | None = None, *, measure_test: bool = False, notes: str = "") -> dict:
    """What a checkpoint records about its training; with `measure_test`, the model's accuracy on `dataset.test`."""
    import torch

    meta = {
        "classes": list(dataset.classes),
        "provenance": provenance(config, dataset, model),
        "train_config": config.to_dict(),
        "history": history,
        "status": status,
        "data": dataset.describe(),
        "train_seconds": seconds if seconds is not None else (history[-1]["elapsed"] if history else 0.0),
        "device": next(model.parameters()).device.type,
        "device_name": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "notes": notes,
    }
    if measure_test:
        test = evaluate_split(model, dataset.test, config.tta)
        meta["metrics"] = {
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "val_accuracy": history[-1]["val_acc"] if history else None,
            "measured_on": {**dataset.describe(), "split": "test", "tta": config.tta},
        }
    return meta


# Up to this many training images a checkpoint lists their indices (the app's quick subsets); a larger split records
# their count and digest, which the split seed and validation size (also recorded) reproduce for a whole split.
LISTED_INDICES = 20_000


def provenance(config: TrainConfig, dataset, model) -> dict:
    """Where a checkpoint came from: architecture and arguments, classes, the data's fingerprint, the split, the
    exact training images (their indices in the source's training part, with a digest; the indices themselves
    when the run trained on a subset), and the recipe."""
    import hashlib

    import numpy as np

    indices = np.ascontiguousarray(dataset.train.source_index, dtype=np.int64)
    return {
        "architecture": model.arch_name,
        "arch_args": json.loads(json.dumps(model.arch_args)),
        "classes": list(dataset.classes),
        "data_fingerprint": dataset.fingerprint,
        "split_seed": dataset.split_seed,
        "val_size": len(dataset.val),
        "train_images": {
            "count": int(len(indices)),
            "digest": hashlib.sha256(indices.tobytes()).hexdigest(),
            "indices": indices.tolist() if len(indices) <= LISTED_INDICES else None,
        },
        "recipe": config.to_dict(),
    }


def save_snapshot(folder: str | Path, model, meta: dict) -> Path:
    """One finished epoch's weights: FOLDER/epoch-NNN.safetensors (atomic, like every checkpoint)."""
    epoch = len(meta["history"])
    return save_checkpoint(Path(folder) / f"epoch-{epoch:03d}.safetensors", model, {**meta, "epoch": epoch})
