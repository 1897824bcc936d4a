"""Temperature scaling of every shipped checkpoint, as Evaluate computes it: T fitted on the validation split by
minimising the plain NLL (no label smoothing), measured on the test split (ECE over 15 bins, NLL), before and after.

    python bench/bench_calibration.py [--data PATH] [--checkpoints fastnet lenet ...]

Prints a table and writes bench/results/calibration-DATE-COMMIT.json (the figures docs/user-guide.md quotes).
"""

import argparse
import json
import os
import subprocess
import sys
import time

from load_test import REPO, RESULTS, default_data

from cifarviz.analysis.calibration import calibrate  # importable: load_test put this checkout on sys.path
from cifarviz.core.checkpoint import load_checkpoint
from cifarviz.core.utils import atomic_write
from cifarviz.store.artifacts import split_artifacts
from cifarviz.store.datasets import load_cifar10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=default_data())
    parser.add_argument("--checkpoints", nargs="+", default=["fastnet", "lenet", "s8net-bn", "cifar10net"])
    args = parser.parse_args()
    data = load_cifar10(args.data, download=False, progress=False)
    rows = []
    for name in args.checkpoints:
        checkpoint = load_checkpoint(REPO / "checkpoints" / f"{name}.safetensors")
        val, test = split_artifacts(checkpoint, data, "val"), split_artifacts(checkpoint, data, "test")
        c = calibrate(val.probs, val.labels, test.probs, test.labels)
        rows.append({"checkpoint": name, "label_smoothing": checkpoint.meta.get("config", {}).get("label_smoothing"),
                     "test_tta": test.tta, "temperature": round(c.temperature, 3), "fitted_on": "val",
                     "fitted_images": c.fitted_images, "measured_on": "test", "ece_before": round(c.ece_before, 4),
                     "ece_after": round(c.ece_after, 4), "nll_before": round(c.nll_before, 4),
                     "nll_after": round(c.nll_after, 4)})
        r = rows[-1]
        print(f"{name:12s} T = {r['temperature']:.2f}  ECE {r['ece_before']:.3f} -> {r['ece_after']:.3f}  "
              f"NLL {r['nll_before']:.3f} -> {r['nll_after']:.3f}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "nocommit"
    out = {"command": "python bench/bench_calibration.py " + " ".join(sys.argv[1:]), "commit": commit,
           "data": args.data, "load_average": os.getloadavg()[0], "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"calibration-{time.strftime('%Y%m%d')}-{commit}.json"
    with atomic_write(path, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
