"""Retraining benchmark: does removing a method's most helpful training images really raise the test image's loss?

For a few correctly classified test images (chosen by seed), the whole network is retrained from scratch, same
recipe and seed, without each method's top-k "helpful" training images (and, for scale, without k random ones), and
the test image's *plain* cross-entropy is measured before and after. A faithful method raises it; so does, often,
plain feature similarity, the baseline every method must at least match.

    python bench/bench_retrain.py                      # lenet, a 5,000-image subset, 8 test images, k = 250
    python bench/bench_retrain.py --shipped --k 100 --methods trak-ensemble similarity random   # the app's own
        # lenet and its replicas on all 45,000 images: each retraining takes minutes on 2 CPU cores

    python bench/bench_retrain.py --seed 1 --tests 16 --methods similarity trak-ensemble   # more test images,
        # another subset and other replicas: pooled with seed 0's on the card (the two are close; 8 images do not
        # tell them apart)
    python bench/bench_retrain.py --methods trak-snapshots   # a student's run: the ensemble of its own per-epoch
        # snapshots (what the app averages for a run saved with snapshots)

    python bench/bench_retrain.py --model fastnet --subset 5000 --tests 8 --k 250 --methods similarity head trak random
        # fastnet's protocol: its recipe on a 5,000-image subset; 842 s a training on one core of a busy 2-core
        # machine (a GPU: seconds), so hours for every method on a CPU

Prints a table and writes bench/results/retrain-MODEL-SUBSET-kK-DATE-COMMIT.json after every method.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cifarviz.analysis.influence import ensemble_members, ensemble_scores, load_or_fit, lookup  # noqa: E402
from cifarviz.core.checkpoint import Checkpoint, load_checkpoint, shipped_file, snapshot_picks  # noqa: E402
from cifarviz.core.data import Split  # noqa: E402
from cifarviz.core.inference import predict  # noqa: E402
from cifarviz.core.recipes import RECIPES  # noqa: E402
from cifarviz.core.train import train  # noqa: E402
from cifarviz.store.datasets import load_cifar10  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def subset(dataset, size: int, seed: int):
    train_split = dataset.train
    idx = np.sort(np.random.default_rng(seed).choice(len(train_split), min(size, len(train_split)), replace=False))
    val = dataset.val
    keep_val = np.arange(min(500, len(val)))  # validation is only reported during training
    return dataclasses.replace(
        dataset, train=Split("train", train_split.images[idx], train_split.labels[idx], train_split.source_index[idx]),
        val=Split("val", val.images[keep_val], val.labels[keep_val], val.source_index[keep_val]))


def without(dataset, rows: np.ndarray):
    keep = np.setdiff1d(np.arange(len(dataset.train)), rows)
    t = dataset.train
    return dataclasses.replace(dataset, train=Split("train", t.images[keep], t.labels[keep], t.source_index[keep]))


def test_losses(model, dataset, test_idx: np.ndarray) -> np.ndarray:
    """Plain cross-entropy of the true label: the measurement every method is judged by."""
    probs = predict(model, dataset.test.images[test_idx], features=False).probs
    return -np.log(probs[np.arange(len(test_idx)), dataset.test.labels[test_idx]] + 1e-12)


def ekfac_scores(model, config, data, test_idx: np.ndarray) -> np.ndarray:
    """EK-FAC influence over every conv and linear layer, by Kronfluence (pip install kronfluence: a benchmark-only
    dependency). Its Task as ours: the training loss the recipe used (label smoothing), the plain cross-entropy of the
    true label as the measurement. Kronfluence's sign is ours: positive = upweighting the image lowers the test loss
    (it helps)."""
    import copy
    import tempfile

    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    from cifarviz.core.augment import to_float

    smoothing = config.label_smoothing

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            images, labels = batch
            logits = model(images)
            if not sample:
                return F.cross_entropy(logits, labels, reduction="sum", label_smoothing=smoothing)
            with torch.no_grad():
                sampled = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, sampled, reduction="sum")

        def compute_measurement(self, batch, model):
            images, labels = batch
            return F.cross_entropy(model(images), labels, reduction="sum")

    def tensors(images, labels):
        return torch.utils.data.TensorDataset(to_float(torch.from_numpy(np.ascontiguousarray(images))),
                                              torch.from_numpy(np.asarray(labels, dtype=np.int64)))

    task = Classification()
    prepared = prepare_model(copy.deepcopy(model).float().eval().cpu(), task)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer(analysis_name="bench", model=prepared, task=task, cpu=True, output_dir=out,
                            disable_tqdm=True)
        train_set = tensors(data.train.images, data.train.labels)
        analyzer.fit_all_factors(factors_name="ekfac", dataset=train_set, per_device_batch_size=256,
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        analyzer.compute_pairwise_scores(scores_name="scores", factors_name="ekfac",
                                         query_dataset=tensors(data.test.images[test_idx], data.test.labels[test_idx]),
                                         train_dataset=train_set, per_device_query_batch_size=len(test_idx),
                                         per_device_train_batch_size=256, overwrite_output_dir=True)
        return analyzer.load_pairwise_scores("scores")["all_modules"].numpy()


def write_report(args, commit, data, members, test_idx, before, load, retrain_seconds, results) -> Path:
    """bench/results/retrain-MODEL-SUBSET-kK-DATE-COMMIT.json (the same protocol measured earlier on the same day
    and commit keeps its other methods)."""
    report = {"commit": commit, "command": " ".join(["python", "bench/bench_retrain.py", *sys.argv[1:]]),
              "data": args.data, "model": args.model, "subset": len(data.train), "k": args.k,
              "ensemble_models": len(members) if members else args.models, "shipped": args.shipped,
              "seed": args.seed, "test_images": test_idx.tolist(), "loss_before": before.tolist(),
              "load_average": load, "seconds_per_training_run": retrain_seconds, "methods": dict(results)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / (f"retrain-{args.model}-{len(data.train)}-k{args.k}-{time.strftime('%Y%m%d')}-"
                     f"{commit or 'nocommit'}.json")
    if out.is_file():  # the same protocol measured before: keep its other methods (each says its commit)
        earlier = json.loads(out.read_text())
        if earlier.get("test_images") == report["test_images"] and earlier.get("seed") == args.seed:
            report["methods"] = {**earlier.get("methods", {}), **results}
    out.write_text(json.dumps(report, indent=2))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("CIFARVIZ_DATA") or "../shared/data/cifar10-jpeg")
    parser.add_argument("--model", default="lenet", help="a zoo model with a shipped recipe (default lenet)")
    parser.add_argument("--subset", type=int, default=5000, help="training images (default 5000)")
    parser.add_argument("--tests", type=int, default=8, help="test images (default 8)")
    parser.add_argument("--k", type=int, default=250, help="images removed per test image (default 250: 5%%)")
    parser.add_argument("--methods", nargs="+", default=["trak-ensemble", "head", "similarity", "trak", "random"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shipped", action="store_true",
                        help="the full protocol on the app's own scores: the shipped checkpoint (and its shipped "
                             "replicas) on the whole training split; before = the recipe retrained here")
    parser.add_argument("--models", type=int, default=20,
                        help="models of trak-ensemble: the checkpoint and this many minus one replicas (default 20)")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent, check=False).stdout.strip()  # what is measured: at the start
    config = RECIPES[args.model]
    config = dataclasses.replace(config, seed=args.seed)
    everything = load_cifar10(args.data, download=False, progress=False)
    data = everything if args.shipped else subset(everything, args.subset, args.seed)
    started = time.perf_counter()
    epochs = []  # every epoch's weights, as a student's run saves them ("trak-snapshots")
    # with --shipped: the "before" model, the recipe retrained on this machine
    base = train(config, data, on_epoch=lambda model, history: epochs.append(copy.deepcopy(model).cpu())).model
    retrain_seconds = time.perf_counter() - started
    if args.shipped:  # the scores the app shows: the shipped checkpoint and its shipped replicas
        checkpoint = load_checkpoint(shipped_file(args.model))
        members = [checkpoint.model, *(m.model for m in ensemble_members(checkpoint))]
    else:
        checkpoint = Checkpoint(base, {"name": f"{args.model}-subset{args.subset}", "train_config": config.to_dict()})
        members = None
    probs = predict(checkpoint.model, data.test.images, features=False).probs
    correct = np.flatnonzero(probs.argmax(1) == data.test.labels)
    test_idx = np.sort(np.random.default_rng(args.seed + 1).choice(correct, args.tests, replace=False))
    before = test_losses(base, data, test_idx)
    print(f"{args.model} on {len(data.train):,} images of {args.data}: a training run takes {retrain_seconds:.0f} s "
          f"(load average {load:.1f} at the start); {args.tests} test images, k = {args.k}"
          + (f"; scores from the shipped checkpoint and {len(members) - 1} replicas" if args.shipped else ""),
          flush=True)

    results = {}
    for method in args.methods:
        # "head-relative": the head's scores divided by each training image's own influence norm (RelatIF,
        # Barshan et al. 2020), which down-weights the high-loss images that dominate plain influence. An experiment
        # measured here, not a method of the app.
        # "trak-ensemble": the app's method (ensemble.py) over the checkpoint and --models - 1 more runs of its
        # recipe (seeds 1, 2, ...), as the app's lenet ships replicas.
        # "trak-snapshots": the app's method over the base run and the per-epoch snapshots a student's run would
        # average (checkpoint.snapshot_picks): what the page's figure for a run rests on.
        index = None if method in ("random", "trak-ensemble", "trak-snapshots", "ekfac") else load_or_fit(
            method.replace("-relative", ""), checkpoint, data)
        ensemble = ekfac_scores(checkpoint.model, config, data, test_idx) if method == "ekfac" else None
        if method == "trak-ensemble":
            models = members or [base] + [train(dataclasses.replace(config, seed=args.seed + s), data).model
                                          for s in range(1, args.models)]
            ensemble = ensemble_scores(models, data, test_idx)[0]
        if method == "trak-snapshots":  # the app's ensemble of a run: its weights and the snapshots it picks
            ensemble = ensemble_scores([base, *(epochs[i] for i in snapshot_picks(len(epochs)))], data, test_idx)[0]
        changes = []
        for j, t in enumerate(test_idx):
            if method == "random":
                rows = np.random.default_rng(1000 + j).choice(len(data.train), args.k, replace=False)
            elif method in ("trak-ensemble", "trak-snapshots", "ekfac"):
                rows = np.argsort(-ensemble[j], kind="stable")[: args.k]
            elif method == "head-relative":
                norms = np.sqrt(np.maximum(index.self_influence(), 1e-12))
                scores = index.scores(checkpoint, data, [int(t)])[0] / norms
                rows = np.argsort(-scores, kind="stable")[: args.k]
            else:
                result = lookup(index, checkpoint, data, int(t), k=args.k)
                rows = np.array([e.train_index for e in result.helpful])
            model = train(config, without(data, rows)).model
            changes.append(float(test_losses(model, data, np.array([t]))[0] - before[j]))
            print(f"  {method:10} test #{t}: loss {before[j]:.3f} -> {before[j] + changes[-1]:.3f}", flush=True)
        changes = np.array(changes)
        if method == "trak-ensemble" and len(models) != 20:  # a smaller ensemble is its own row
            method = f"trak-ensemble-{len(models)}"
        results[method] = {"mean_change": float(changes.mean()), "rose": int((changes > 0).sum()),
                           "changes": changes.tolist(), "commit": commit}
        print(f"{method:10} mean change of the plain test loss {changes.mean():+.3f}, rose for {(changes > 0).sum()} "
              f"of {len(changes)}", flush=True)
        out = write_report(args, commit, data, members, test_idx, before, load, retrain_seconds, results)
        print(f"written to {out}", flush=True)  # after every method: a long run stopped midway keeps what it measured

    print("\n| method | mean change of the plain test loss | rose |\n| --- | ---: | ---: |")
    for method, r in results.items():
        print(f"| {method} | {r['mean_change']:+.3f} | {r['rose']} of {len(r['changes'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
