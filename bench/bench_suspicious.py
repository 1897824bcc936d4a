"""Which ranking finds mislabelled training images best? Flip 5% of the training labels, train the recipe on them,
and count how many of the flipped images each ranking puts in its top 10%.

    python bench/bench_suspicious.py                    # lenet, a 5,000-image subset, 20 models for the ensembles
    python bench/bench_suspicious.py --subset 45000 --models 1     # the whole split, single-model rankings only

Rankings: the training loss (plain cross-entropy of the given label), the area under the margin the first run
recorded while it trained (Pleiss et al. 2020: the label's margin on its augmented copies, averaged over the second
half of training, as the app; every epoch and the last quarter beside it),
the head's and single-model TRAK's self-influence, and over an ensemble of models of the recipe (seeds 0, 1, ...):
TRAK's self-influence, the mean training loss, and the two combined (mean of their ranks). Writes
bench/results/suspicious-MODEL-SUBSET-seedS-DATE-COMMIT.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_retrain import subset  # noqa: E402

from cifarviz.analysis.influence import ensemble_scores, load_or_fit  # noqa: E402
from cifarviz.core.checkpoint import Checkpoint  # noqa: E402
from cifarviz.core.data import Split  # noqa: E402
from cifarviz.core.inference import predict  # noqa: E402
from cifarviz.core.recipes import RECIPES  # noqa: E402
from cifarviz.core.train import train  # noqa: E402
from cifarviz.store.datasets import load_cifar10  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def ranks(values: np.ndarray) -> np.ndarray:
    """0 for the smallest value, n - 1 for the largest."""
    out = np.empty(len(values))
    out[np.argsort(values, kind="stable")] = np.arange(len(values))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("CIFARVIZ_DATA") or "../shared/data/cifar10-jpeg")
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--subset", type=int, default=5000)
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--models", type=int, default=20, help="models of the ensemble rankings (1: none)")
    parser.add_argument("--seed", type=int, default=0, help="which labels are flipped, and the first run's seed")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent, check=False).stdout.strip()  # what is measured: at the start
    started = time.perf_counter()
    data = subset(load_cifar10(args.data, download=False, progress=False), args.subset, args.seed)
    rng = np.random.default_rng(args.seed)
    labels = data.train.labels.copy()
    flipped = rng.choice(len(labels), int(round(args.flip * len(labels))), replace=False)
    labels[flipped] = (labels[flipped] + rng.integers(1, len(data.classes), len(flipped))) % len(data.classes)
    noisy = dataclasses.replace(data, train=Split("train", data.train.images, labels, data.train.source_index))
    config = RECIPES[args.model]
    trained = [train(dataclasses.replace(config, seed=args.seed + s), noisy) for s in range(args.models)]
    models = [t.model for t in trained]
    checkpoint = Checkpoint(models[0], {"name": "noisy", "train_config": config.to_dict()})

    def losses(model):
        probs = predict(model, noisy.train.images, features=False).probs
        return -np.log(probs[np.arange(len(labels)), labels] + 1e-12)

    rankings = {"training loss": losses(models[0]),
                # what the first run recorded while it trained (the app's "area under the margin"): minus the margin
                "area under the margin (one run)": -trained[0].mean_margins,  # the app's: the second half
                # variants measured beside it: every epoch (Pleiss et al.), the last quarter
                "margin, every epoch (one run)": -trained[0].epoch_margins.mean(0),
                "margin, last quarter of training (one run)":
                    -trained[0].epoch_margins[3 * len(trained[0].epoch_margins) // 4:].mean(0),
                "head self-influence": load_or_fit("head", checkpoint, noisy).self_influence(),
                "TRAK self-influence (one model)": load_or_fit("trak", checkpoint, noisy).self_influence()}
    if args.models > 1:
        _, self_scores, _, _ = ensemble_scores(models, noisy, [0])
        mean_loss = np.mean([losses(m) for m in models], 0)
        rankings[f"TRAK self-influence ({args.models} models)"] = self_scores
        rankings[f"mean training loss ({args.models} models)"] = mean_loss
        rankings[f"mean loss and ensemble self-influence ({args.models} models), mean rank"] = \
            ranks(mean_loss) + ranks(self_scores)
    rankings["area under the margin and training loss, mean rank (one run)"] = \
        ranks(rankings["area under the margin (one run)"]) + ranks(rankings["training loss"])
    rankings["training loss and head self-influence, mean rank"] = \
        ranks(rankings["training loss"]) + ranks(rankings["head self-influence"])
    top = len(labels) // 10
    recall = {name: float(np.isin(flipped, np.argsort(-v, kind="stable")[:top]).mean()) for name, v in rankings.items()}
    report = {"commit": commit, "command": " ".join(["python", "bench/bench_suspicious.py", *sys.argv[1:]]),
              "data": args.data, "model": args.model, "subset": len(labels), "flipped": len(flipped),
              "models": args.models, "load_average": load, "seconds": round(time.perf_counter() - started),
              "recall_in_top_10_percent": recall}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / (f"suspicious-{args.model}-{len(labels)}-seed{args.seed}-{time.strftime('%Y%m%d')}-"
                     f"{commit or 'nocommit'}.json")
    out.write_text(json.dumps(report, indent=2))
    print(f"{len(flipped)} of {len(labels):,} labels flipped ({args.data}); flipped images in each ranking's top 10%:")
    print("| ranking | recall |\n| --- | ---: |")
    for name, r in sorted(recall.items(), key=lambda item: -item[1]):
        print(f"| {name} | {r:.1%} |")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
