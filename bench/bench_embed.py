"""2-D maps (cifarviz.analysis.embed) and the Embeddings page: how fast, on this machine.

1. Cold t-SNE of fastnet's 10,000 test features with openTSNE as cifarviz runs it (PCA to 50 dimensions, then
   openTSNE; target < 20 s), and scikit-learn's TSNE on the same 10,000 features in the same run (its defaults:
   1,000 iterations, Barnes-Hut) for the ratio; each map's 10-NN accuracy, to show the faster one is as good.
2. UMAP (umap-learn): the first call in a fresh process (numba compilation included), a second call in that process,
   and the first call in a second fresh process (numba's on-disk cache).
3. PCA of the same features.
4. The page, warm, server side (Streamlit's AppTest): best of 3 reruns of the default t-SNE map (target < 2 s).
5. The page in the real browser (chromium via Playwright), on a warm server: from navigation until the map answers
   a hover with a tooltip (time to interactive), with hover thumbnails on all 10,000 points and on none.

    python bench/bench_embed.py [--data PATH] [--skip-sklearn] [--skip-browser]

Prints a table and writes bench/results/embed-DATE-COMMIT.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from load_test import REPO, RESULTS, default_data, streamlit_server

from cifarviz.core.utils import atomic_write  # importable: load_test put this checkout on sys.path

CHROMIUM = "/usr/bin/chromium"
UMAP_CALL = """
import json, sys, time
import numpy as np
from cifarviz.analysis.embed import compute_embedding
x = np.load(sys.argv[1])
times = []
for _ in range(2):
    t = time.perf_counter(); compute_embedding(x, "umap", {}); times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def load_inputs(data: str):
    from cifarviz.core.checkpoint import load_checkpoint
    from cifarviz.store.artifacts import split_artifacts
    from cifarviz.store.datasets import load_cifar10

    dataset = load_cifar10(data, download=False, progress=False)
    checkpoint = load_checkpoint(REPO / "checkpoints" / "fastnet.safetensors")
    return dataset, checkpoint, split_artifacts(checkpoint, dataset, "test")


def bench_library(dataset, checkpoint, arts, sklearn: bool) -> dict:
    from cifarviz.analysis.embed import compute_embedding, embedding, embedding_path, knn_accuracy

    report = {"points": len(arts.labels), "feature_dims": int(arts.features.shape[1]),
              "load_avg_before": os.getloadavg()}
    path = embedding_path(checkpoint, dataset, "test", "tsne")
    path.unlink(missing_ok=True)  # cold: computed, written, then read by the page below
    emb, seconds = timed(lambda: embedding(checkpoint, dataset, "test", "tsne"))
    report["opentsne_s"] = round(seconds, 2)
    report["opentsne_knn10"] = round(knn_accuracy(emb.coords, emb.labels), 4)
    if sklearn:
        from sklearn.manifold import TSNE

        coords, seconds = timed(lambda: TSNE(perplexity=30, random_state=0).fit_transform(arts.features))
        report["sklearn_tsne_s"] = round(seconds, 2)
        report["sklearn_tsne_knn10"] = round(knn_accuracy(coords, arts.labels), 4)
        report["sklearn_over_opentsne"] = round(report["sklearn_tsne_s"] / report["opentsne_s"], 2)
    coords, seconds = timed(lambda: compute_embedding(arts.features, "pca"))
    report["pca_s"], report["pca_knn10"] = round(seconds, 2), round(knn_accuracy(coords, arts.labels), 4)
    with tempfile.NamedTemporaryFile(suffix=".npy") as fh:
        import numpy as np

        np.save(fh.name, arts.features)
        for run in ("umap_process1", "umap_process2"):  # fresh processes: compilation, then numba's disk cache
            out = subprocess.run([sys.executable, "-c", UMAP_CALL, fh.name], capture_output=True, text=True,
                                 cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
            first, second = json.loads(out.stdout.strip().splitlines()[-1])
            report[f"{run}_first_call_s"], report[f"{run}_second_call_s"] = round(first, 2), round(second, 2)
    report["load_avg_after"] = os.getloadavg()
    return report


def bench_apptest(data: str, rounds: int = 3) -> dict:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = data
    at.run()
    _, first = timed(lambda: at.switch_page("pages/embeddings.py").run())
    while at.progress:  # artifacts or the map still being computed by a job
        time.sleep(1)
        at.run()
    assert not at.exception and at.get("vega_lite_chart"), "the Embeddings page did not draw its map"
    warm = [timed(at.run)[1] for _ in range(rounds)]
    return {"first_render_s": round(first, 2), "warm_render_best_s": round(min(warm), 3),
            "warm_render_median_s": round(statistics.median(warm), 3)}


def time_to_interactive(page, url: str) -> dict:
    """Navigation until the map is drawn, and until a hover over it shows a tooltip (the map is interactive)."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_browser import hover_a_point

    start = time.perf_counter()
    page.goto(f"{url}/embeddings")
    chart = page.locator("[data-testid='stVegaLiteChart'] canvas").first
    chart.wait_for(timeout=600_000)
    drawn = time.perf_counter() - start
    hover_a_point(page, chart)
    return {"drawn_s": round(drawn, 2), "interactive_s": round(time.perf_counter() - start, 2),
            "thumbnail_in_tooltip": page.locator("#vg-tooltip-element img").count() == 1}


def bench_browser(data: str) -> dict:
    from playwright.sync_api import sync_playwright

    report = {}
    for thumbnails in (10_000, 0):
        env = {**os.environ, "CIFARVIZ_DATA": data, "CIFARVIZ_HOVER_THUMBNAILS": str(thumbnails)}
        log = Path(tempfile.mkdtemp(prefix="bench-embed-")) / "server.log"
        with streamlit_server(env, log) as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1024, "height": 768})
            page.set_default_timeout(600_000)
            first = time_to_interactive(page, server.url)  # the server's first visit: data, thumbnails, model
            again = [time_to_interactive(page, server.url) for _ in range(3)]  # warm server, fresh page loads
            sent = page.evaluate("() => performance.getEntriesByType('resource').length")
            browser.close()
        report[f"thumbnails_{thumbnails}"] = {
            "first_visit": first, "warm_interactive_median_s": statistics.median(a["interactive_s"] for a in again),
            "warm_drawn_median_s": statistics.median(a["drawn_s"] for a in again),
            "thumbnail_in_tooltip": again[-1]["thumbnail_in_tooltip"], "resources": sent}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=default_data())
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--skip-browser", action="store_true")
    args = parser.parse_args()
    dataset, checkpoint, arts = load_inputs(args.data)
    report = {"machine": f"{os.cpu_count()} CPU cores, shared with other work (see load averages)",
              "data": str(args.data), "library": bench_library(dataset, checkpoint, arts, not args.skip_sklearn),
              "apptest": bench_apptest(str(dataset.root))}
    if not args.skip_browser and Path(CHROMIUM).exists():
        report["browser"] = bench_browser(str(dataset.root))
    print(json.dumps(report, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "nocommit"
    path = RESULTS / f"embed-{time.strftime('%Y%m%d')}-{commit}.json"
    with atomic_write(path, "w") as fh:
        json.dump({"command": "python bench/bench_embed.py " + " ".join(sys.argv[1:]), "commit": commit,
                   **report}, fh, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
