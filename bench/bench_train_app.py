"""Training in the app (cifarviz.services.runs workers behind the Train page), measured on this machine.

1. Start to the first plotted point, in the real browser: the click on Start until the live view shows its first
   step (progress text and curves), on a fresh server. Median of 3.
2. Training speed through the app vs the CLI on the same settings (lenet, the whole training split, batch 128,
   2 epochs): images/s as the engine measures each epoch (validation excluded), and wall-clock seconds from
   submission (app) or process start (CLI) to the saved checkpoint. The app's worker trains with
   CIFARVIZ_TRAIN_THREADS threads (default: all cores but one) at nice 19; the CLI is run with the same thread
   count and niceness (alternated, median of 4), and once as it runs by default (all cores, normal priority).
3. Warm render time of other pages while a run trains vs idle, in the browser: Evaluate and Dataset alternately
   from their sidebar links, until the run has finished and the status widget is idle (median of 6), while a
   second browser tab watches the Train page's live view of a lenet run (the demo settings, 20 epochs).

    python bench/bench_train_app.py [--data PATH]

Prints a table and writes bench/results/train_app.json (git-ignored).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_app import CHROMIUM, RunCounter, sidebar_link
from load_test import REPO, RESULTS, default_data, precompute, streamlit_server

from cifarviz.core.checkpoint import read_metadata
from cifarviz.core.train import TrainConfig
from cifarviz.services import runs

SETTINGS = {"model": "lenet", "epochs": 2, "batch_size": 128}
STEP_TEXT = r"/Epoch \d+\/\d+, step/"
START_ENABLED = """() => [...document.querySelectorAll('button')].some(b => b.innerText.trim().endsWith('Start') &&
                                                                         !b.disabled)"""


def app_speed(data: str, root: Path) -> dict:
    start = time.time()
    run_id = runs.submit_training(TrainConfig(**SETTINGS), data, root=root)
    while (run := runs.load_run(run_id, root)).state in runs.ACTIVE:
        time.sleep(0.2)
    if run.state != runs.COMPLETED:
        raise SystemExit(f"the app's run {run_id} ended {run.state}: {run.error}")
    rows = runs.read_metrics(run)
    saved = next(r for r in rows if r["event"] == "saved")
    first = next(r for r in rows if r["event"] == "step")
    epochs = [r["images_per_s"] for r in rows if r["event"] == "epoch"]
    return {"images_per_s": statistics.mean(epochs), "wall_s": saved["time"] - start,
            "first_step_s": first["time"] - start, "threads": next(r for r in rows if r["event"] == "start")["threads"]}


def cli_speed(data: str, out: Path, threads: int | None, nice: int) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op thread count
    command = ["nice", "-n", str(nice), sys.executable, "-m", "cifarviz", "train", "--data", data, "--out", str(out),
               *[f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]]  # fmt: skip
    start = time.time()
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    meta = read_metadata(out)
    return {"images_per_s": statistics.mean(h["images_per_s"] for h in meta["history"]), "wall_s": time.time() - start,
            "threads": meta["cpu_threads"]}


def speeds(data: str, root: Path, rounds: int) -> dict:
    threads = runs.train_threads()
    results = {"app": [], "cli_same_settings": [], "cli_default": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            results["app"].append(app_speed(data, root))
            results["cli_same_settings"].append(cli_speed(data, Path(tmp) / "same.safetensors", threads, 19))
            if i == 0:  # for context only: slow when other work shares the cores
                results["cli_default"].append(cli_speed(data, Path(tmp) / "default.safetensors", None, 0))
    summary = {name: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for name, rows in results.items()}
    summary["app_overhead"] = 1 - summary["app"]["images_per_s"] / summary["cli_same_settings"]["images_per_s"]
    summary["app_wall_overhead"] = summary["app"]["wall_s"] / summary["cli_same_settings"]["wall_s"] - 1
    return {"settings": SETTINGS, "runs": results, **summary}


def in_browser(url: str, root: Path, rounds: int = 3) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        watcher = browser.new_page(viewport={"width": 1600, "height": 1200})
        viewer = browser.new_page(viewport={"width": 1600, "height": 1200})
        for page in (watcher, viewer):
            page.set_default_timeout(300_000)
        try:
            first_point = []
            watcher.goto(f"{url}/train")
            epochs = watcher.get_by_label("Epochs", exact=True)
            for i in range(rounds + 1):  # the last run keeps training for part 3
                epochs.fill("20")
                epochs.press("Enter")
                watcher.wait_for_timeout(1000)
                start = time.perf_counter()
                watcher.get_by_role("button", name="Start", exact=True).click()
                watcher.locator(f"text={STEP_TEXT}").first.wait_for()
                watcher.locator("[class*='st-key-live-'] [data-testid='stVegaLiteChart']").first.wait_for()
                if i < rounds:
                    first_point.append(time.perf_counter() - start)
                    watcher.locator("[class*='st-key-live-']").get_by_role("button", name="Stop").click()
                    watcher.wait_for_function(START_ENABLED)  # the run ended: Start is offered again
            counter = RunCounter(viewer)
            counter.timed_run(lambda: viewer.goto(url))

            def navigations(n: int = 6) -> list[float]:
                return [counter.timed_run(sidebar_link(viewer, ("evaluate", "dataset")[i % 2]).click) for i in range(n)]

            navigations(2)  # warm both pages in this session
            busy = navigations()
            assert any(r.state == runs.RUNNING for r in runs.list_runs(root)), "the run ended before the measurement"
            for run in runs.list_runs(root):
                runs.request_stop(run.id, root)
            while any(r.state in runs.ACTIVE for r in runs.list_runs(root)):
                time.sleep(0.5)
            watcher.goto(f"{url}/models")  # nothing polls now
            time.sleep(2)
            idle = navigations()
            return {"start_to_first_point_s": statistics.median(first_point), "first_point_runs_s": first_point,
                    "render_while_training_s": statistics.median(busy), "render_idle_s": statistics.median(idle),
                    "render_while_training_all_s": busy, "render_idle_all_s": idle}
        finally:
            browser.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=default_data(), help="CIFAR-10 folder (default: $CIFARVIZ_DATA)")
    parser.add_argument("--rounds", type=int, default=4, help="app and CLI runs of part 2, alternated (default 4)")
    args = parser.parse_args()
    data = str(Path(args.data).resolve())
    env = {**os.environ, "CIFARVIZ_DATA": data}
    precompute(env)  # warm caches: the renders measured are the warm ones
    root = Path(tempfile.mkdtemp(prefix="cifarviz-bench-runs-"))
    os.environ["CIFARVIZ_RUNS"] = env["CIFARVIZ_RUNS"] = str(root)
    try:
        report = {"data": data, "cpu_count": os.cpu_count(), "train_threads": runs.train_threads(),
                  "worker_nice": runs.WORKER_NICE, "speed": speeds(data, root, args.rounds)}
        with streamlit_server(env, RESULTS / "train_app_server.log") as server:
            report["browser"] = in_browser(server.url, root)
    finally:
        for run in runs.list_runs(root):
            runs.request_stop(run.id, root)
        shutil.rmtree(root, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_app.json").write_text(json.dumps(report, indent=2))
    s, b = report["speed"], report["browser"]
    print(f"\ndata {data} ({report['cpu_count']} CPUs); lenet, median of {len(s['runs']['app'])} runs")
    print(f"Start to first plotted point (browser, median of 3): {b['start_to_first_point_s']:.1f} s")
    for name in ("app", "cli_same_settings", "cli_default"):
        print(f"{name:18} {s[name]['images_per_s']:8,.0f} images/s  {s[name]['wall_s']:6.1f} s wall  "
              f"{s[name]['threads']:.0f} thread(s)")
    print(f"app overhead vs the CLI on the same settings: {s['app_overhead']:+.1%} images/s, "
          f"{s['app_wall_overhead']:+.1%} wall time (target: under 10%)")
    print(f"Evaluate/Dataset warm render (browser, median of 6): idle {b['render_idle_s']:.2f} s, "
          f"while a run trains {b['render_while_training_s']:.2f} s")


if __name__ == "__main__":
    main()
