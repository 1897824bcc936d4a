"""One queue for long work on a real broker: Debian's redis-server, worker processes with working folders of their
own (sharing nothing with the app but the broker), the app's side in this process. Real trainings of lenet on small
subsets of the development data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_runs import wait_until

from cifarviz.core.checkpoint import load_checkpoint
from cifarviz.core.train import TrainConfig
from cifarviz.services import runs
from cifarviz.services.work import engine

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
pytestmark = pytest.mark.skipif(not Path(REDIS).is_file(), reason="needs Debian's redis-server (apt-get install "
                                                                  "redis-server), as CI installs it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A redis-server of the test's own, persisting to its folder (append-only file), restartable."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self) -> None:
        self.process = subprocess.Popen([REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                         str(self.folder), "--appendonly", "yes", "--save", ""],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.url, socket_timeout=1).ping()
                return
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()  # SIGTERM: redis writes what it holds and exits
        self.process.wait(timeout=30)


@pytest.fixture
def broker(tmp_path, monkeypatch):
    server = Redis(tmp_path)
    server.start()
    app_runs = tmp_path / "app-runs"
    monkeypatch.setenv("CIFARVIZ_RUNS", str(app_runs))
    monkeypatch.setenv("CIFARVIZ_BROKER", server.url)
    monkeypatch.setenv("CIFARVIZ_MAX_RUNS", "0")  # the app starts no worker of its own: the work goes elsewhere
    yield server
    server.process.kill()
    server.process.wait()


class Workers:
    """Worker processes as another machine would run them: each its own runs and working folder."""

    def __init__(self, tmp_path: Path, url: str):
        self.tmp_path, self.url, self.started = tmp_path, url, {}

    def start(self, name: str, *extra: str) -> subprocess.Popen:
        home = self.tmp_path / f"machine-{name}"
        env = {**os.environ, "CIFARVIZ_RUNS": str(home / "runs"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
               "CIFARVIZ_TRAIN_THREADS": "1"}
        env.pop("CIFARVIZ_BROKER", None)  # given on the command line, as on another machine
        home.mkdir(exist_ok=True)
        process = subprocess.Popen([sys.executable, "-m", "cifarviz", "worker", "--broker", self.url, "--name", name,
                                    "--work", str(home / "work"), *extra], env=env, cwd=home,
                                   stdout=open(home / "worker.out", "wb"), stderr=subprocess.STDOUT)
        self.started[name] = process
        return process

    def output(self, name: str) -> str:
        return (self.tmp_path / f"machine-{name}" / "worker.out").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.started.values():
            process.kill()
            process.wait()


@pytest.fixture
def workers(tmp_path, broker):
    pool = Workers(tmp_path, broker.url)
    yield pool
    pool.stop_all()


def lenet(epochs: int = 1) -> TrainConfig:
    return TrainConfig(model="lenet", epochs=epochs, batch_size=64)


def state_of(run_id: str) -> str:
    runs.start()
    return runs.load_run(run_id).state


def finished(run_id: str):
    run = runs.load_run(run_id)
    return run if run.state in runs.FINAL else None


def test_two_runs_train_at_once_on_two_workers_and_everything_reaches_the_app(cifar, workers):
    workers.start("w1", "--cpu")
    workers.start("w2", "--cpu")
    # both waiting before anything is queued: otherwise the first to start could take both runs, one after the other
    wait_until(lambda: len(engine.workers(workers.url)) == 2, "both workers' announcements")
    first = runs.submit_training(lenet(epochs=5), cifar.root, subset=2000, owner="alice")
    second = runs.submit_training(lenet(epochs=5), cifar.root, subset=2000, owner="bob")
    wait_until(lambda: state_of(first) == state_of(second) == runs.RUNNING, "both runs training at once")
    where = {runs.load_run(first).status["worker"], runs.load_run(second).status["worker"]}
    assert where == {"w1", "w2"}

    for run_id in (first, second):
        run = wait_until(lambda: finished(run_id), f"the end of {run_id}")
        assert run.state == runs.COMPLETED, (run.error, workers.output("w1"), workers.output("w2"))
        assert run.where.startswith(("w1 on", "w2 on")) and "(cpu)" in run.where
        epochs = [r["epoch"] for r in runs.read_metrics(run) if r["event"] == "epoch"]
        assert epochs == [1, 2, 3, 4, 5]  # the metrics streamed over the broker, in order, none twice
        checkpoint = load_checkpoint(run.checkpoint)  # the weights came back through the broker, checked on load
        assert checkpoint.meta["status"] == "completed" and 0 < checkpoint.test_accuracy < 1
        assert "test accuracy" in run.status["note"]
    # the workers' folders hold nothing of the app's runs, and the broker forgot the finished runs' files
    for name in ("w1", "w2"):
        assert not list((workers.tmp_path / f"machine-{name}").rglob("model.safetensors"))
    assert engine.get_json(workers.url, f"cv:status:{first}") is None


def test_a_worker_killed_mid_epoch_fails_its_run_and_the_queue_moves_on(cifar, workers):
    done = runs.submit_training(lenet(), cifar.root, subset=500)
    w1 = workers.start("w1", "--cpu")
    assert wait_until(lambda: finished(done), "the first run").state == runs.COMPLETED

    long = runs.submit_training(lenet(epochs=200), cifar.root, subset=2000)
    wait_until(lambda: any(r["event"] == "step" for r in runs.read_metrics(long)), "the long run's training")
    short = runs.submit_training(lenet(), cifar.root, subset=500)
    assert state_of(short) == runs.QUEUED
    w1.send_signal(signal.SIGKILL)
    w1.wait()
    failed = wait_until(lambda: finished(long), "the killed worker's run reported")
    assert failed.state == runs.FAILED and "w1" in failed.error and "stopped while running" in failed.error
    assert runs.load_run(done).state == runs.COMPLETED  # finished runs untouched

    workers.start("w2", "--cpu")  # the queue moves on with the workers that live
    run = wait_until(lambda: finished(short), "the next queued run")
    assert run.state == runs.COMPLETED and run.status["worker"] == "w2"


def test_a_gpu_job_goes_to_the_gpu_worker_and_falls_back_to_a_cpu_when_none_is_left(cifar, workers):
    gpu = workers.start("gpu-box", "--gpu")  # told it has a GPU; trains on what it has (this machine's CPU)
    wait_until(lambda: any(w["gpu"] for w in engine.workers(workers.url)), "the GPU worker's announcement")
    first = runs.submit_training(lenet(epochs=100), cifar.root, subset=2000)
    assert runs.load_run(first).status["queue"] == "gpu"
    wait_until(lambda: state_of(first) == runs.RUNNING, "the GPU worker taking it")
    assert runs.load_run(first).status["worker"] == "gpu-box"
    gpu.send_signal(signal.SIGKILL)
    gpu.wait()
    second = runs.submit_training(lenet(), cifar.root, subset=500)  # the GPU worker still counts as connected
    assert runs.load_run(second).status["queue"] == "gpu"
    assert "waiting for a GPU worker" in runs.where(runs.load_run(second))
    workers.start("cpu-1", "--cpu", "--gpu-grace", "5")  # no GPU worker seen for 5 s: it takes the GPU queue's jobs
    run = wait_until(lambda: finished(second), "the fallback to a CPU worker")
    assert run.state == runs.COMPLETED and run.status["worker"] == "cpu-1"
    assert wait_until(lambda: finished(first), "the lost GPU worker's run").state == runs.FAILED


def test_a_broker_that_goes_away_is_said_and_loses_no_queued_run(cifar, broker, workers):
    queued = runs.submit_training(lenet(), cifar.root, subset=500, owner="alice")
    other = runs.submit_training(lenet(), cifar.root, subset=500, owner="alice")
    with pytest.raises(runs.RunError, match="belongs to someone else"):
        runs.cancel(other, by="bob")
    assert runs.cancel(other, by=None) == runs.CANCELLED  # the teacher: any run
    assert runs.problem() is None
    broker.stop()
    time.sleep(2.1)  # the page's check is at most 2 s old
    said = runs.problem()
    assert said and "does not answer" in said and "everything else works" in said
    with pytest.raises(runs.RunError, match="does not answer"):
        runs.submit_training(lenet(), cifar.root, subset=500)
    assert runs.load_run(queued).state == runs.QUEUED  # the app's record is untouched
    broker.start()
    time.sleep(2.1)
    assert runs.problem() is None
    workers.start("w1", "--cpu")
    run = wait_until(lambda: finished(queued), "the queued run after the broker's restart")
    assert run.state == runs.COMPLETED and runs.load_run(other).state == runs.CANCELLED  # cancelled stays so

    running = runs.submit_training(lenet(epochs=200), cifar.root, subset=2000, owner="alice")
    wait_until(lambda: any(r["event"] == "epoch" for r in runs.read_metrics(running)), "an epoch on the worker")
    with pytest.raises(runs.RunError, match="belongs to someone else"):
        runs.request_stop(running, by="bob")
    assert runs.request_stop(running, by="alice") == runs.RUNNING
    run = wait_until(lambda: finished(running), "the owner's stop")
    assert run.state == runs.STOPPED and load_checkpoint(run.checkpoint).meta["status"] == "stopped"


SUBMIT = """
import json, sys
from cifarviz.core.train import TrainConfig
from cifarviz.services import runs
ok = []
for _ in range(3):
    try:
        ok.append(runs.submit_training(TrainConfig(model="lenet", epochs=1), sys.argv[1], owner="alice"))
    except runs.RunError as exc:
        ok.append("refused: " + str(exc))
print(json.dumps(ok))
"""


def test_a_persons_limit_holds_with_two_app_processes_submitting_at_once(cifar, broker, monkeypatch):
    env = {**os.environ, "CIFARVIZ_SESSION_RUNS": "3", "PYTHONPATH": str(REPO)}
    apps = [subprocess.Popen([sys.executable, "-c", SUBMIT, str(cifar.root)], env=env, stdout=subprocess.PIPE,
                             text=True) for _ in range(2)]
    said = [json.loads(app.communicate(timeout=120)[0]) for app in apps]
    accepted = [r for answer in said for r in answer if not r.startswith("refused")]
    refused = [r for answer in said for r in answer if r.startswith("refused")]
    assert len(accepted) == 3 and len(refused) == 3 and all("at most 3 per person" in r for r in refused)
    assert sorted(r.id for r in runs.list_runs()) == sorted(accepted)
    assert engine.pending()["any"] == 3  # and exactly those wait in the broker
