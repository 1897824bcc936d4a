"""The queue of long work: latency (submit to the first metrics line in the app's run folder) and throughput with 1
and 2 workers, embedded (the SQLite file, the app's own workers) and on a Redis broker (workers started as another
machine would), each as a ratio measured in the same run.

    python bench/bench_queue.py [--jobs 4] [--subset 1000]     # needs Debian's redis-server for the broker half

Every job is a real training: lenet, 1 epoch on `--subset` images of the development data ($CIFARVIZ_DATA), at one
thread per worker. Writes bench/results/queue-DATE-COMMIT.json with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(check, timeout=900.0, every=0.05):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(every)
    return value


def measure(mode: str, workers: int, jobs: int, subset: int, data: str, scratch: Path) -> dict:
    from cifarviz.core.train import TrainConfig
    from cifarviz.services import runs
    from cifarviz.services.work import worker

    root = scratch / f"{mode}-{workers}" / "runs"
    os.environ["CIFARVIZ_RUNS"] = str(root)
    os.environ["CIFARVIZ_TRAIN_THREADS"] = "1"
    started, redis = [], None
    if mode == "redis":
        port = free_port()
        redis = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir",
                                  str(scratch), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        time.sleep(0.5)
        os.environ.update(CIFARVIZ_BROKER=url, CIFARVIZ_MAX_RUNS="0")
        for n in range(workers):  # as on other machines: their own folders, the broker on the command line
            home = scratch / f"{mode}-{workers}" / f"machine-{n}"
            home.mkdir(parents=True)
            env = {**os.environ, "CIFARVIZ_RUNS": str(home / "runs"), "PYTHONPATH": str(REPO)}
            env.pop("CIFARVIZ_BROKER")
            started.append(subprocess.Popen([sys.executable, "-m", "cifarviz", "worker", "--broker", url, "--cpu",
                                             "--name", f"w{n}", "--work", str(home / "work")], env=env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    else:
        os.environ.pop("CIFARVIZ_BROKER", None)
        os.environ["CIFARVIZ_MAX_RUNS"] = str(workers)
    config = TrainConfig(model="lenet", epochs=1, batch_size=64)

    def first_line(run_id: str) -> bool:
        return (root / run_id / "metrics.jsonl").is_file() and (root / run_id / "metrics.jsonl").stat().st_size > 0

    def finished(run_id: str) -> bool:
        return runs.load_run(run_id, root).state in runs.FINAL

    try:
        begin = time.perf_counter()  # cold: the embedded worker starts on the first submit (torch imported)
        warmup = runs.submit_training(config, data, subset=200)
        wait(lambda: first_line(warmup))
        cold = time.perf_counter() - begin
        wait(lambda: finished(warmup))
        begin = time.perf_counter()
        probe = runs.submit_training(config, data, subset=200)
        wait(lambda: first_line(probe))
        warm = time.perf_counter() - begin
        wait(lambda: finished(probe))
        begin = time.perf_counter()
        ids = [runs.submit_training(config, data, subset=subset) for _ in range(jobs)]
        wait(lambda: all(finished(i) for i in ids), every=0.2)
        total = time.perf_counter() - begin
        states = [runs.load_run(i, root).state for i in ids]
        assert states == [runs.COMPLETED] * jobs, states
    finally:
        worker.stop_local_workers(root)
        for process in started:
            process.terminate()
            process.wait()
        if redis is not None:
            redis.terminate()
            redis.wait()
    return {"mode": mode, "workers": workers, "latency_cold_s": round(cold, 2), "latency_warm_s": round(warm, 3),
            "jobs": jobs, "jobs_seconds": round(total, 1), "jobs_per_minute": round(60 * jobs / total, 2),
            "load_average": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--subset", type=int, default=1000)
    parser.add_argument("--modes", nargs="+", default=["embedded", "redis"])
    args = parser.parse_args()
    data = os.environ.get("CIFARVIZ_DATA") or str(REPO / "data")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for mode in args.modes:
            for workers in (1, 2):
                rows.append(measure(mode, workers, args.jobs, args.subset, data, Path(scratch)))
                print(rows[-1], flush=True)
    for mode in args.modes:
        one, two = (next(r for r in rows if r["mode"] == mode and r["workers"] == n) for n in (1, 2))
        two["throughput_vs_one_worker"] = round(two["jobs_per_minute"] / one["jobs_per_minute"], 2)
    if set(args.modes) == {"embedded", "redis"}:
        for n in (1, 2):
            emb, red = (next(r for r in rows if r["mode"] == m and r["workers"] == n) for m in ("embedded", "redis"))
            red["warm_latency_vs_embedded"] = round(red["latency_warm_s"] / emb["latency_warm_s"], 2)
            red["throughput_vs_embedded"] = round(red["jobs_per_minute"] / emb["jobs_per_minute"], 2)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    out = {"command": "python bench/bench_queue.py " + " ".join(sys.argv[1:]), "commit": commit, "data": data,
           "cores": os.cpu_count(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"queue-{time.strftime('%Y%m%d')}-{commit}.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
