"""The "train" kind: a TrainConfig trained on the server's data, a checkpoint after every finished epoch.

    run_id = submit_training(TrainConfig(model="lenet", epochs=2), data_root, subset=5000, owner=viewer)

The worker writes model.safetensors (the last finished epoch, replaced atomically) and, when asked, per-epoch
snapshots under epochs/; a stop request ends it within a batch and keeps the last finished epoch.
"""

from __future__ import annotations

import time

from cifarviz.core.settings import settings

from .collector import submit
from .engine import broker_url, workers
from .inputs import data_spec, load_data
from .kind import register
from .records import CHECKPOINT, COMPLETED, RUNNING, STOPPED, RunError
from .worker import RunContext

METRICS_EVERY_SECONDS = 0.5  # step lines in metrics.jsonl at most this often (the page redraws every 2 s)


def submit_training(config, data_root, *, subset: int | None = None, snapshots: bool = False, val_size: int = 5000,
                    split_seed: int = 0, root=None, owner: str = "", kind: str = "train", name: str = "") -> str:
    """Queue the training of a TrainConfig on the data at `data_root` (its first `subset` training images, drawn
    with the config's seed, when given). Every setting is checked now, not in the worker."""
    from cifarviz.core.train import TrainConfig, resolve_device

    config = config if isinstance(config, TrainConfig) else TrainConfig(**config)
    if config.device != "cuda" or not any(w.get("gpu") for w in workers(broker_url(root))):
        resolve_device(config.device)  # "cuda" without a GPU here or on a connected worker: said now
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
        raise RunError(f"subset must be a whole number of training images (1 or more), or None for all, not {subset!r}.")
    spec = {"train_config": config.to_dict(), "subset": subset, "snapshots": bool(snapshots),
            "data": data_spec(data_root, val_size=val_size, split_seed=split_seed)}
    return submit(kind, spec, name=name or config.model, root=root, owner=owner)



def training_subset(dataset, size: int | None, seed: int = 0):
    """The dataset with `size` training images drawn at random (seeded; all when None or larger)."""
    import dataclasses

    import numpy as np

    from cifarviz.core.data import Split

    train = dataset.train
    if size is None or size >= len(train):
        return dataset
    idx = np.sort(np.random.default_rng(seed).choice(len(train), size, replace=False))
    return dataclasses.replace(dataset, train=Split("train", train.images[idx], train.labels[idx], train.source_index[idx]))


def train_threads() -> int:
    """CPU threads for training: $CIFARVIZ_TRAIN_THREADS, else all cores but one, which the viewers keep (on a
    busy small machine threads that wait for each other whenever one is preempted run slower than fewer threads:
    see the README's Benchmarks)."""
    return settings().train_threads


@register("train", priority=5, wants_gpu=True, what="training")
def train_worker(ctx: RunContext) -> tuple[str, str | None]:
    """The "train" kind: train, checkpoint every finished epoch, and keep the last one when asked to stop."""
    import torch

    from cifarviz.core.checkpoint import load_checkpoint, save_checkpoint
    from cifarviz.core.recipes import checkpoint_meta, save_snapshot
    from cifarviz.core.train import TrainConfig, resolve_device, train

    spec, run_id = ctx.spec, ctx.run_id
    config = TrainConfig(**spec["train_config"])
    device = resolve_device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(train_threads())
    dataset = training_subset(load_data(spec["data"]), spec.get("subset"), config.seed)
    steps_per_epoch = -(-len(dataset.train) // config.batch_size)
    ctx.log({"event": "start", "device": device.type, "threads": torch.get_num_threads(),
             "train_images": len(dataset.train), "val_images": len(dataset.val), "steps_per_epoch": steps_per_epoch,
             "total_steps": steps_per_epoch * config.epochs, "epochs": config.epochs})
    path = ctx.dir / CHECKPOINT
    last_logged = [0.0]

    def callback(event: dict) -> None:
        now = time.monotonic()
        epoch_end = event["event"] == "epoch" or event["step"] % event["steps_per_epoch"] == 0
        if epoch_end or now - last_logged[0] >= METRICS_EVERY_SECONDS:
            last_logged[0] = now
            ctx.log(event)

    def on_epoch(model, history) -> None:
        meta = checkpoint_meta(config, dataset, model, history, RUNNING, notes=f"run {run_id} in progress")
        save_checkpoint(path, model, {**meta, "name": run_id})
        if spec.get("snapshots"):
            save_snapshot(ctx.dir / "epochs", model, meta)

    result = train(config, dataset, callback=callback, cancel=ctx.stop_requested, on_epoch=on_epoch, step_every=1,
                   validate_partial=False)
    state = COMPLETED if result.status == "completed" else STOPPED
    if not result.history:
        return state, "Stopped before the first epoch finished: there is no checkpoint to keep."
    # Stopped mid-epoch: the checkpoint of the last finished epoch is the one to keep, not the half-trained weights.
    model = result.model if state == COMPLETED else load_checkpoint(path).model
    ctx.log({"event": "finishing", "state": state})
    meta = checkpoint_meta(config, dataset, model, result.history, state, result.history[-1]["elapsed"],
                           measure_test=True, notes=f"trained in the app as run {run_id}")
    meta["device"] = result.device
    # the area under the margin goes with every finished run (a stopped run's covers the epochs it finished)
    save_checkpoint(path, model, {**meta, "name": run_id}, statistics=result.statistics(dataset))
    test = meta["metrics"]["test_accuracy"]
    ctx.log({"event": "saved", "state": state, "test_accuracy": test})
    epochs = len(result.history)
    return state, (f"{epochs} epoch{'s' * (epochs != 1)}, test accuracy {test:.2%}" +
                   ("" if state == COMPLETED else f" (stopped; epoch {epochs} kept)"))
