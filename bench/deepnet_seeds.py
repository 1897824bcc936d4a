"""Seed study for the plain / residual / skip comparison (not a test): retrain deepnet-conv, -res and -skip with
the shipped recipe (cifarviz.core.recipes.RECIPES) under other seeds and report test accuracy per seed, mean and spread.

    python bench/deepnet_seeds.py --seeds 1 2          # the shipped checkpoints are seed 0

Writes bench/results/deepnet-seeds.json; the numbers shown on the Models page are copied from it into
cifarviz.core.recipes.DEEPNET_SEED_STUDY.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cifarviz.store.datasets import load_cifar10
from cifarviz.core.recipes import RECIPES
from cifarviz.core.train import evaluate_split, train

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", default=["deepnet-conv", "deepnet-res", "deepnet-skip"])
    args = parser.parse_args()
    dataset = load_cifar10(args.data, download=False, progress=False)
    RESULTS.mkdir(exist_ok=True)
    out_file = RESULTS / "deepnet-seeds.json"
    results = json.loads(out_file.read_text()) if out_file.is_file() else {}
    for seed in args.seeds:
        for name in args.models:
            start = time.perf_counter()
            result = train(dataclasses.replace(RECIPES[name], seed=seed), dataset)
            accuracy = evaluate_split(result.model, dataset.test, RECIPES[name].tta)["accuracy"]
            results.setdefault(name, {})[str(seed)] = round(accuracy, 4)
            print(f"{name} seed {seed}: test accuracy {accuracy:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
            out_file.write_text(json.dumps({**results, "data": str(dataset.root)}, indent=2))


if __name__ == "__main__":
    main()
