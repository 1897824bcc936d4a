"""Loading all 60,000 images: first decode (empty cache) vs. the cached load, in one run.

    python bench/bench_data.py [--data PATH] [--compare [--repeat N]]

--compare also times the decoding strategies on the same files (wall and CPU seconds, children included):
one thread, a 2-thread pool (the in-process fallback), cifarviz's worker processes (the default), and
concurrent.futures.ProcessPoolExecutor (spawn) over one chunk of paths per worker, runs interleaved.
"""

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/bench_data.py` from a checkout


def _cpu_seconds() -> float:
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def _process_pool(paths, workers):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np

    from cifarviz.core import data

    chunks = [list(c) for c in np.array_split(np.array(paths, dtype=object), workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return np.concatenate(list(pool.map(data._decode_image_list, chunks)))


def compare(root: Path, repeat: int) -> None:
    from cifarviz.core import data

    entries = data._scan_image_folder(root)
    paths = [str(root / rel) for split in ("train", "test") for rel, *_ in entries[split]]
    workers = data._cpu_count()
    strategies = {
        "one thread": lambda: data._decode_image_list(paths),
        "2-thread pool (fallback)": lambda: data._decode_images(paths, workers=0),
        f"worker processes x{workers} (default)": lambda: data._decode_images(paths),
        f"ProcessPoolExecutor spawn x{workers}": lambda: _process_pool(paths, workers),
    }
    times = {name: [] for name in strategies}
    reference = None
    for _ in range(repeat):
        for name, run in strategies.items():
            wall, cpu = time.perf_counter(), _cpu_seconds()
            images = run()
            times[name].append((time.perf_counter() - wall, _cpu_seconds() - cpu))
            reference = images if reference is None else reference
            assert (images == reference).all(), f"{name} decoded different pixels"
    print(f"{len(paths):,} files, {workers} usable cores, {repeat} interleaved runs each")
    for name, runs in times.items():
        walls = [w for w, _ in runs]
        cpu = statistics.median(c for _, c in runs)
        print(f"  {name:38s} wall min {min(walls):6.2f} s  median {statistics.median(walls):6.2f} s  cpu {cpu:6.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--compare", action="store_true", help="also time each decoding strategy")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="cifarviz-bench-data-")  # an empty cache, removed at the end
    os.environ["CIFARVIZ_CACHE"] = cache
    try:
        run(args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run(args):
    import cifarviz.core.utils  # noqa: F401 - imports torch (seconds), as the app and CLI already have: not decoding time
    from cifarviz.store.datasets import load_cifar10

    start, cpu = time.perf_counter(), _cpu_seconds()
    ds = load_cifar10(args.data, download=False, progress=False)
    first, first_cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    times = []
    for _ in range(3):
        start = time.perf_counter()
        load_cifar10(args.data, download=False, progress=False)
        times.append(time.perf_counter() - start)
    cached = min(times)
    print(f"data {ds.root} ({ds.layout}), {len(ds.train) + len(ds.val) + len(ds.test):,} images")
    print(f"first load (empty cache) {first:.2f} s ({first_cpu:.2f} CPU s), cached load {cached:.3f} s (best of 3), "
          f"speed-up {first / cached:.0f}x")
    if args.compare and ds.layout == "image-folder":
        compare(ds.root, args.repeat)


if __name__ == "__main__":
    main()
