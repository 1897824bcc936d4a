"""Influence benchmarks (not tests): index build time, lookup latency and memory, and each method's quality
by the linear datamodeling score (LDS).

    python bench/bench_influence.py                 # speed: head + trak on lenet and fastnet, all 45,000 images
    python bench/bench_influence.py --checkpoints lenet --methods similarity trak-ensemble --ratio
                                                    # the defaults from a cold cache, against one training
    python bench/bench_influence.py --lds           # quality: LDS of every method (lenet, 5,000 images, 50 models)

LDS as TRAK defines it: retrain the model on many random 50% subsets S_j of the training images; for each
test image, the Spearman correlation over j between the method's prediction (the sum of its scores over S_j)
and the retrained model's actual output (the margin: correct logit minus logsumexp of the others), averaged
over test images. One model per subset here (TRAK averages several), so the numbers are a lower estimate.
Results are printed and written to bench/results/influence-{speed,lds}-DATE-COMMIT.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cifarviz.analysis.influence import METHODS, ensemble_scores, index_path, load_or_fit, lookup
from cifarviz.core.augment import AugmentConfig
from cifarviz.core.checkpoint import SHIPPED_DIR, Checkpoint, load_checkpoint
from cifarviz.core.data import Split
from cifarviz.core.inference import predict
from cifarviz.core.train import TrainConfig, train
from cifarviz.store.datasets import load_cifar10

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def speed(dataset, names: list[str], methods: list[str], ratio: bool) -> list[dict]:
    """Each index built from a cold cache (a fresh folder; the shipped results in checkpoints/store/ ignored), and
    with `ratio` as a ratio to one training of the checkpoint's recipe on the same images, timed in this run.
    Similarity, when asked for, is built first: its time includes the training split's features, which the other
    methods then find cached (as on the app, where the first page visit computes them)."""
    from cifarviz.core.recipes import RECIPES
    from cifarviz.store.cache import default_store

    default_store().shipped = None  # a cold build, not the shipped copy
    rows = []
    for name in names:
        checkpoint = load_checkpoint(SHIPPED_DIR / f"{name}.safetensors")
        training_s = None
        if ratio:
            start = time.perf_counter()
            train(dataclasses.replace(RECIPES[name], seed=0), dataset)
            training_s = time.perf_counter() - start
            print(f"{name}: one training of its recipe on {len(dataset.train):,} images took {training_s:.0f} s",
                  flush=True)
        for method in sorted(methods, key=lambda m: m != "similarity"):
            path = index_path(method, checkpoint, dataset)
            path.unlink(missing_ok=True)
            before = rss_mb()
            start = time.perf_counter()
            index = load_or_fit(method, checkpoint, dataset)
            build = time.perf_counter() - start
            latencies = []
            for t in np.random.default_rng(0).choice(len(dataset.test), 100, replace=False):
                start = time.perf_counter()
                lookup(index, checkpoint, dataset, int(t), k=8)  # what a click asks for
                latencies.append(1000 * (time.perf_counter() - start))
            rows.append({"checkpoint": name, "method": method, "build_s": round(build, 1),
                         "build_min": round(build / 60, 2), "training_s": training_s and round(training_s, 1),
                         "build_per_training": training_s and round(build / training_s, 2),
                         "load_average": round(os.getloadavg()[0], 2),
                         "disk_mb": round(path.stat().st_size / 1e6, 1),
                         "lookup_ms_p50": round(float(np.percentile(latencies, 50)), 1),
                         "lookup_ms_p95": round(float(np.percentile(latencies, 95)), 1),
                         "peak_rss_growth_mb": round(rss_mb() - before, 0)})
            print(rows[-1], flush=True)
    return rows


def margins(model, images, labels) -> np.ndarray:
    logits = predict(model, images, features=False).logits.astype(np.float64)
    correct = logits[np.arange(len(labels)), labels]
    others = logits.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    top = others.max(1, keepdims=True)
    return correct - (top[:, 0] + np.log(np.exp(others - top).sum(1)))


def lds(dataset, n_train: int, n_models: int, n_test: int, epochs: int, ensemble: int) -> dict:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(len(dataset.train), n_train, replace=False))
    small = dataclasses.replace(
        dataset, train=Split("train", dataset.train.images[subset], dataset.train.labels[subset],
                             dataset.train.source_index[subset]),
        val=Split("val", dataset.val.images[:0], dataset.val.labels[:0], dataset.val.source_index[:0]))
    config = TrainConfig(model="lenet", epochs=epochs, batch_size=128, lr=0.05, weight_decay=5e-4,
                         augment=AugmentConfig(translate=2, flip=True))
    start = time.perf_counter()
    base = Checkpoint(train(config, small).model, {"name": "lds-base", "train_config": config.to_dict()})
    test_idx = np.sort(rng.choice(len(dataset.test), n_test, replace=False))
    base_test = dataclasses.replace(small, test=Split("test", dataset.test.images[test_idx],
                                                      dataset.test.labels[test_idx], test_idx))
    scores = {m: load_or_fit(m, base, base_test).scores(base, base_test, np.arange(n_test))
              for m, cls in METHODS.items() if not cls.needs_members}
    replicas = []  # the ensemble with more and more models: its LDS should rise with M
    for m in sorted({2, 5, 10, 20, ensemble} & set(range(2, ensemble + 1))):
        while len(replicas) < m - 1:
            replicas.append(train(dataclasses.replace(config, seed=100 + len(replicas)), small).model)
        scores[f"trak-ensemble-{m}"] = ensemble_scores([base.model, *replicas[:m - 1]], base_test,
                                                       np.arange(n_test))[0]
    print(f"base model and indexes: {time.perf_counter() - start:.0f} s", flush=True)

    masks, outputs = [], []
    for j in range(n_models):
        mask = np.zeros(n_train, bool)
        mask[np.random.default_rng(1000 + j).choice(n_train, n_train // 2, replace=False)] = True
        half = dataclasses.replace(small, train=Split("train", small.train.images[mask], small.train.labels[mask],
                                                      small.train.source_index[mask]))
        model = train(dataclasses.replace(config, seed=j + 1), half).model
        masks.append(mask)
        outputs.append(margins(model, base_test.test.images, base_test.test.labels))
        print(f"model {j + 1}/{n_models} ({time.perf_counter() - start:.0f} s)", flush=True)
    masks, outputs = np.array(masks, dtype=np.float64), np.array(outputs)  # (models, n_train), (models, n_test)
    result = {"setting": {"model": "lenet", "train_images": n_train, "models": n_models, "test_images": n_test,
                          "epochs": epochs, "data": str(dataset.root)}, "lds": {}}
    for method, s in scores.items():
        predicted = masks @ s.T  # (models, n_test): the sum of each test image's scores over each subset
        rho = [spearmanr(predicted[:, t], outputs[:, t]).statistic for t in range(n_test)]
        result["lds"][method] = round(float(np.nanmean(rho)), 3)
    result["seconds"] = round(time.perf_counter() - start)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CIFARVIZ_DATA"))
    parser.add_argument("--lds", action="store_true", help="measure LDS instead of speed")
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--ensemble", type=int, default=20, help="most models of trak-ensemble (default 20)")
    parser.add_argument("--checkpoints", nargs="+", default=["lenet", "fastnet"])
    parser.add_argument("--methods", nargs="+", default=["head", "trak"])
    parser.add_argument("--ratio", action="store_true",
                        help="also train each checkpoint's recipe once and give every build as a ratio to it")
    args = parser.parse_args()
    commit = __import__("subprocess").run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=Path(__file__).parent, check=False).stdout.strip()  # at the start
    os.environ.setdefault("CIFARVIZ_CACHE", tempfile.mkdtemp(prefix="cifarviz-bench-influence-"))
    dataset = load_cifar10(args.data, download=False, progress=False)
    if args.lds:
        out = lds(dataset, args.train_images, args.models, args.test_images, args.epochs, args.ensemble)
    else:
        out = {"speed": speed(dataset, args.checkpoints, args.methods, args.ratio), "data": str(dataset.root),
               "cpu_threads": __import__("torch").get_num_threads()}
    out["commit"] = commit
    out["command"] = " ".join(["python", "bench/bench_influence.py", *sys.argv[1:]])
    print(json.dumps(out, indent=2))
    RESULTS.mkdir(exist_ok=True)
    out["load_average_at_end"] = os.getloadavg()[0]
    what = "lds" if args.lds else "speed-" + "-".join(args.methods)  # two runs of one day and commit: two files
    name = f"influence-{what}-{time.strftime('%Y%m%d')}-{commit or 'nocommit'}.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
