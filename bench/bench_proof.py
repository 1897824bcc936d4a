"""The app's own proof at scale: "Retrain without these images" (services/retrain.py) for many test images, on the
whole training split, with the app's own lists, judged against the seed band of the shipped checkpoint and its
replicas.

    python bench/bench_proof.py                        # lenet, 16 correctly classified test images, k = 100,
                                                       # the default (the 20-model ensemble) and similarity
    python bench/bench_proof.py --methods similarity random --tests 4

For each test image and method: one training of the recipe (the checkpoint's seed) on every training image minus
the method's top k helpful ones (k random ones for "random"), and that image's plain loss against its loss under
each of the M seed models. Reports per method the mean of (retrained loss - the seeds' mean loss), the seed noise of
that mean (sqrt(sum of the per-image seed variances) / N: what a new seed alone would give), and for how many images
the retrained loss is above every seed. Writes bench/results/proof-MODEL-kK-DATE-COMMIT.json after every image.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cifarviz.analysis.influence import default_method, load_or_fit, lookup, trained_positions  # noqa: E402
from cifarviz.core.checkpoint import load_checkpoint, shipped_file  # noqa: E402
from cifarviz.services import retrain  # noqa: E402
from cifarviz.store.artifacts import split_artifacts  # noqa: E402
from cifarviz.store.datasets import load_cifar10  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("CIFARVIZ_DATA") or "../shared/data/cifar10-jpeg")
    parser.add_argument("--model", default="lenet", help="a shipped checkpoint (default lenet, which ships replicas)")
    parser.add_argument("--tests", type=int, default=16)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=["similarity", "default"],
                        help="influence methods (default: the checkpoint's default), or random")
    parser.add_argument("--seed", type=int, default=0, help="which test images")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent, check=False).stdout.strip()
    dataset = load_cifar10(args.data, download=False, progress=False)
    checkpoint = load_checkpoint(shipped_file(args.model))
    methods = [default_method(checkpoint) if m == "default" else m for m in args.methods]
    test = split_artifacts(checkpoint, dataset, "test")
    correct = np.flatnonzero(test.predicted == test.labels)
    tests = np.sort(np.random.default_rng(args.seed).choice(correct, args.tests, replace=False))
    positions, _ = trained_positions(checkpoint, dataset)
    report = {"commit": commit, "command": " ".join(["python", "bench/bench_proof.py", *sys.argv[1:]]),
              "data": args.data, "model": args.model, "k": args.k, "test_images": tests.tolist(),
              "load_average": load, "index_seconds": {}, "runs": {m: [] for m in methods}}
    out = RESULTS / f"proof-{args.model}-k{args.k}-{time.strftime('%Y%m%d')}-{commit or 'nocommit'}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    print(f"{args.model}: {len(tests)} test images, k = {args.k}, methods {methods} (load average {load:.1f})",
          flush=True)
    for method in methods:  # one method at a time: its results are written before the next index is built
        index = None
        if method != "random":
            started = time.perf_counter()
            index = load_or_fit(method, checkpoint, dataset, progress=True)
            report["index_seconds"][method] = time.perf_counter() - started
        for t in tests:
            if index is None:
                removed = positions[np.random.default_rng(int(t)).choice(len(positions), args.k, replace=False)]
            else:
                removed = np.array([e.train_index for e in lookup(index, checkpoint, dataset, int(t),
                                                                  k=args.k).helpful])
            result = retrain.retrain_without(checkpoint, dataset, test_index=int(t),
                                             removed_sources=dataset.train.source_index[removed], choice="helpful",
                                             method=method)
            band = result["band"]
            row = {"test_index": int(t), "retrained": result["retrained"]["loss"], "seed_mean": band["mean"],
                   "seed_sd": band["sd"], "seed_low": band["low"], "seed_high": band["high"], "seeds": band["n"],
                   "above_every_seed": result["retrained"]["loss"] > band["high"],
                   "train_images": result["train_images"], "seconds": result["seconds"]}
            report["runs"][method].append(row)
            print(f"  #{t} {method:14} {row['retrained']:.4g} against seeds {band['low']:.4g}-{band['high']:.4g} "
                  f"(mean {band['mean']:.4g}){' ABOVE' if row['above_every_seed'] else ''}", flush=True)
            report["summary"] = summary(report["runs"])
            out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")
    print("\n| method | mean (retrained - seeds' mean) | seed noise of that mean | above every seed |\n"
          "| --- | ---: | ---: | ---: |")
    for method, s in report["summary"].items():
        print(f"| {method} | {s['mean_change']:+.4f} | {s['seed_noise']:.4f} | {s['above']} of {s['images']} |")
    return 0


def summary(runs: dict) -> dict:
    out = {}
    for method, rows in runs.items():
        if not rows:
            continue
        change = np.array([r["retrained"] - r["seed_mean"] for r in rows])
        noise = float(np.sqrt(np.sum([r["seed_sd"] ** 2 for r in rows])) / len(rows))
        out[method] = {"images": len(rows), "mean_change": float(change.mean()), "seed_noise": noise,
                       "above": int(sum(r["above_every_seed"] for r in rows))}
    return out


if __name__ == "__main__":
    sys.exit(main())
