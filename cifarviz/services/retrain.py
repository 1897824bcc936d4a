"""See it for yourself: retrain a checkpoint's recipe without a test image's top-k helpful training images (or its
top-k harmful, or k random ones), and measure what really happens to that test image.

    run_id = submit_retrain(checkpoint, dataset, test_index=42, choice="helpful", removed=positions,
                            method="trak-ensemble", predicted_change=0.8, owner=session)
    retrain_result(load_run(run_id))      # None until it has finished

A run of the runs queue (runs.py: a worker process, bounded by CIFARVIZ_MAX_RUNS, owned by the session that
started it). The worker trains the recipe twice with the checkpoint's seed, on the same machine: once on the
images the checkpoint was trained on, once without the removed ones, so the difference between the two test
losses is the removal's and not a new seed's or another machine's. When both runs would take longer than
`BUDGET_SECONDS`, it trains on a random subset of the training images (the removed images always in the first
run) small enough to fit, and says so in its result.

What is measured is the test image's plain cross-entropy of its true label, whatever loss trained the model
(label smoothing and weight decay belong to training): the same measurement the influence scores predict.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from cifarviz.core.errors import CifarvizError
from cifarviz.core.utils import atomic_write

from . import runs

KIND = "retrain-without"
TARGET = "cifarviz.services.retrain:retrain_worker"
CHOICES = ("helpful", "harmful", "random")
BUDGET_SECONDS = 300.0  # both trainings together: a class discussion, not a lunch break
MIN_SUBSET = 2000  # below this a retrained model is too weak for its test loss to mean much
RESULT = "result.json"


def submit_retrain(checkpoint, dataset, *, test_index: int, choice: str, removed, method: str,
                   predicted_change: float | None, owner: str = "", root=None, start: bool = True) -> str:
    """Queue the retraining of `checkpoint`'s recipe without the training images at `removed` (positions in
    dataset.train, e.g. an influence result's train_index values). Everything is checked now, not in the worker."""
    from cifarviz.core.train import TrainConfig

    if choice not in CHOICES:
        raise runs.RunError(f"choice must be one of {', '.join(CHOICES)}, not {choice!r}.")
    if checkpoint.path is None or not Path(checkpoint.path).is_file():
        raise runs.RunError(f"{checkpoint.name} has no file the training process could read: save it first.")
    recipe = checkpoint.meta.get("train_config") if isinstance(checkpoint.meta, dict) else None
    if not isinstance(recipe, dict):
        raise runs.RunError(f"{checkpoint.name} records no training recipe (train_config), so it cannot be retrained: "
                            "pick a shipped checkpoint or a run.")
    try:
        config = TrainConfig(**recipe)
    except (TypeError, ValueError, CifarvizError) as exc:
        raise runs.RunError(f"{checkpoint.name}'s recorded recipe cannot be trained again: {exc}") from None
    if not 0 <= int(test_index) < len(dataset.test):
        raise runs.RunError(f"Test index {test_index} is out of range (0-{len(dataset.test) - 1}).")
    removed = np.unique(np.asarray(removed, dtype=np.int64))
    if len(removed) == 0 or removed.min() < 0 or removed.max() >= len(dataset.train):
        raise runs.RunError("Give the training images to remove as positions in the training split (at least one).")
    config = dataclasses.replace(config, device="auto")
    spec = {"train_config": config.to_dict(), "checkpoint": str(Path(checkpoint.path).resolve()),
            "data": {"root": str(Path(dataset.root).resolve()), "val_size": len(dataset.val),
                     "split_seed": dataset.split_seed},
            "test_index": int(test_index), "choice": choice, "method": method,
            "removed_sources": dataset.train.source_index[removed].astype(int).tolist(),
            "predicted_change": None if predicted_change is None else float(predicted_change),
            "budget_seconds": BUDGET_SECONDS}
    return runs.submit(KIND, spec, name=f"without-{len(removed)}-{choice}", target=TARGET, root=root, owner=owner,
                       start=start)


def retrain_runs(checkpoint_path, test_index: int | None = None, root=None) -> list[runs.Run]:
    """The retraining runs of one checkpoint (and test image), newest first."""
    target = str(Path(checkpoint_path).resolve())
    found = [r for r in runs.list_runs(root) if r.kind == KIND and r.spec.get("checkpoint") == target
             and not r.problems and (test_index is None or r.spec.get("test_index") == test_index)]
    return sorted(found, key=lambda r: r.config.get("submitted_at", 0), reverse=True)


def retrain_result(run: runs.Run) -> dict | None:
    """The finished run's measurements (checked), or None."""
    path = run.dir / RESULT
    if run.state != runs.COMPLETED or not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    needed = {"before": dict, "after": dict, "train_images": int, "removed": int, "subset": bool}
    if not isinstance(result, dict) or any(not isinstance(result.get(k), t) for k, t in needed.items()):
        return None
    classes = len(result.get("classes") or ()) or 10
    for side in ("before", "after"):  # what the table computes with: finite losses, a class it can name
        loss, predicted = result[side].get("loss"), result[side].get("predicted")
        if not runs._is_number(loss) or not runs._is_count(predicted) or not 0 <= predicted < classes:
            return None
    if not runs._is_number(result.get("change")) or not (result.get("predicted_change") is None
                                                           or runs._is_number(result["predicted_change"])):
        return None
    return result


def _measure(model, dataset, test_index: int) -> dict:
    """The test image's plain cross-entropy of its true label, prediction and probabilities."""
    from cifarviz.core.inference import predict

    probs = predict(model, dataset.test.images[[test_index]], features=False).probs[0].astype(float)
    label = int(dataset.test.labels[test_index])
    return {"loss": float(-np.log(max(probs[label], 1e-12))), "predicted": int(probs.argmax()),
            "true_probability": float(probs[label])}


def _seconds_per_image(config, dataset, steps: int = 12) -> float:
    """Timed on a few real training steps of the recipe here (the checkpoint may have been trained elsewhere)."""
    from cifarviz.core.train import train

    done = [0]

    def count(event: dict) -> None:
        if event["event"] == "step":
            done[0] = event["step"]

    started = time.perf_counter()
    train(dataclasses.replace(config, epochs=1), dataset, callback=count, cancel=lambda: done[0] >= steps,
          step_every=1, validate_partial=False)
    return (time.perf_counter() - started) / max(done[0] * config.batch_size, 1)


def _without(dataset, keep: np.ndarray):
    from cifarviz.core.data import Split

    t = dataset.train
    return dataclasses.replace(dataset, train=Split("train", t.images[keep], t.labels[keep], t.source_index[keep]))


def retrain_worker(ctx: runs.RunContext) -> tuple[str, str | None]:
    import torch

    from cifarviz.analysis.influence import trained_positions
    from cifarviz.core.checkpoint import load_checkpoint
    from cifarviz.core.train import TrainConfig, resolve_device, train
    from cifarviz.store.datasets import load_cifar10

    spec = ctx.spec
    config = TrainConfig(**spec["train_config"])
    if resolve_device(config.device).type == "cpu":
        torch.set_num_threads(runs.train_threads())
    data = spec["data"]
    dataset = load_cifar10(data["root"], download=False, progress=False, val_size=data["val_size"],
                           split_seed=data["split_seed"])
    checkpoint = load_checkpoint(spec["checkpoint"])
    test_index = int(spec["test_index"])
    positions, _ = trained_positions(checkpoint, dataset)  # what the checkpoint was trained on
    removed = np.isin(dataset.train.source_index[positions], np.asarray(spec["removed_sources"], dtype=np.int64))
    with_all, kept = positions, positions[~removed]
    per_image = _seconds_per_image(config, _without(dataset, with_all))
    needed = 2 * config.epochs * len(with_all) * per_image
    subset = needed > float(spec["budget_seconds"])
    if subset:  # the removed images, and as many others as fit the budget
        size = max(MIN_SUBSET, int(float(spec["budget_seconds"]) / (2 * config.epochs * per_image)))
        others = np.random.default_rng(config.seed).permutation(kept)[: max(size - int(removed.sum()), 0)]
        with_all = np.sort(np.concatenate([positions[removed], others]))
        kept = np.sort(others)
    phases = [("with every image", with_all), ("without the removed images", kept)]
    steps = [config.epochs * -(-len(p) // config.batch_size) for _, p in phases]
    ctx.log({"event": "start", "device": resolve_device(config.device).type, "train_images": len(with_all),
             "val_images": len(dataset.val), "total_steps": sum(steps), "epochs": config.epochs, "subset": subset,
             "estimate_seconds": needed if not subset else float(spec["budget_seconds"])})
    measured, done_steps, elapsed = {}, 0, 0.0
    for (phase, rows), phase_steps in zip(phases, steps):
        def callback(event: dict, offset=done_steps, before=elapsed, phase=phase) -> None:
            if event["event"] == "step":
                ctx.log({**event, "step": offset + event["step"], "total_steps": sum(steps),
                         "elapsed": before + event["elapsed"], "phase": phase})

        result = train(config, _without(dataset, rows), callback=callback, cancel=ctx.stop_requested,
                       step_every=5, validate_partial=False)
        if result.status != "completed":
            return runs.STOPPED, "Stopped before both trainings finished: nothing was measured."
        measured[phase] = _measure(result.model, dataset, test_index)
        done_steps, elapsed = done_steps + phase_steps, elapsed + result.seconds
    before, after = measured["with every image"], measured["without the removed images"]
    report = {"before": before, "after": after, "change": after["loss"] - before["loss"],
              "checkpoint": _measure(checkpoint.model, dataset, test_index), "train_images": len(with_all),
              "removed": int(removed.sum()), "subset": bool(subset), "seconds": elapsed,
              "predicted_change": spec.get("predicted_change"), "choice": spec["choice"], "method": spec["method"],
              "test_index": test_index, "classes": list(dataset.classes)}
    with atomic_write(ctx.dir / RESULT, "w") as handle:
        handle.write(json.dumps(report, indent=2))
    ctx.log({"event": "saved", "state": runs.COMPLETED})
    return runs.COMPLETED, (f"test image #{test_index}: plain loss {before['loss']:.3f} -> {after['loss']:.3f} without "
                            f"{report['removed']} {spec['choice']} images")
