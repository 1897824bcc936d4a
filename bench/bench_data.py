"""Loading all 60,000 images: first decode (empty cache) vs. the cached load, in one run.

    python bench/bench_data.py [--data PATH]
"""

import argparse
import os
import tempfile
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    os.environ["CIFARVIZ_CACHE"] = tempfile.mkdtemp(prefix="cifarviz-bench-")  # an empty cache
    from cifarviz.data import load_cifar10

    start = time.perf_counter()
    ds = load_cifar10(args.data, download=False, progress=False)
    first = time.perf_counter() - start
    times = []
    for _ in range(3):
        start = time.perf_counter()
        load_cifar10(args.data, download=False, progress=False)
        times.append(time.perf_counter() - start)
    cached = min(times)
    print(f"data {ds.root} ({ds.layout}), {len(ds.train) + len(ds.val) + len(ds.test):,} images")
    print(f"first decode {first:.2f} s, cached load {cached:.3f} s (best of 3), speed-up {first / cached:.0f}x")


if __name__ == "__main__":
    main()
