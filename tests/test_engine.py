"""The queue's rules on the embedded broker (a SQLite file), without training: what a worker refuses to run, and
the order jobs leave the queue in."""

from __future__ import annotations

import pickle

from cifarviz.core.train import TrainConfig
from cifarviz.services import runs
from cifarviz.services.work import engine, worker
from cifarviz.services.work.replicas import submit_replicas


class Booby:
    """Unpickling this creates a file: the proof that a message was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_worker_runs_only_json_jobs_of_registered_kinds(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARVIZ_RUNS", str(tmp_path / "runs"))
    url = engine.broker_url()
    marker = tmp_path / "unpickled"
    huey = engine.queue("any", url)
    huey.storage.enqueue(pickle.dumps(Booby(str(marker))), 0)  # what a default Huey would have unpickled
    huey.storage.enqueue(b'{"message": ["x", "builtins.print", null, 0, 0, 0, ["hello"], {}, null, null, null, null]}', 0)
    huey.enqueue(huey.job.s("evil-1", "os.system", {"command": "touch " + str(marker)}, "", "any", id="evil-1"))
    done = worker.serve(url, name="test-worker", work=tmp_path / "work", gpu=False, idle_exit=1.0)
    assert done == 0 and not marker.exists()
    assert huey.pending_count() == 0  # every message was taken and refused: none is retried forever
    refused = engine.get_json(url, "cv:status:evil-1")
    assert refused["state"] == runs.FAILED and "unknown kind 'os.system'" in refused["error"]


def test_jobs_leave_the_queue_by_their_kinds_priority_then_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARVIZ_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("CIFARVIZ_MAX_RUNS", "0")  # nothing takes them: the test reads the queue
    replica = submit_replicas("lenet", [1], tmp_path)[0]
    first = runs.submit_training(TrainConfig(model="lenet", epochs=1), tmp_path)
    second = runs.submit_training(TrainConfig(model="lenet", epochs=1), tmp_path)
    assert runs.KINDS["train"].priority > runs.KINDS["replica"].priority
    assert [task.id for task in engine.queue("any", engine.broker_url()).pending()] == [first, second, replica]
    assert runs.where(runs.load_run(first)) == "waiting for any worker"
    assert [r.state for r in runs.list_runs()] == [runs.QUEUED] * 3


def test_the_command_line_submits_a_training_to_the_queue(tmp_path, monkeypatch, capsys):
    from cifarviz.cli import main

    monkeypatch.setenv("CIFARVIZ_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("CIFARVIZ_MAX_RUNS", "0")
    assert main(["train", "--recipe", "lenet", "--epochs", "2", "--queue", "--data", str(tmp_path)]) == 0
    [run] = runs.list_runs()
    assert run.kind == "train" and run.train_config["epochs"] == 2 and run.id in capsys.readouterr().out
    assert main(["train", "--recipe", "lenet", "--queue", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--queue keeps the checkpoint" in capsys.readouterr().err
