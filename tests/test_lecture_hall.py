"""A lecture hall on one server: runs that belong to someone, files that cannot break a page, bounded work, names
shown as text, documented inputs that never give a traceback, and the study database's trouble said in seconds.

Each test is a case a class of students, or one curious student, broke before (issue 16)."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, visible, write_image_folder
from streamlit.testing.v1 import AppTest
from test_app import run_until

from cifarviz.core.checkpoint import save_checkpoint
from cifarviz.core.models import create_model
from cifarviz.core.train import TrainConfig
from cifarviz.services import runs, tune
from cifarviz.ui.identity import owner_id
from cifarviz.ui.text import md, shown

HOSTILE_NAME = "![x](http://127.0.0.1:9/x.png) **bold** :red[alert] $\\frac{1}{0}$ \u202eabc"
HOSTILE_CLASSES = ("**bold**", ":red[alert]", "$\\frac{1}{0}$")


def lenet() -> TrainConfig:
    return TrainConfig(model="lenet", epochs=1, batch_size=64)


def hand_made_run(root: Path, name: str, config: dict | None = None, status: dict | str | None = None,
                  metrics: list[str] | None = None) -> Path:
    """A run folder written as a hand (or a bug, or a student with a shell) would: anything at all."""
    folder = root / name
    folder.mkdir(parents=True)
    status = {"state": "completed", "queued_at": time.time(), "ended_at": time.time()} if status is None else status
    (folder / "status.json").write_text(status if isinstance(status, str) else json.dumps(status))
    config = {"kind": "train", "spec": {"train_config": lenet().to_dict()},
              "owner": "someone"} if config is None else config
    (folder / "config.json").write_text(json.dumps(config))
    if metrics is not None:
        (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics))
    return folder


# --------------------------------------------------------------------------- runs belong to someone


def test_every_limit_is_checked_where_a_run_is_submitted(cifar, runs_root, monkeypatch):
    """Eight submits at once by one person with a limit of 3: exactly 3 are queued (the check is under the queue
    lock, not on the page); another person still can; nobody stops or cancels someone else's run."""
    monkeypatch.setenv("CIFARVIZ_SESSION_RUNS", "3")
    monkeypatch.setenv("CIFARVIZ_MAX_RUNS", "0")  # no worker here: every run waits
    accepted, refused = [], []

    def submit():
        try:
            accepted.append(runs.submit_training(lenet(), cifar.root, owner="alice"))
        except runs.RunError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(accepted) == 3 and len(refused) == 5 and all("at most 3 per person" in m for m in refused)
    bobs = runs.submit_training(lenet(), cifar.root, owner="bob")

    with pytest.raises(runs.RunError, match="belongs to someone else"):
        runs.cancel(accepted[0], by="bob")
    with pytest.raises(runs.RunError, match="belongs to someone else"):
        runs.request_stop(accepted[0], by="bob")
    assert runs.load_run(accepted[0]).state == runs.QUEUED
    assert runs.cancel(bobs, by="bob") == runs.CANCELLED  # one's own
    assert runs.cancel(accepted[0]) == runs.CANCELLED  # the operator (command line) or the teacher: any run
    assert runs.submit_training(lenet(), cifar.root, owner="alice")  # room again


@pytest.fixture
def busy_slot(runs_root, monkeypatch):
    """No worker on this machine (queued runs stay queued), and a run shown as running on another machine."""
    monkeypatch.setenv("CIFARVIZ_MAX_RUNS", "0")
    hand_made_run(runs_root, "slot-holder", status={"state": "running", "pid": 1, "queued_at": 0.0,
                                                    "worker": "gpu-box-1", "host": "gpu-box"},
                  config={"kind": "train", "owner": "the-teacher's-browser",
                          "spec": {"train_config": lenet().to_dict()}})
    yield "slot-holder"


def test_the_train_page_lets_only_the_owner_and_the_teacher_cancel(cifar, runs_root, busy_slot, monkeypatch):
    monkeypatch.setenv("CIFARVIZ_TEACHER_KEY", "correct horse battery")
    teacher_run = runs.submit_training(lenet(), cifar.root, owner="the-teacher's-browser")

    def train_page() -> AppTest:
        at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=300)
        at.session_state["_data_root"] = str(cifar.root)
        at.run()
        at.switch_page("pages/train.py").run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    student = train_page()
    cancel = student.button(key=f"cancel-{teacher_run}")
    assert cancel.disabled and "Someone else's run" in cancel.help
    assert student.button(key=f"stop-{busy_slot}").disabled
    student.text_input(key="teacher_key_typed").set_value("a guess").run()
    assert any("not this server's teacher key" in e.value for e in student.error)
    assert student.button(key=f"cancel-{teacher_run}").disabled

    teacher = train_page()
    teacher.text_input(key="teacher_key_typed").set_value("correct horse battery").run()
    assert not teacher.exception
    assert not teacher.button(key=f"stop-{busy_slot}").disabled
    teacher.button(key=f"cancel-{teacher_run}").click().run()
    assert runs.load_run(teacher_run).state == runs.CANCELLED


def test_a_viewer_id_is_a_hash_of_the_browsers_token():
    token = "0123456789abcdef0123456789abcdef"
    assert owner_id(token) == owner_id(token) != owner_id("f" * 32) and token not in owner_id(token)


# --------------------------------------------------------------------------- only the project's own workers


def test_a_queued_run_of_an_unknown_kind_is_flagged_and_never_run(cifar, runs_root):
    with pytest.raises(runs.RunError, match="Unknown kind of run"):
        runs.submit("this", {}, name="x")
    with pytest.raises(TypeError):
        runs.submit("train", {}, name="x", target="builtins:print")  # there is no target to name any more
    queued = hand_made_run(runs_root, "evil-queued", config={"kind": "builtins:print", "spec": {}},
                           status={"state": "queued", "queued_at": time.time()})
    run = runs.load_run("evil-queued")
    assert run.state == runs.FAILED and any("unknown kind" in p for p in run.problems)
    assert not (queued / "worker.log").exists()


def test_every_kind_the_app_queues_has_its_worker():
    from cifarviz.services import retrain
    from cifarviz.services.work import replicas, study, train

    assert set(runs.KINDS) == {"train", "retrain-without", "tune", "replica"}
    assert runs.KINDS[retrain.KIND].function is retrain.retrain_worker and runs.KINDS["train"].function is \
        train.train_worker and runs.KINDS[study.KIND].function is study.study_worker and \
        runs.KINDS[replicas.KIND].function is replicas.replica_worker


# --------------------------------------------------------------------------- damaged run files


DAMAGED = {
    "bad-queued-at": {"state": "completed", "queued_at": "abc"},
    "bad-error": {"state": "failed", "error": 5, "queued_at": 1.0},
    "bad-ended-at": {"state": "completed", "ended_at": "yesterday", "queued_at": 2.0},
    "bad-state": {"state": "exploded", "queued_at": 3.0},
    "infinite": {"state": "completed", "queued_at": float("inf")},
    "not-json": "{{{",
}


def test_damaged_run_files_are_flagged_and_the_others_served(cifar, runs_root, busy_slot, capsys):
    from cifarviz.cli import main

    good = runs.submit_training(lenet(), cifar.root, owner="x")
    for name, status in DAMAGED.items():
        text = status if isinstance(status, str) else json.dumps(status)  # json.dumps writes Infinity, as a bug would
        hand_made_run(runs_root, name, status=text)
    step = {"event": "step", "step": 1, "total_steps": 10, "steps_per_epoch": 10, "epoch": 1, "elapsed": 1.0,
            "images_per_s": 100.0, "lr": 0.1, "train_loss": 2.0, "train_acc": 0.1, "loss": 2.0}
    hand_made_run(runs_root, "bad-metrics", status={"state": "running", "pid": 1, "queued_at": 4.0},
                  metrics=["5", "[1, 2]", json.dumps({**step, "images_per_s": "fast"}), json.dumps(step),
                           json.dumps({**step, "step": 0}), "not json"])
    listed = {r.id: r for r in runs.list_runs()}
    assert set(listed) == {good, busy_slot, *DAMAGED, "bad-metrics"}
    for name in DAMAGED:
        assert listed[name].problems, name
    assert listed[good].problems == () and listed[good].state == runs.QUEUED
    progress = runs.progress(listed["bad-metrics"])
    assert progress.damaged_lines == 5 and progress.last["step"] == 1 and len(progress.steps) == 1
    assert len(runs.read_metrics(listed["bad-metrics"])) == 1

    runs.start()  # the queue goes on: nothing raises
    assert main(["runs", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert {r["id"] for r in rows} == set(listed) and next(r for r in rows if r["id"] == "infinite")["problems"]
    assert main(["runs"]) == 0 and "damaged" in capsys.readouterr().out

    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=300)
    at.session_state["_data_root"] = str(cifar.root)
    at.run()
    at.switch_page("pages/train.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(md(good) in i.value for i in at.info)  # the good run is still in the queue
    assert any("damaged" in w.value for w in at.warning)


def test_metrics_are_read_incrementally_and_stay_bounded(runs_root):
    folder = hand_made_run(runs_root, "long", status={"state": "running", "pid": 1, "queued_at": 1.0})
    step = {"event": "step", "total_steps": 10**6, "steps_per_epoch": 1000, "epoch": 1, "elapsed": 1.0,
            "images_per_s": 100.0, "lr": 0.1, "train_loss": 2.0, "train_acc": 0.1}
    with open(folder / "metrics.jsonl", "w") as handle:
        handle.writelines(json.dumps({**step, "step": i}) + "\n" for i in range(1, 20_001))
    run = runs.load_run("long")
    first = runs.progress(run)
    assert first.last["step"] == 20_000 and len(first.steps) < 2 * runs.MAX_CURVE_STEPS
    assert runs.progress(run) is first  # nothing appended: the same summary, nothing parsed again
    with open(folder / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({**step, "step": 20_001}) + "\n" + '{"event": "step", "st')  # one line half-written
    later = runs.progress(run)
    assert later.last["step"] == 20_001 and later.damaged_lines == 0 and first.last["step"] == 20_000
    assert runs._PROGRESS[str(folder / "metrics.jsonl")]["offset"] < (folder / "metrics.jsonl").stat().st_size
    (folder / "metrics.jsonl").write_text(json.dumps({**step, "step": 3}) + "\n")  # replaced: read from the start
    assert runs.progress(run).last["step"] == 3


def test_a_huge_log_is_read_a_bounded_amount_per_refresh(runs_root, monkeypatch):
    """A 1 GB metrics.jsonl took 37 s and 2.8 GB in one read: each refresh now reads READ_PER_TICK bytes at most,
    says how much is left, and a line longer than that (no newline at all) is skipped, not re-read forever."""
    from cifarviz.services.work import records

    monkeypatch.setattr(records, "READ_PER_TICK", 64 * 1024)  # the same rule, at a test's size
    folder = hand_made_run(runs_root, "huge", status={"state": "running", "pid": 1, "queued_at": 1.0})
    step = {"event": "step", "total_steps": 10**6, "steps_per_epoch": 1000, "epoch": 1, "elapsed": 1.0,
            "images_per_s": 100.0, "lr": 0.1, "train_loss": 2.0, "train_acc": 0.1}
    with open(folder / "metrics.jsonl", "w") as handle:
        handle.write("x" * (200 * 1024) + "\n")  # one 200 KB line: three ticks' worth, not a log line
        handle.writelines(json.dumps({**step, "step": i}) + "\n" for i in range(1, 5_001))
    size = (folder / "metrics.jsonl").stat().st_size
    run = runs.load_run("huge")
    seen, ticks = [], 0
    while True:
        ticks += 1
        progress = runs.progress(run)
        seen.append(progress.unread_bytes)
        if not progress.unread_bytes or ticks > 100:
            break
    assert ticks == pytest.approx(size / records.READ_PER_TICK, abs=2)  # bounded per tick, and always moving
    assert seen == sorted(seen, reverse=True) and seen[0] > 0
    assert progress.last["step"] == 5_000 and progress.damaged_lines >= 1


def test_a_run_folder_that_is_a_link_elsewhere_is_not_a_run(runs_root, tmp_path):
    elsewhere = hand_made_run(tmp_path / "other-place", "away", status={"state": "queued", "queued_at": 1.0})
    runs_root.mkdir(parents=True, exist_ok=True)
    (runs_root / "linked").symlink_to(elsewhere, target_is_directory=True)
    assert "linked" not in {r.id for r in runs.list_runs()}
    with pytest.raises(runs.RunError, match="No run 'linked'"):
        runs.load_run("linked")


# --------------------------------------------------------------------------- the study database


def _study(tmp_path, settings=None) -> str:
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="class", direction="minimize")
    study.set_user_attr("settings", tune.StudySettings().to_dict() if settings is None else settings)
    return url


def test_a_busy_study_database_is_said_in_seconds(tmp_path):
    url = _study(tmp_path)
    holder = sqlite3.connect(tmp_path / "optuna.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing, and holding on
    try:
        started = time.monotonic()
        with pytest.raises(tune.TuningError, match="did not answer"):
            tune.stored_settings(url, "class")
        assert time.monotonic() - started < 15  # was 60-66 s
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert tune.stored_settings(url, "class") is not None  # free again: read at once


@pytest.mark.parametrize("settings", [[1, 2], "lr=0.1", {"space": 5}, {"base_config": {"model": "lenet"}, "x": 1}])
def test_stored_study_settings_that_are_not_ours_give_a_message(tmp_path, settings, capsys, monkeypatch):
    from cifarviz.cli import main

    url = _study(tmp_path, settings)
    with pytest.raises(tune.TuningError, match="stored settings are"):
        tune.stored_settings(url, "class")
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--storage", url, "--study", "class", "--trials", "1"]) == 2
    assert "stored settings are" in capsys.readouterr().err


def test_the_tune_tab_says_a_study_has_damaged_settings(cifar_small, tmp_path, monkeypatch):
    import optuna
    from test_tune import tab_script

    monkeypatch.setenv("CIFARVIZ_RUNS", str(tmp_path))
    optuna.create_study(storage=tune.default_storage_url(), study_name=tune.DEFAULT_MODEL).set_user_attr(
        "settings", [1, 2])  # the tab's default study name
    at = AppTest.from_function(tab_script, args=(cifar_small,), default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("stored settings are damaged" in visible(e.value) for e in at.error)


def test_only_its_owner_and_the_teacher_stop_a_study(cifar_small, tmp_path, monkeypatch):
    from test_tune import tab_script

    from cifarviz.services.work import study

    monkeypatch.setenv("CIFARVIZ_RUNS", str(tmp_path))
    monkeypatch.setenv("CIFARVIZ_MAX_RUNS", "0")  # it waits for a worker: the tab shows it all the same
    monkeypatch.setenv("CIFARVIZ_TEACHER_KEY", "correct horse battery")
    theirs = study.submit_study(tune.default_storage_url(), "theirs", tune.StudySettings(subset=300), n_trials=3,
                                dataset=cifar_small, owner="another-browser")  # someone else's, from the app
    at = AppTest.from_function(tab_script, args=(cifar_small,), default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    stop = at.button(key="tune_stop")
    assert stop.disabled and "Someone else's study" in stop.help
    at.session_state["_teacher_key_ok"] = "correct horse battery"  # what typing the key in the sidebar sets
    at.run()
    assert not at.button(key="tune_stop").disabled
    at.button(key="tune_stop").click().run()
    assert runs.load_run(theirs).state == runs.CANCELLED  # a study still waiting: cancelled
    (tmp_path / theirs / "status.json").write_text("[1, 2]")  # a damaged status file: the tab still draws
    at.run()
    assert not at.exception, [e.value for e in at.exception]


def test_typed_storage_urls_never_pile_up_database_engines(tmp_path):
    for i in range(3 * tune.MAX_STORAGES):
        tune.study_names(f"sqlite:///{tmp_path / f'typed-{i}.db'}") if i % 2 else tune.open_storage(
            f"sqlite:///{tmp_path / f'typed-{i}.db'}", tune.READ_WAIT_SECONDS)
    assert len(tune._STORAGES) <= tune.MAX_STORAGES


# --------------------------------------------------------------------------- names are text


def test_names_are_escaped_for_markdown_and_cleaned_for_text():
    assert md("**bold**") == "&#42;&#42;bold&#42;&#42;" and "\u202e" not in shown("a\u202eb") == "ab"
    escaped = md(HOSTILE_NAME)
    assert "![" not in escaped and "](" not in escaped and ":red[" not in escaped and "$\\frac" not in escaped
    assert shown("x" * 500).endswith("…") and len(shown("x" * 500)) == 200


@pytest.fixture
def hostile_folder(tmp_path, monkeypatch):
    """A tiny image folder whose class folders are Markdown, and a checkpoint whose name is an image link."""
    root = write_image_folder(tmp_path / "data", classes=HOSTILE_CLASSES, per_class=(4, 10))
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    monkeypatch.setenv("CIFARVIZ_RUNS", str(runs_dir))
    torch.manual_seed(0)
    save_checkpoint(runs_dir / "hostile.safetensors", create_model("lenet", num_classes=3),
                    {"name": HOSTILE_NAME, "classes": list(sorted(HOSTILE_CLASSES))})
    return root


def _rendered(at) -> list[str]:
    """Every text the page handed to Streamlit's Markdown renderer."""
    found = [e.value for kind in ("markdown", "caption", "subheader", "header", "title", "info", "warning",
                                  "error", "success") for e in getattr(at, kind)]
    return found + [b.label for b in at.button]


@pytest.mark.parametrize("page", ["pages/dataset.py", "pages/evaluate.py", "pages/embeddings.py"])
def test_names_from_files_are_never_rendered(hostile_folder, page):
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=300)
    at.session_state["_data_root"] = str(hostile_folder)
    at.session_state["_checkpoint_label"] = "hostile (your run)"
    at.run()
    at.switch_page(page).run()
    run_until(at, lambda at: len(at.get("progress")) == 0, f"{page} without a progress bar")
    if page == "pages/dataset.py":  # the tab with class names in headers and captions
        at.session_state["dataset_tab"] = "Samples"
        at.run()
    rendered = "\n".join(_rendered(at))
    assert not at.exception, [e.value for e in at.exception]
    for raw in (*HOSTILE_CLASSES, "![x](http", "\u202e"):
        assert raw not in rendered, (page, raw)
    expected = md(HOSTILE_NAME) if page != "pages/dataset.py" else md(HOSTILE_CLASSES[0])
    assert expected in rendered, page


# --------------------------------------------------------------------------- documented inputs


def test_documented_inputs_on_a_tiny_folder_give_messages_not_tracebacks(hostile_folder, tmp_path, capsys):
    """30 test images, 4 per class for training (fewer than the augmentation preview's 8), an empty validation
    split, a negative seed: each gives a message, and the pages keep serving."""
    from cifarviz.cli import main

    checkpoint = str(Path(os.environ["CIFARVIZ_RUNS"]) / "hostile.safetensors")
    cases = [
        (["evaluate", "-c", checkpoint, "--data", str(hostile_folder), "--split", "val", "--val-size", "0"],
         "has no images"),
        (["embed", "-c", checkpoint, "--data", str(hostile_folder), "--seed", "-1"], "seed -1 is out of range"),
        (["embed", "-c", checkpoint, "--data", str(hostile_folder)], "too large for 30 points"),
        (["runs", "stop", "../etc"], "No run '../etc'"),
        (["serve", "--processes", "0"], "--processes must be 1 to"),
        (["tune", "--storage", "nosuchdb://x", "--study", "s", "--trials", "1", "--data", str(hostile_folder)],
         "could not be opened"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        assert words in capsys.readouterr().err, argv

    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=300)
    at.session_state["_data_root"] = str(hostile_folder)
    at.session_state["_checkpoint_label"] = "hostile (your run)"
    at.run()
    at.switch_page("pages/embeddings.py").run()
    run_until(at, lambda at: len(at.get("progress")) == 0, "the Embeddings page without a progress bar")
    assert any("too large for 30 points" in e.value for e in at.error)  # t-SNE's default perplexity, said
    at.switch_page("pages/dataset.py").run()
    at.session_state["dataset_tab"] = "Augmentation"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.get("imgs")) >= 1 or any("original" in c.value for c in at.caption)


def test_in_classroom_mode_a_students_click_computes_only_what_was_prepared(hostile_folder, monkeypatch):
    """A map nobody prepared: the student is told so and nothing starts; the teacher's click computes it."""
    monkeypatch.setenv("CIFARVIZ_CLASSROOM", "1")
    monkeypatch.setenv("CIFARVIZ_DATA", str(hostile_folder))
    monkeypatch.setenv("CIFARVIZ_TEACHER_KEY", "correct horse battery")
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=300)
    at.session_state["_checkpoint_label"] = "hostile (your run)"
    at.session_state["emb_method"] = "pca"
    at.run()
    at.switch_page("pages/embeddings.py").run()
    run_until(at, lambda at: any("classroom mode" in i.value for i in at.info), "the classroom notice")
    assert not at.get("vega_lite_chart") and not at.get("progress")  # no map, and no computation of one
    at.session_state["_teacher_key_ok"] = "correct horse battery"  # the key typed into the sidebar
    at.run()
    run_until(at, lambda at: bool(at.get("vega_lite_chart")), "the teacher's map")


def test_a_shared_server_is_locked_down_by_default(cifar, monkeypatch, tmp_path):
    """Without CIFARVIZ_LOCK_DATA=0, the data folder, CIFAR-10's download and the study database are the
    server's: the boxes are disabled and typed values are ignored."""
    monkeypatch.delenv("CIFARVIZ_LOCK_DATA", raising=False)
    monkeypatch.setenv("CIFARVIZ_DATA", str(cifar.root))
    monkeypatch.setenv("CIFARVIZ_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=300)
    at.session_state["_data_root"] = str(tmp_path / "elsewhere")
    at.run()
    at.switch_page("pages/train.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.text_input(key="data_root").disabled and at.text_input(key="data_root").value == str(cifar.root)
    assert at.text_input(key="tune_storage").disabled
    assert not any(b.key == "download-data" for b in at.button)
