"""The explorer's speed and memory on this machine, through Streamlit's AppTest (the app runs in-process).

1. First ever visit: an empty cache, the Evaluate page with the fastnet checkpoint, then a click that
   opens the inspector (which needs the training split's features for nearest neighbours).
2. Warm renders: every page, best of 3 runs each, with the caches filled.
3. Memory: resident set size with the data and two models (fastnet, lenet) loaded and evaluated.

    python bench/bench_app.py [--data PATH]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGES = ["pages/home.py", "pages/dataset.py", "pages/evaluate.py", "pages/models.py"]


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=os.environ.get("CIFARVIZ_DATA", "../shared/data/cifar10-jpeg"))
    parser.add_argument("--keep-cache", action="store_true", help="measure with the existing cache (no cold run)")
    args = parser.parse_args()
    if not args.keep_cache:
        os.environ["CIFARVIZ_CACHE"] = tempfile.mkdtemp(prefix="cifarviz-bench-")
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=900)
    at.session_state["_data_root"] = args.data
    start = time.perf_counter()
    at.run()
    at.switch_page("pages/evaluate.py").run()
    evaluate_first = time.perf_counter() - start
    button = next(b for b in at.button if b.key and b.key.startswith("cell-"))
    start = time.perf_counter()
    button.click().run()
    inspector_first = time.perf_counter() - start
    assert not at.exception, at.exception
    print(f"first visit: Evaluate page {evaluate_first:.1f} s (decode data + fastnet test predictions), "
          f"first inspector {inspector_first:.1f} s (training-split features), total {evaluate_first + inspector_first:.1f} s")

    at.button(key="inspector-close").click().run()
    for page in PAGES:
        at.switch_page(page).run()  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            at.switch_page(page).run()
            times.append(time.perf_counter() - start)
        print(f"warm render {page:22} {min(times):.2f} s (best of 3)")
    start = time.perf_counter()
    at.switch_page("pages/evaluate.py").run()
    b = next(b for b in at.button if b.key and b.key.startswith("mistakes-"))
    start = time.perf_counter()
    b.click().run()
    print(f"warm inspector open {time.perf_counter() - start:.2f} s")

    at.sidebar.selectbox(key="checkpoint_label").set_value("lenet (shipped)").run()
    print(f"memory: RSS {rss_mb():.0f} MB with the data and two models (fastnet, lenet) loaded and evaluated")


if __name__ == "__main__":
    main()
