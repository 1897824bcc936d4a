"""See it for yourself: retrain a checkpoint's recipe without a test image's top-k helpful training images (or its
top-k harmful, or k random ones), and see where that test image's loss lands against the spread over seeds.

    run_id = submit_retrain(checkpoint, dataset, test_index=42, choice="helpful", removed=positions,
                            method="trak-ensemble", predicted_change=0.8, owner=session)
    retrain_result(load_run(run_id))      # None until it has finished
    python -m cifarviz retrain-without -c lenet --test-index 42 --json      # the same, in this process

One training of the recipe, with the checkpoint's seed, on exactly the images the checkpoint was trained on minus
the removed ones: never a subset (a busy machine makes the run wait its turn, and the page says how long). The "with
the images" side needs no training: it is the checkpoint and the other runs of its recipe it ships with (lenet: 19
replicas, seeds 1-19), each measured on the test image. Their spread is what a new seed alone does to that loss, so
the retrained model's loss is judged against it: above every seed is beyond seed noise (a 1-in-(M+1) chance if the
removal did nothing), inside the spread is not.

What is measured is the test image's plain cross-entropy of its true label, whatever loss trained the model
(label smoothing and weight decay belong to training): the same measurement the influence scores predict.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from cifarviz.core.errors import CifarvizError
from cifarviz.core.utils import atomic_write, bounded_json

from .work import collector
from .work import records as runs
from .work.inputs import checkpoint_file, data_spec, load_data
from .work.kind import register
from .work.train import train_threads
from .work.worker import RunContext

KIND = "retrain-without"
CHOICES = ("helpful", "harmful", "random")
CLASS_MINUTES = 10.0  # longer than this on this machine, the page says so and offers the proof on a faster recipe
RESULT = "result.json"
RESULT_VERSION = 2  # 2: one training against the seed band (1 trained twice, sometimes on a subset)


def submit_retrain(checkpoint, dataset, *, test_index: int, choice: str, removed, method: str,
                   predicted_change: float | None, owner: str = "", root=None) -> str:
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
            "checkpoint_name": checkpoint.name,
            "data": data_spec(dataset.root, val_size=len(dataset.val), split_seed=dataset.split_seed,
                              fingerprint=dataset.fingerprint),
            "test_index": int(test_index), "choice": choice, "method": method,
            "removed_sources": dataset.train.source_index[removed].astype(int).tolist(),
            "predicted_change": None if predicted_change is None else float(predicted_change)}
    # a shipped checkpoint is on every worker's machine; a run's or an upload's only on this one
    from cifarviz.core.checkpoint import SHIPPED_DIR

    shipped = Path(checkpoint.path).resolve().parent == SHIPPED_DIR.resolve()
    return collector.submit(KIND, spec, name=f"without-{len(removed)}-{choice}", root=root, owner=owner,
                            here=not shipped)


def retrain_runs(checkpoint_path, test_index: int | None = None, root=None) -> list[runs.Run]:
    """The retraining runs of one checkpoint (and test image), newest first."""
    target = str(Path(checkpoint_path).resolve())
    found = [r for r in runs.list_runs(root) if r.kind == KIND and r.spec.get("checkpoint") == target
             and not r.problems and (test_index is None or r.spec.get("test_index") == test_index)]
    return sorted(found, key=lambda r: r.config.get("submitted_at", 0), reverse=True)


def retrain_result(run: runs.Run) -> dict | None:
    """The finished run's measurements (checked: a file read back is not trusted), or None (not finished, an older
    result format, or damaged)."""
    path = run.dir / RESULT
    if run.state != runs.COMPLETED or not path.is_file():
        return None
    try:
        result = bounded_json(path.read_text())
    except (OSError, ValueError):
        return None
    return result if valid_result(result) else None


def valid_result(result) -> bool:
    """Whether a retraining result has every field the page and the CLI compute with, of the right type."""
    needed = {"version": int, "retrained": dict, "seeds": list, "band": dict, "train_images": int, "removed": int,
              "verdict": str, "beyond": bool, "classes": list}
    if not isinstance(result, dict) or any(not isinstance(result.get(k), t) for k, t in needed.items()):
        return False
    if result["version"] != RESULT_VERSION or not result["seeds"] or not all(isinstance(c, str) for c in result["classes"]):
        return False
    classes = len(result["classes"])
    sides = [result["retrained"], *result["seeds"]]
    for side in sides:  # what the chart computes with: finite losses, a class it can name
        if not isinstance(side, dict) or not runs._is_number(side.get("loss")) or \
                not runs._is_count(side.get("predicted")) or not 0 <= side["predicted"] < classes:
            return False
    band = result["band"]
    if not all(runs._is_number(band.get(k)) for k in ("mean", "sd", "low", "high")) or not runs._is_count(band.get("n")):
        return False
    return result.get("predicted_change") is None or runs._is_number(result["predicted_change"])


def measure(model, dataset, test_index: int) -> dict:
    """The test image's plain cross-entropy of its true label, prediction and probability of the true label."""
    from cifarviz.core.inference import predict

    probs = predict(model, dataset.test.images[[test_index]], features=False).probs[0].astype(float)
    label = int(dataset.test.labels[test_index])
    return {"loss": float(-np.log(max(probs[label], 1e-12))), "predicted": int(probs.argmax()),
            "true_probability": float(probs[label])}


def seed_files(checkpoint) -> list[Path]:
    """The other runs of the checkpoint's recipe with other seeds that it ships with (its card's replicas): with
    the checkpoint, what a new seed alone does to a test image's loss. A run or an upload has none (its per-epoch
    snapshots are one training, not other seeds)."""
    from cifarviz.core.checkpoint import SHIPPED_DIR, ensemble_member_files
    from cifarviz.core.errors import ModelError
    from cifarviz.core.models import model_card

    try:
        card = model_card(checkpoint.model.arch_name)
    except ModelError:
        return []
    shipped = {(SHIPPED_DIR / name).resolve() for name in card.replicas}
    return [Path(p) for p in ensemble_member_files(checkpoint) if Path(p).resolve() in shipped]


def seed_models(checkpoint) -> list[tuple[str, object]]:
    """(name, model) of the checkpoint and its seed_files, loaded."""
    from cifarviz.core.checkpoint import load_checkpoint

    return [(checkpoint.name, checkpoint.model), *((p.stem, load_checkpoint(p).model) for p in seed_files(checkpoint))]


def seed_band(checkpoint, dataset, test_index: int) -> tuple[list[dict], dict]:
    """Each seed model's measurement of the test image, and the band they make (mean, sd, low, high, n)."""
    seeds = [{"name": name, **measure(model, dataset, test_index)} for name, model in seed_models(checkpoint)]
    losses = np.array([s["loss"] for s in seeds])
    return seeds, {"mean": float(losses.mean()), "sd": float(losses.std(ddof=1)) if len(losses) > 1 else 0.0,
                   "low": float(losses.min()), "high": float(losses.max()), "n": len(losses)}


def _loss(value: float) -> str:
    """A loss in words: three significant digits, so 0.00041 is not printed as 0.000."""
    return f"{value:.3g}"


def verdict(loss: float, band: dict, choice: str) -> tuple[str, bool]:
    """In words: where the retrained model's loss lands against the seeds' spread, and whether that is beyond it."""
    n = band["n"]
    if n < 2:
        return (f"Retrained without them, the loss is {_loss(loss)} against the checkpoint's {_loss(band['mean'])}. This "
                "checkpoint has no other seeds of its recipe, so how much a new seed alone moves that loss is "
                "unknown: this one retraining cannot tell a real effect from seed noise."), False
    spread = f"{n} seeds of the recipe ({_loss(band['low'])} to {_loss(band['high'])})"
    chance = f"about a 1-in-{n + 1} chance if the removed images did not matter"
    if loss > band["high"]:
        meaning = {"helpful": "these images really held the prediction up",
                   "harmful": "the method called them harmful, but the model needed them"}.get(choice, "")
        return (f"Retrained without them, the loss rose to {_loss(loss)}: higher than every one of the {spread}. That "
                f"is beyond seed noise ({chance})" + (f": {meaning}." if meaning else ".")), True
    if loss < band["low"]:
        meaning = {"harmful": "these images really pulled the prediction away",
                   "helpful": "the method called them helpful, but the model did better without them"}.get(choice, "")
        return (f"Retrained without them, the loss fell to {_loss(loss)}: lower than every one of the {spread}. That "
                f"is beyond seed noise ({chance})" + (f": {meaning}." if meaning else ".")), True
    return (f"Retrained without them, the loss is {_loss(loss)}: inside the spread of the {n} seeds "
            f"({_loss(band['low'])} to {_loss(band['high'])}), so this retraining cannot tell the removal's effect from what "
            "a new seed alone does."), False


def estimate_seconds(checkpoint, images: int) -> tuple[float | None, str]:
    """How long one training of the checkpoint's recipe on `images` images should take on this machine, and where
    that estimate comes from: this machine's last retraining of the recipe, else the checkpoint's own training time
    when it was trained on this kind of device (scaled to the images), else None."""
    from cifarviz.core.utils import pick_device
    from cifarviz.store import timings

    measured = timings.expected_seconds(timing_key(checkpoint, images))
    if measured is not None:
        return measured, "as long as it took on this machine last time"
    meta = checkpoint.meta if isinstance(checkpoint.meta, dict) else {}
    seconds, device = meta.get("train_seconds"), meta.get("device")
    trained_on = (meta.get("provenance") or {}).get("train_images", {}).get("count") \
        if isinstance(meta.get("provenance"), dict) and isinstance(meta["provenance"].get("train_images"), dict) \
        else None
    if runs._is_number(seconds) and seconds > 0 and device == pick_device("auto").type:
        scale = images / trained_on if runs._is_count(trained_on) and trained_on > 0 else 1.0
        return float(seconds) * scale, "from the checkpoint's own training time on a machine of this kind"
    return None, ""


def timing_key(checkpoint, images: int) -> str:
    """What one training's time depends on: the recipe (as its settings), the network's size, the images, the
    device."""
    import hashlib

    from cifarviz.core.utils import pick_device

    recipe = checkpoint.meta.get("train_config") if isinstance(checkpoint.meta, dict) else None
    recipe = {k: v for k, v in (recipe or {}).items() if k not in ("seed", "device")}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]
    parameters = sum(p.numel() for p in checkpoint.model.parameters())
    return f"train/{checkpoint.model.arch_name}/{parameters}/{digest}/{images}/{pick_device('auto').type}"


def _without(dataset, keep: np.ndarray):
    from cifarviz.core.data import Split

    t = dataset.train
    return dataclasses.replace(dataset, train=Split("train", t.images[keep], t.labels[keep], t.source_index[keep]))


def retrain_without(checkpoint, dataset, *, test_index: int, removed_sources, choice: str, method: str,
                    predicted_change: float | None = None, config=None, callback=None, cancel=None) -> dict | None:
    """The proof itself (the run's worker and the CLI call it): one training of the checkpoint's recipe and seed on
    the images it was trained on minus `removed_sources` (indices in the dataset's own training order), measured on
    the test image against the seed band. None when cancelled."""
    from cifarviz.analysis.influence import trained_positions
    from cifarviz.core.train import TrainConfig, train
    from cifarviz.store import timings

    config = config or TrainConfig(**checkpoint.meta["train_config"])
    positions, _ = trained_positions(checkpoint, dataset)  # what the checkpoint was trained on: all of it
    removed = np.isin(dataset.train.source_index[positions], np.asarray(removed_sources, dtype=np.int64))
    kept = positions[~removed]
    seeds, band = seed_band(checkpoint, dataset, test_index)
    result = train(config, _without(dataset, kept), callback=callback, cancel=cancel, step_every=5,
                   validate_partial=False)
    if result.status != "completed":
        return None
    timings.record(timing_key(checkpoint, len(kept)), result.seconds)
    retrained = measure(result.model, dataset, test_index)
    words, beyond = verdict(retrained["loss"], band, choice)
    own = seeds[0]  # the checkpoint itself
    return {"version": RESULT_VERSION, "retrained": retrained, "seeds": seeds, "band": band, "verdict": words,
            "beyond": beyond, "change": retrained["loss"] - own["loss"], "change_vs_seeds": retrained["loss"] - band["mean"],
            "train_images": len(kept), "trained_on": len(positions), "removed": int(removed.sum()),
            "seconds": result.seconds, "device": result.device, "predicted_change": predicted_change,
            "choice": choice, "method": method, "test_index": int(test_index), "classes": list(dataset.classes),
            "checkpoint": checkpoint.name, "data": dataset.describe(), "seed": config.seed,
            "measurement": "plain cross-entropy of the test image's true label, -log p(y|x), no test-time augmentation"}


@register(KIND, priority=8, wants_gpu=True, what="retraining proof")
def retrain_worker(ctx: RunContext) -> tuple[str, str | None]:
    import torch

    from cifarviz.core.checkpoint import load_checkpoint
    from cifarviz.core.train import TrainConfig, resolve_device

    spec = ctx.spec
    config = TrainConfig(**spec["train_config"])
    if resolve_device(config.device).type == "cpu":
        torch.set_num_threads(train_threads())
    dataset = load_data(spec["data"])
    checkpoint = load_checkpoint(checkpoint_file(spec["checkpoint"], spec.get("checkpoint_name", "")))
    test_index = int(spec["test_index"])
    from cifarviz.analysis.influence import trained_positions

    positions, _ = trained_positions(checkpoint, dataset)
    images = len(positions) - int(np.isin(dataset.train.source_index[positions], spec["removed_sources"]).sum())
    estimate, _ = estimate_seconds(checkpoint, images)
    steps = config.epochs * -(-images // config.batch_size)
    ctx.log({"event": "start", "device": resolve_device(config.device).type, "train_images": images,
             "val_images": 0, "total_steps": steps, "epochs": config.epochs, "subset": False,
             "estimate_seconds": estimate})

    def callback(event: dict) -> None:
        if event["event"] == "step":
            ctx.log({**event, "phase": "training without the removed images"})

    report = retrain_without(checkpoint, dataset, test_index=test_index, removed_sources=spec["removed_sources"],
                             choice=spec["choice"], method=spec["method"], predicted_change=spec.get("predicted_change"),
                             config=config, callback=callback, cancel=ctx.stop_requested)
    if report is None:
        return runs.STOPPED, "Stopped before the training finished: nothing was measured."
    with atomic_write(ctx.dir / RESULT, "w") as handle:
        handle.write(json.dumps(report, indent=2))
    ctx.log({"event": "saved", "state": runs.COMPLETED})
    return runs.COMPLETED, (f"test image #{test_index}: plain loss {_loss(report['retrained']['loss'])} without "
                            f"{report['removed']} {spec['choice']} images (seeds {_loss(report['band']['low'])} to "
                            f"{_loss(report['band']['high'])})")
