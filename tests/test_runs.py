"""Background training runs (cifarviz.services.runs) and the Train page, on real data: 1-epoch lenet runs on small subsets."""

import json
import os
import signal
import time

import pytest
import torch
from conftest import REPO, visible
from streamlit.testing.v1 import AppTest
from test_app import run_until, texts

from cifarviz.core.checkpoint import load_checkpoint
from cifarviz.core.errors import CifarvizError
from cifarviz.core.train import TrainConfig
from cifarviz.services import runs


def wait_until(check, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.1)
    return value


def ended(run_id: str) -> runs.Run:
    runs.start()  # this process hears back from the queue (a no-op when its collector already runs)
    run = runs.load_run(run_id)
    return run if run.state not in runs.ACTIVE else None


def lenet(**settings) -> TrainConfig:
    return TrainConfig(**{"model": "lenet", "epochs": 1, "batch_size": 64, "augment": {"flip": True}, **settings})


def train_page(cifar) -> AppTest:
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = str(cifar.root)
    at.run()
    at.switch_page("pages/train.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.mark.slow
def test_a_run_started_on_the_page_trains_to_a_checkpoint_every_page_accepts(cifar, runs_root, monkeypatch):
    monkeypatch.setenv("CIFARVIZ_SESSION_RUNS", "1")
    at = train_page(cifar)
    assert [t.label for t in at.tabs] == ["Train", "Compare", "Tune"]
    # before any run, Compare shows the shipped normalisation study rather than an empty chart
    assert at.multiselect(key="compare_runs").value == [f"s8net-{n} (shipped)" for n in ("bn", "gn", "ln")]
    at.select_slider(key="tr_subset").set_value(1000)
    at.number_input(key="tr_epochs").set_value(2)
    at.select_slider(key="tr_batch_size").set_value(64)
    [b for b in at.button if b.label == "Start"][0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    [run] = runs.list_runs()
    assert run.train_config["model"] == "lenet" and run.train_config["epochs"] == 2
    assert run.config["spec"]["subset"] == 1000 and run.state in runs.ACTIVE  # a worker takes it within a second
    assert [b for b in at.button if b.label == "Start"][0].disabled  # this session's limit: 1 run

    run_until(at, lambda at: runs.load_run(run.id).state not in runs.ACTIVE, "the end of the run", timeout=120)
    run = runs.load_run(run.id)
    assert run.state == runs.COMPLETED, (run.error, runs.log_tail(run))
    rows = runs.read_metrics(run)
    steps, epochs = [r for r in rows if r["event"] == "step"], [r for r in rows if r["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and steps and all(s["images_per_s"] > 0 for s in steps)
    assert steps[-1]["step"] == steps[-1]["total_steps"] == 2 * 16  # 1,000 images in batches of 64, twice
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr"} <= set(epochs[-1])

    checkpoint = load_checkpoint(run.checkpoint)
    assert checkpoint.meta["status"] == "completed" and len(checkpoint.meta["history"]) == 2
    assert checkpoint.meta["data"]["sizes"]["train"] == 1000 and checkpoint.meta["data"]["fingerprint"] == cifar.fingerprint
    assert 0 < checkpoint.test_accuracy < 1  # measured on the real test split
    assert run.status["note"].startswith("2 epochs, test accuracy")

    # the page shows it as finished; its button selects it in the sidebar, and Evaluate works on it
    at.run()
    assert any(run.id in visible(e.value) for e in at.success)
    # and its curves stay on screen under it (they vanished when a run ended or was stopped)
    titles = [json.loads(c.proto.spec).get("title") for c in at.get("vega_lite_chart")]
    assert "Loss" in titles and "Accuracy" in titles, titles
    [b for b in at.button if b.key == f"use-{run.id}"][0].click().run()
    at.run()
    assert at.selectbox(key="checkpoint_label").value == f"{run.id} (your run)"
    at.switch_page("pages/evaluate.py").run()
    run_until(at, lambda at: len(at.progress) == 0, "Evaluate's artifacts")
    assert run.id in texts(at) and at.metric[0].label == "Accuracy"
    assert float(at.metric[0].value.rstrip("%")) / 100 == pytest.approx(checkpoint.test_accuracy, abs=1e-4)

    # the Compare tab overlays it with a shipped checkpoint's curves, configs side by side
    at.switch_page("pages/train.py").run()
    at.multiselect(key="compare_runs").set_value([run.id, "lenet (shipped)"]).run()
    assert not at.exception, [e.value for e in at.exception]
    table = next(d.value for d in at.dataframe if run.id in d.value.columns)
    assert list(table.columns) == [run.id, "lenet (shipped)"] and table.loc["epochs", run.id] == "2"
    # the splits differ by point shape too (a one-epoch run has points and no lines), and the caption says so
    shapes = [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]
    assert any('"shape": {"field": "split"' in json.dumps(spec) for spec in shapes) and "diamonds" in texts(at)


@pytest.mark.slow
def test_stop_mid_epoch_keeps_the_last_finished_epoch(cifar, runs_root):
    run_id = runs.submit_training(lenet(epochs=30, batch_size=32), cifar.root, subset=8000, snapshots=True)
    run = runs.load_run(run_id)
    wait_until(lambda: any(r["event"] == "epoch" for r in runs.read_metrics(run)), "the first epoch")
    asked = time.time()
    assert runs.request_stop(run_id) == runs.RUNNING
    run = wait_until(lambda: ended(run_id), "the stop")
    assert run.state == runs.STOPPED, (run.error, runs.log_tail(run))
    rows = runs.read_metrics(run)
    finishing = next(r for r in rows if r["event"] == "finishing")
    assert finishing["time"] - asked < 10  # within a batch, not at the end of training (30 epochs of 250 batches)
    epochs = [r["epoch"] for r in rows if r["event"] == "epoch"]
    last_step = max(r["step"] for r in rows if r["event"] == "step")
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) < 30
    # stopped inside the epoch after the last finished one (or just as that one ended: the request can land there)
    assert len(epochs) * 250 <= last_step < (len(epochs) + 1) * 250

    kept = load_checkpoint(run.checkpoint)
    snapshot = load_checkpoint(run.dir / "epochs" / f"epoch-{len(epochs):03d}.safetensors")
    assert kept.meta["status"] == "stopped" and len(kept.meta["history"]) == len(epochs) and 0 < kept.test_accuracy < 1
    state, finished = kept.model.state_dict(), snapshot.model.state_dict()
    assert all(torch.equal(state[k], finished[k]) for k in state)  # the last finished epoch, not half-trained weights
    assert f"epoch {len(epochs)} kept" in run.status["note"]


@pytest.mark.slow
def test_queue_cancel_killed_worker_and_a_diverging_run(cifar, runs_root):
    first = runs.submit_training(lenet(epochs=200), cifar.root, subset=1000)
    wait_until(lambda: runs.load_run(first).state == runs.RUNNING, "the first run's start")
    second = runs.submit_training(lenet(), cifar.root, subset=1000)
    assert runs.load_run(second).state == runs.QUEUED
    assert runs.queue_position(runs.load_run(second)) == 1
    assert runs.cancel(second) == runs.CANCELLED
    absurd = runs.submit_training(lenet(lr=1e6, schedule="constant", momentum=0.0), cifar.root, subset=1000)
    assert runs.queue_position(runs.load_run(absurd)) == 1  # the cancelled run gave up its place

    at = train_page(cifar)
    assert any("#1 in the queue" in visible(i.value) for i in at.info)
    run = runs.load_run(first)
    wait_until(lambda: any(r["event"] == "step" for r in runs.read_metrics(run)), "the first run's training")
    os.kill(run.status["pid"], signal.SIGKILL)
    failed = wait_until(lambda: ended(first), "the killed run's report")
    assert failed.state == runs.FAILED and "SIGKILL" in failed.error
    assert runs.load_run(second).state == runs.CANCELLED  # never started

    diverged = wait_until(lambda: ended(absurd), "the diverging run")  # started when the killed one was reported
    assert diverged.state == runs.FAILED
    assert "smaller learning rate" in diverged.error and "diverged" in diverged.error
    at.run()  # the app keeps serving and explains both
    assert not at.exception, [e.value for e in at.exception]
    errors = visible("\n".join(e.value for e in at.error))
    assert "SIGKILL" in errors and "smaller learning rate" in errors
    assert f"{first} (your run)" not in at.selectbox(key="checkpoint_label").options


def test_weight_decay_coupling_is_explicit():
    """fastnet's recipe fixes the decay per step (lr x coefficient): another lr keeps it; coefficient mode does not."""
    import dataclasses
    import json

    from cifarviz.core.models import create_model
    from cifarviz.core.recipes import RECIPES
    from cifarviz.core.train import build_optimizer

    fastnet = RECIPES["fastnet"]
    shipped = json.loads((REPO / "checkpoints" / "fastnet.json").read_text())["train_config"]
    assert fastnet.decay_coefficient == shipped["weight_decay"]  # the shipped checkpoint's own optimiser setting
    assert TrainConfig(**shipped).decay_coefficient == shipped["weight_decay"]  # old configs: coefficient mode
    slower = dataclasses.replace(fastnet, lr=fastnet.lr / 2)
    assert slower.lr * slower.decay_coefficient == pytest.approx(fastnet.lr * fastnet.decay_coefficient)
    plain = dataclasses.replace(fastnet, weight_decay_mode="coefficient", weight_decay=shipped["weight_decay"])
    assert dataclasses.replace(plain, lr=plain.lr / 2).decay_coefficient == shipped["weight_decay"]
    model = create_model("fastnet", widths=[8, 16, 16])
    groups = build_optimizer(model, slower).param_groups
    assert [g["weight_decay"] * g["lr_scale"] for g in groups] == pytest.approx([slower.decay_coefficient] * len(groups))
    with pytest.raises(CifarvizError, match="weight_decay_mode"):
        TrainConfig(weight_decay_mode="per_epoch")


@pytest.mark.slow
def test_a_configuration_sent_to_the_form_fills_it(cifar, runs_root):
    """The Tune tab (or anything else) hands the form a TrainConfig dict; nothing starts until Start."""
    from cifarviz.core.recipes import RECIPES

    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = str(cifar.root)
    at.session_state["train_config_request"] = {**RECIPES["fastnet"].to_dict(), "lr": 0.75, "batch_size": 768}
    at.session_state["train_tabs"] = "Tune"  # the button is on the Tune tab; the form is on the Train tab
    at.run()
    at.switch_page("pages/train.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["train_tabs"] == "Train"
    assert at.selectbox(key="tr_model").value == "fastnet" and at.number_input(key="tr_lr").value == 0.75
    assert at.select_slider(key="tr_batch_size").value == 768 and at.radio(key="tr_weight_decay_mode").value == "per_step"
    coefficient = RECIPES["fastnet"].weight_decay / 0.75
    assert any(f"coefficient {coefficient:.4g}" in c.value for c in at.caption)
    assert any("widths [48, 192, 192]" in c.value for c in at.caption)
    assert runs.list_runs() == []


def test_the_engine_saves_a_snapshot_per_epoch_on_request(cifar_small, tmp_path):
    from cifarviz.core.recipes import train_and_save

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the app's workers do: on 2 shared cores, 2 threads wait for each other
    try:
        path, result = train_and_save(lenet(epochs=2), cifar_small, tmp_path / "final", snapshot_dir=tmp_path / "epochs")
    finally:
        torch.set_num_threads(threads)
    snapshots = sorted((tmp_path / "epochs").glob("*.safetensors"))
    assert [p.name for p in snapshots] == ["epoch-001.safetensors", "epoch-002.safetensors"]
    first, last, final = (load_checkpoint(p) for p in (*snapshots, path))
    assert first.meta["epoch"] == 1 and first.meta["history"] == result.history[:1] and "metrics" not in first.meta
    assert all(torch.equal(v, final.model.state_dict()[k]) for k, v in last.model.state_dict().items())
    assert not all(torch.equal(v, final.model.state_dict()[k]) for k, v in first.model.state_dict().items())


def test_the_cli_lists_stops_and_cancels(cifar, runs_root, capsys, monkeypatch):
    from cifarviz.cli import main

    monkeypatch.setenv("CIFARVIZ_MAX_RUNS", "0")  # no worker on this machine: the run waits
    waiting = runs.submit_training(lenet(), cifar.root)
    assert main(["runs"]) == 0 and f"{waiting}" in (out := capsys.readouterr().out) and "#1 in the queue" in out
    assert main(["runs", "stop"]) == 2 and "RUN_ID" in capsys.readouterr().err
    assert main(["runs", "cancel", "lenet-nope"]) == 2 and "No run 'lenet-nope'" in capsys.readouterr().err
    assert main(["runs", "stop", waiting]) == 0 and "cancelled" in capsys.readouterr().out  # a queued run: cancelled
    assert main(["runs", "--json"]) == 0
    import json

    [row] = json.loads(capsys.readouterr().out)
    assert row["id"] == waiting and row["state"] == "cancelled" and row["checkpoint"] is None


def test_bad_requests_get_one_clear_message(cifar, runs_root, monkeypatch):
    with pytest.raises(CifarvizError, match="lr"):
        runs.submit_training({"model": "lenet", "lr": -1}, cifar.root)
    with pytest.raises(CifarvizError, match="subset"):
        runs.submit_training(lenet(), cifar.root, subset=0)
    with pytest.raises(CifarvizError, match="No run 'nope'"):
        runs.request_stop("nope")
    monkeypatch.setenv("CIFARVIZ_MAX_RUNS", "none")
    with pytest.raises(CifarvizError, match="CIFARVIZ_MAX_RUNS='none'"):
        runs.submit_training(lenet(), cifar.root)
    monkeypatch.setenv("CIFARVIZ_MAX_RUNS", "0")
    monkeypatch.setenv("CIFARVIZ_MAX_QUEUED", "1")
    waiting = runs.submit_training(lenet(), cifar.root)
    with pytest.raises(CifarvizError, match="1 run.s. are already waiting"):
        runs.submit_training(lenet(), cifar.root)
    assert [r.id for r in runs.list_runs()] == [waiting]
