"""The explorer's speed and memory on this machine, for one viewer.

1. First ever visit, in the real browser (chromium via Playwright) on a server with an empty cache (a fresh
   temporary CIFARVIZ_CACHE, so the first decode of the 60,000 JPEGs is part of it): navigation to Evaluate
   until its first figure (the accuracy so far, on a random sample of the images predicted) and until its full
   report (target < 10 s); a click on one of its images until the inspector shows its
   Grad-CAM (target < 3 s: it no longer waits for the training split's features, which come in the
   background); until the inspector's nearest training images appear; then Influence until its first answer
   (target < 60 s), and Embeddings until the t-SNE's first view (target < 3 s; the layout while it computes)
   and until the finished map.
2. Warm caches (`python -m cifarviz precompute -c fastnet` first), in the browser: every page from a click on
   its sidebar link, and the inspector from a click on an image, until the run has finished (the server's
   `script_finished` seen on the page's websocket) and the status widget is idle. Median of 3.
3. Warm caches, server side only (Streamlit's AppTest, the app in this process): every page's render and the
   inspector's. Best of 3.
4. Memory: the server's resident set size at the end (the data, fastnet and its artifacts loaded).

    python bench/bench_app.py [--data PATH] [--keep-cache]

Prints a table and writes JSON to bench/results/ (git-ignored).
"""

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from load_test import PAGES, REPO, RESULTS, default_data, precompute, rss_mb, run_finished, streamlit_server
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

from cifarviz.core.utils import atomic_write  # importable: load_test put this checkout on sys.path

CHROMIUM = "/usr/bin/chromium"
GRADCAM_TEXT = "Where the model found evidence for"
IDLE = "!document.querySelector('[data-testid=\"stStatusWidget\"]')"  # Streamlit shows it while a run is under way
COLD_LIMIT_S = 600  # a first visit on a busy 2-core machine: decode 60,000 JPEGs, then predict 10,000 images


# --------------------------------------------------------------------------- in the browser


class RunCounter:
    """Counts the page's finished runs by reading the ForwardMsgs on its websocket, as the frontend does."""

    def __init__(self, page):
        self.page, self.finished = page, 0
        page.on("websocket", lambda ws: ws.on("framereceived", self._frame))

    def _frame(self, payload) -> None:
        if isinstance(payload, (bytes, bytearray)):
            msg = ForwardMsg()
            msg.ParseFromString(bytes(payload))
            self.finished += run_finished(msg)

    def timed_run(self, action, timeout: float = 120) -> float:
        """Seconds from `action` (a click) until the run it starts has finished and the status widget is gone."""
        count, start = self.finished, time.perf_counter()
        action()
        while self.finished <= count:
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"no finished run within {timeout} s")
            self.page.wait_for_timeout(10)  # lets Playwright deliver the websocket events
        self.page.wait_for_function(IDLE)
        return time.perf_counter() - start


def sidebar_link(page, name: str):
    # The link's text content is its icon's ligature name, then its label: "homeHome".
    return page.locator("[data-testid='stSidebar'] a", has_text=re.compile(f"{name}$", re.IGNORECASE)).first


def visible_buttons(page, grid: str):
    return page.locator(f"[class*='st-key-{grid}-'] button:visible")  # a redrawn page also holds hidden copies


def seconds_until(start: float, locator) -> float:
    locator.wait_for()
    return time.perf_counter() - start


def cold_visit(page, url: str) -> dict:
    """The first visitor of a fresh server: Evaluate usable, then an image's inspector, then its neighbours."""
    page.set_default_timeout(COLD_LIMIT_S * 1000)
    start = time.perf_counter()
    page.goto(f"{url}/evaluate")
    first_figure = seconds_until(start, page.locator("[data-testid='stMetric']").first)  # "Accuracy so far"
    evaluate = seconds_until(start, page.locator("[data-testid='stMetric']", has_text="Macro F1").first)
    page.wait_for_function(IDLE)
    dialog = page.locator("[role=dialog]")
    start = time.perf_counter()
    visible_buttons(page, "cell-test").first.click()
    inspector = seconds_until(start, dialog.get_by_text(GRADCAM_TEXT))
    neighbours = seconds_until(start, dialog.locator("[class*='st-key-neighbours-train-']").first)
    page.keyboard.press("Escape")
    dialog.wait_for(state="detached")
    start = time.perf_counter()  # Influence's first answer: a test image's helpful training images
    page.goto(f"{url}/influence")
    influence = seconds_until(start, page.locator("[class*='-helpful-train-'] button >> visible=true").first)
    start = time.perf_counter()  # the t-SNE map's first view (its layout while it computes), then the map
    page.goto(f"{url}/embeddings")
    first_view = seconds_until(start, page.locator("[data-testid='stVegaLiteChart']").first)
    finished = seconds_until(start, page.get_by_text(re.compile("10-NN accuracy in this map")).first)
    return {"evaluate_first_figure_s": first_figure, "evaluate_usable_s": evaluate, "inspector_open_s": inspector,
            "neighbours_s": neighbours,
            "influence_first_answer_s": influence, "tsne_first_view_s": first_view, "tsne_map_s": finished}


def warm_browser(page, url: str, rounds: int = 3) -> dict:
    """Each page from its sidebar link, and the inspector from an image on Evaluate: median of `rounds`."""
    page.set_default_timeout(120_000)
    runs = RunCounter(page)
    runs.timed_run(lambda: page.goto(url))
    times = {name: [] for name in [*PAGES, "inspector"]}
    for _ in range(rounds):
        for name in PAGES:  # always a different page from the last, so every click is a navigation
            times[name].append(runs.timed_run(sidebar_link(page, name).click))
    runs.timed_run(sidebar_link(page, "evaluate").click)
    for i in range(rounds):
        times["inspector"].append(runs.timed_run(visible_buttons(page, "mistakes").nth(i).click))
        page.locator("[role=dialog]").get_by_text(GRADCAM_TEXT).wait_for(timeout=1000)  # drawn by that run
        runs.timed_run(lambda: page.keyboard.press("Escape"))  # the dialog's dismissal: a rerun of the page
    return {name: statistics.median(values) for name, values in times.items()}


def in_browser(url: str, cold: bool) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1200})
        try:
            result = {"cold": cold_visit(page, url)} if cold else {}
            if cold:  # the background jobs the first visit started: `precompute` waits on their file locks
                result["cold"]["background_done_s"] = precompute(os.environ)
            result["warm_browser_s"] = warm_browser(page, url)
            return result
        finally:
            browser.close()


# --------------------------------------------------------------------------- server side only


def seconds(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def warm_apptest(data: str, rounds: int = 3) -> dict:
    """Every page's render and the inspector's in Streamlit's AppTest (no browser, no websocket): best of 3."""
    from streamlit.testing.v1 import AppTest

    # AppTest calls cached functions outside a script thread; Streamlit warns about each call.
    logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context").setLevel(logging.ERROR)
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=300)
    at.session_state["_data_root"] = data
    at.run()
    times = {}
    for name, (_, path) in PAGES.items():
        at.switch_page(path).run()  # the first visit of this session
        times[name] = min(seconds(at.switch_page(path).run) for _ in range(rounds))
    inspector = []
    for i in range(rounds):
        at.switch_page(PAGES["evaluate"][1]).run()
        button = [b for b in at.button if b.key and b.key.startswith("mistakes-")][i]
        inspector.append(seconds(button.click().run))
        if at.exception or not any(GRADCAM_TEXT in caption for image in at.image for caption in image.captions):
            raise SystemExit(f"the inspector did not open in AppTest: {at.exception}")
        at.button(key="inspector-close").click().run()
    times["inspector"] = min(inspector)
    return times


# --------------------------------------------------------------------------- main


def commit() -> str:
    import subprocess

    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                          check=False).stdout.strip()


def print_report(report: dict) -> None:
    print(f"\ndata {report['data']} ({report['cpu_count']} CPUs), checkpoint fastnet")
    if report["cold"]:
        c = report["cold"]
        print(f"empty caches, in the browser: Evaluate's first figure {c['evaluate_first_figure_s']:.1f} s, its "
              f"report {c['evaluate_usable_s']:.1f} s (target < 10 s); "
              f"inspector open {c['inspector_open_s']:.1f} s after the click (target < 3 s); "
              f"its neighbours {c['neighbours_s']:.1f} s after the click; Influence's first answer "
              f"{c['influence_first_answer_s']:.1f} s (target < 60 s); t-SNE first view {c['tsne_first_view_s']:.1f} s "
              f"(target < 3 s), the finished map {c['tsne_map_s']:.1f} s")
    print(f"{'warm caches':14} {'browser (median of 3)':>24} {'AppTest (best of 3)':>22}")
    for name in [*PAGES, "inspector"]:
        print(f"{name:14} {report['warm_browser_s'][name]:22.2f} s {report['warm_apptest_s'][name]:20.2f} s")
    print(f"server RSS at the end: {report['server_rss_mb']:.0f} MB")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=default_data())
    parser.add_argument("--keep-cache", action="store_true", help="warm numbers only, with the existing cache")
    args = parser.parse_args()
    os.environ.update({"CIFARVIZ_DATA": args.data, "CIFARVIZ_OFFLINE": "1", "TQDM_DISABLE": "1"})
    fresh_cache = None if args.keep_cache else tempfile.mkdtemp(prefix="cifarviz-bench-")
    if fresh_cache:
        os.environ["CIFARVIZ_CACHE"] = fresh_cache
    else:
        precompute(os.environ)
    log = Path(tempfile.mkstemp(prefix="bench-app-server-", suffix=".log")[1])
    report = {"data": args.data, "cpu_count": os.cpu_count(), "cold": None, "server_log": str(log),
              "load_average_before": os.getloadavg(), "commit": commit()}
    try:
        with streamlit_server(dict(os.environ), log) as server:
            report.update(in_browser(server.url, cold=fresh_cache is not None))
            report["server_rss_mb"] = rss_mb(server.pid)
        report["warm_apptest_s"] = warm_apptest(args.data)
    finally:
        if fresh_cache:  # about 230 MB of decoded images and artifacts
            shutil.rmtree(fresh_cache, ignore_errors=True)
    print_report(report)
    out = RESULTS / f"bench_app-{time.strftime('%Y%m%d')}-{report['commit'] or 'nocommit'}.json"  # by date and commit
    with atomic_write(out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
