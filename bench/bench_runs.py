"""What one viewer's 2-s Train page tick costs with many runs and a long metrics log (issue 16's lecture-hall case).

    python bench/bench_runs.py [--runs 300] [--metrics-mb 77]

Measures, in one process on synthetic run folders in a temporary directory:
* listing the runs folder: the first call (every config.json and status.json read and parsed) against the later
  calls (files only stat'ed, unchanged ones not parsed again);
* the progress of a run whose metrics.jsonl is `--metrics-mb` MB: the first read (parsed once for every viewer)
  against a tick after one more line was appended (only the new bytes are read), and the memory the summary keeps.

Prints a table and writes JSON to bench/results/. The figures are ratios measured in the same run; the load
average is recorded with them (a busy 2-core machine slows both sides alike).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from cifarviz.core.utils import atomic_write  # noqa: E402
from cifarviz.services import runs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def make_runs(root: Path, count: int) -> None:
    for i in range(count):
        folder = root / f"lenet-{i:05d}"
        folder.mkdir(parents=True)
        (folder / "status.json").write_text(json.dumps({"state": "completed", "queued_at": float(i),
                                                        "ended_at": i + 1.0, "note": "3 epochs, test accuracy 61%"}))
        (folder / "config.json").write_text(json.dumps({
            "kind": "train", "owner": f"viewer-{i % 40}", "submitted_at": float(i),
            "spec": {"train_config": {"model": "lenet", "epochs": 3, "lr": 0.05, "augment": {"flip": True}},
                     "subset": 10000, "data": {"root": "/data", "val_size": 5000, "split_seed": 0}}}))


def step_line(step: int) -> str:
    return json.dumps({"event": "step", "step": step, "total_steps": 10**7, "steps_per_epoch": 704, "epoch": 1,
                       "loss": 1.5, "lr": 0.05, "train_loss": 1.6, "train_acc": 0.41, "images_per_s": 2512.3,
                       "elapsed": step * 0.02, "time": 1.7e9 + step}) + "\n"


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--metrics-mb", type=float, default=77.0)
    args = parser.parse_args()
    load_before = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                            check=False).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-runs-") as tmp:
        root = Path(tmp) / "runs"
        make_runs(root, args.runs)
        start = time.perf_counter()
        runs.list_runs(root)
        first_list = time.perf_counter() - start
        later_list = timed(lambda: runs.list_runs(root), 20)

        folder = root / "long-run"
        folder.mkdir()
        (folder / "status.json").write_text(json.dumps({"state": "running", "pid": 1, "queued_at": 1e12}))
        (folder / "config.json").write_text((root / "lenet-00000" / "config.json").read_text())
        line_bytes, step = len(step_line(1)), 0
        with open(folder / "metrics.jsonl", "w") as handle:
            while handle.tell() < args.metrics_mb * 1e6:
                step += 1
                handle.write(step_line(step))
        run = runs.load_run("long-run", root)
        start = time.perf_counter()
        first = runs.progress(run)
        first_read = time.perf_counter() - start
        kept_mb = sum(len(json.dumps(r)) for r in first.steps) / 1e6  # about what the thinned lines hold

        def one_tick():
            nonlocal step
            step += 1
            with open(folder / "metrics.jsonl", "a") as handle:
                handle.write(step_line(step))
            assert runs.progress(run).last["step"] == step

        tick = timed(one_tick, 20)
        whole_file = timed(lambda: runs.read_metrics(run), 1)  # what every viewer's tick did before
    report = {
        "commit": commit, "runs": args.runs, "list_first_ms": first_list * 1e3, "list_later_ms": later_list * 1e3,
        "metrics_mb": args.metrics_mb, "metrics_lines": step, "line_bytes": line_bytes,
        "progress_first_read_s": first_read, "progress_tick_ms": tick * 1e3, "whole_file_read_s": whole_file,
        "summary_steps_kept": len(first.steps), "summary_memory_mb": kept_mb,
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "cpu_count": os.cpu_count(),
    }
    print(f"listing {args.runs} runs: first {first_list * 1e3:.1f} ms, then {later_list * 1e3:.1f} ms per tick "
          f"({first_list / later_list:.1f}x less)")
    print(f"a {args.metrics_mb:.0f} MB metrics.jsonl ({step:,} lines): read whole {whole_file:.2f} s (every tick, "
          f"before); first progress() {first_read:.2f} s once, then {tick * 1e3:.2f} ms per tick "
          f"({whole_file / tick:,.0f}x less); summary keeps {len(first.steps)} step lines (~{kept_mb:.2f} MB of JSON)")
    print(f"load average before/after: {load_before} / {report['load_average_after']}")
    out = RESULTS / f"bench_runs-{time.strftime('%Y%m%d-%H%M%S')}.json"
    with atomic_write(out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
