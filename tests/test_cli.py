import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def run(*args, env_extra=None, cwd=REPO):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "cifarviz", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.mark.slow
def test_help_explains_every_command():
    out = run("--help").stdout
    for command in ("data", "models", "train", "evaluate", "export-features"):
        assert command in out
    train_help = run("train", "--help").stdout
    assert "--lr" in train_help and "--recipe" in train_help and "--translate" in train_help


@pytest.mark.slow
def test_models_list_and_summary():
    listing = run("models").stdout
    assert "fastnet" in listing and "s8net-ln" in listing
    # every row's parameter count ends in one column, the longest shipped name's row too (cifar10net-dropout)
    ends = {line.index(number) + len(number) for line in listing.splitlines()[1:]
            for number in re.findall(r" (\d{1,3}(?:,\d{3})+|\d+)  ", line)[:1]}
    assert len(ends) == 1, listing
    summary = run("models", "summary", "s8net-bn")
    assert summary.returncode == 0 and "Total params: 37,664" in summary.stdout


@pytest.mark.slow
def test_data_describes_the_real_copy(cifar):
    result = run("data", "--data", str(cifar.root), "--json")
    info = json.loads(result.stdout)
    assert info["sizes"] == {"train": 45000, "val": 5000, "test": 10000}
    assert info["per_class"]["test"]["cat"] == 1000


@pytest.mark.slow
def test_missing_data_is_one_clear_line(tmp_path):
    result = run("data", "--data", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr and "CIFARVIZ_DATA" in result.stderr


@pytest.mark.slow
def test_evaluate_and_export_features(cifar, tmp_path):
    result = run("evaluate", "--checkpoint", "lenet", "--data", str(cifar.root), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    stored = json.loads((REPO / "checkpoints" / "lenet.json").read_text())["metrics"]["test_accuracy"]
    assert abs(report["accuracy"] - stored) < 0.002
    assert len(report["per_class"]) == 10 and np.array(report["confusion_matrix"]).sum() == 10000
    out = tmp_path / "f.npz"
    result = run("export-features", "-c", "lenet", "--data", str(cifar.root), "--split", "val", "--out", str(out))
    assert result.returncode == 0, result.stderr
    with np.load(out) as z:
        assert z["features"].shape == (5000, 84) and z["logits"].shape == (5000, 10) and len(z["labels"]) == 5000


@pytest.mark.slow
def test_train_writes_a_checkpoint(cifar, tmp_path):
    out = tmp_path / "tiny.safetensors"
    result = run("train", "--model", "cifar10net", "--epochs", "1", "--batch-size", "256", "--lr", "0.002",
                 "--optimizer", "adam", "--data", str(cifar.root), "--out", str(out))
    assert result.returncode == 0, result.stderr
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["architecture"] == "cifar10net" and meta["train_config"]["lr"] == 0.002
    assert meta["metrics"]["test_accuracy"] > 0.3


@pytest.mark.slow
def test_bad_checkpoint_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    result = run("evaluate", "--checkpoint", str(bad))
    assert result.returncode == 2 and "bad.safetensors" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_precompute_warms_the_app_caches(cifar):
    from cifarviz.core.checkpoint import load_checkpoint
    from cifarviz.store.artifacts import artifact_path

    # --influence head: lenet's default, the ensemble of its 20 models, takes minutes (test_ensemble.py)
    result = run("precompute", "-c", "lenet", "--influence", "head", "--data", str(cifar.root))
    assert result.returncode == 0, result.stderr
    from cifarviz.analysis.influence import index_path

    lines = [line.split() for line in result.stdout.splitlines()]
    # artifacts, the influence index, then the Embeddings page's default map
    assert [line[1] for line in lines] == ["test", "val", "train", "head", "tsne"]
    checkpoint = load_checkpoint(REPO / "checkpoints" / "lenet.safetensors")
    assert all(artifact_path(checkpoint, cifar, split).is_file() for split in ("test", "val", "train"))
    assert index_path("head", checkpoint, cifar).is_file()
    again = run("precompute", "-c", "lenet", "--influence", "head", "--data", str(cifar.root))
    assert again.stdout.count("already cached") == 5


# ----------------------------------------------------------------- in-process: cifarviz.cli.main([...])

import csv
import io

import pytest
import torch

from cifarviz.analysis.summary import model_for_summary
from cifarviz.cli import build_parser, load_named_checkpoint, main, safe_stem
from cifarviz.core.checkpoint import load_checkpoint, read_metadata, save_checkpoint, shipped_file, shipped_files
from cifarviz.core.errors import CheckpointError
from cifarviz.core.models import create_model
from cifarviz.store.artifacts import split_artifacts

FILE_IN_THE_WAY = "FILE_IN_THE_WAY"  # replaced by a path whose "folder" is a regular file

BAD_TRAIN_ARGUMENTS = [  # (flags, text the one-line error must contain)
    (["--momentum", "-1"], "--momentum"),
    (["--label-smoothing", "2"], "--label-smoothing"),
    (["--translate", "-3"], "--translate"),
    (["--translate", "40"], "--translate"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "nan"], "--lr"),
    (["--device", "tpu"], "--device"),
    (["--model-args", "{bad json"], "--model-args"),
    (["--model-args", "[32, 128, 128]"], "--model-args"),
    (["--model-args", '{"widths": [8, 8, 8]}'], "--model-args"),  # lenet has no widths
    (["--val-size", "-1"], "--val-size"),
    (["--out", FILE_IN_THE_WAY], "--out"),
]


@pytest.mark.parametrize("flags, named", BAD_TRAIN_ARGUMENTS, ids=[" ".join(f) for f, _ in BAD_TRAIN_ARGUMENTS])
def test_bad_train_arguments_fail_before_any_data_is_loaded(flags, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would land here
    (tmp_path / "a-file").write_text("not a folder")
    flags = [str(tmp_path / "a-file" / "model.safetensors") if f == FILE_IN_THE_WAY else f for f in flags]
    # The data folder does not exist: had loading begun, the error would be about the data instead.
    code = main(["train", "--model", "lenet", "--data", str(tmp_path / "no-data"), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error:" in err and named in err and "Traceback" not in err
    assert "CIFAR-10" not in err  # no data was looked for
    assert not list(tmp_path.rglob("*.safetensors"))


def test_too_large_val_size_is_refused_before_training(cifar, tmp_path, capsys):
    out = tmp_path / "never.safetensors"
    code = main(["train", "--model", "lenet", "--data", str(cifar.root), "--val-size", "100000", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--val-size" in err and "49,999" in err and not out.exists()


def test_usage_errors_return_2_in_process(capsys):
    assert main(["train", "--momentum", "lots"]) == 2
    assert "invalid float value" in capsys.readouterr().err


def test_models_shows_shipped_fastnet_as_shipped(capsys):
    shipped = read_metadata(REPO / "checkpoints" / "fastnet.safetensors")
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["fastnet"]["parameters"] == sum(p.numel() for p in create_model("fastnet").parameters())
    [checkpoint] = rows["fastnet"]["checkpoints"]
    assert checkpoint["parameters"] == shipped["parameters"] and checkpoint["arch_args"]["widths"] == shipped["arch_args"]["widths"]
    assert rows["resnet18"]["checkpoints"] == []
    assert main(["models"]) == 0
    assert f"{shipped['parameters']:,}" in capsys.readouterr().out
    for argv in (["models", "summary", "fastnet"], ["models", "summary", "-c", str(REPO / "checkpoints" / "fastnet.safetensors")]):
        assert main(argv) == 0
        assert f"Total params: {shipped['parameters']:,}" in capsys.readouterr().out


def test_model_for_summary_builds_the_checkpoint_architecture_without_memory():
    model = model_for_summary("fastnet")
    assert model.arch_args["widths"] == [48, 192, 192] and next(model.parameters()).is_meta
    real = create_model("fastnet", widths=[48, 192, 192])
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in real.parameters())
    assert model_for_summary("cifar10net-small").arch_args["fc1"] == 32  # not shipped: zoo defaults


@pytest.mark.parametrize("stored, expected", [
    ("../../escaped", "escaped"), ("/etc/passwd", "passwd"), ("..", "fallback"), ("C:\\evil\\x", "x"),
    ("my run 1", "my_run_1"), ("fastnet", "fastnet"),
])  # fmt: skip
def test_safe_stem_keeps_only_a_plain_file_name(stored, expected):
    assert safe_stem(stored, fallback="fallback") == expected


def test_export_features_default_path_stays_in_the_working_folder(cifar, tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "store" / "evil.safetensors", create_model("lenet"), {"name": "../../escaped"})
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    assert main(["export-features", "-c", str(path), "--data", str(cifar.root), "--split", "val"]) == 0
    assert [p.name for p in work.iterdir()] == ["escaped-val-features.npz"]
    assert not list((tmp_path / "a").glob("*.npz")) and not list(tmp_path.glob("*.npz"))


@pytest.mark.slow
def test_arch_picks_the_architecture_of_an_ambiguous_state_dict(cifar, tmp_path, capsys):
    # s8net-gn and s8net-ln have the same tensor names and shapes; only --arch can tell them apart.
    pt = tmp_path / "ln.pt"
    torch.save(load_named_checkpoint("s8net-ln").model.state_dict(), pt)
    assert load_named_checkpoint(str(pt), "s8net-gn").model.arch_name == "s8net-gn"
    assert main(["evaluate", "-c", str(pt)]) == 2  # cifarviz will not guess between them
    assert "--arch" in capsys.readouterr().err
    assert main(["evaluate", "-c", str(pt), "--arch", "s8net-ln", "--data", str(cifar.root), "--json"]) == 0
    stored = read_metadata(REPO / "checkpoints" / "s8net-ln.safetensors")["metrics"]["test_accuracy"]
    assert abs(json.loads(capsys.readouterr().out)["accuracy"] - stored) < 0.002
    for command in ("evaluate", "export-features", "precompute"):
        assert build_parser().parse_args([command, "-c", str(pt), "--arch", "s8net-ln"]).arch == "s8net-ln"
    assert main(["evaluate", "-c", "lenet", "--arch", "s8net-ln"]) == 2  # a safetensors file names its own
    assert "--arch" in capsys.readouterr().err


@pytest.mark.slow
def test_help_names_every_command_in_its_description():
    import argparse

    [commands] = [a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"runs", "serve", "tune", "embed", "export"} <= set(commands)
    out = run("--help").stdout
    listed = " ".join(out.split("Commands: ", 1)[1].split(".", 1)[0].split())  # the description's list, unwrapped
    assert listed.split(", ") == list(commands)


@pytest.mark.slow
def test_evaluate_prints_the_confusion_matrix_with_class_headers(cifar, capsys):
    assert main(["evaluate", "-c", "lenet", "--data", str(cifar.root), "--json"]) == 0
    confusion = json.loads(capsys.readouterr().out)["confusion_matrix"]
    assert main(["evaluate", "-c", "lenet", "--data", str(cifar.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("confusion matrix (rows: true, columns: predicted)")
    header, rows = lines[at + 1], lines[at + 2 : at + 2 + len(cifar.classes)]
    legend_line = lines[at + 2 + len(cifar.classes)]  # "columns: airplan = airplane, ..."
    legend = dict(part.split(" = ") for part in legend_line.removeprefix("columns: ").split(", "))
    assert [legend.get(label, label) for label in header.split()] == list(cifar.classes)
    assert all(full.startswith(short) for short, full in legend.items())
    for name, line, counts in zip(cifar.classes, rows, confusion):
        assert line.split() == [name, *map(str, counts)]
    assert max(map(len, [header, *rows])) <= 100


@pytest.mark.slow
def test_influence_shows_the_test_image_s_prediction(cifar, capsys):
    probs = split_artifacts(load_named_checkpoint("lenet"), cifar, "test").probs[7]
    predicted, confidence = cifar.classes[probs.argmax()], float(probs.max())
    # head: the cheapest attribution index for lenet (its default, an ensemble of 20 models, takes minutes)
    argv = ["influence", "-c", "lenet", "--test-index", "7", "--method", "head", "--k", "3", "--data", str(cifar.root)]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"(true label {cifar.classes[cifar.test.labels[7]]}, predicted {predicted} with {confidence:.0%} " \
           "confidence)" in first
    assert main([*argv, "--json"]) == 0
    query = json.loads(capsys.readouterr().out)["query"]
    assert query == {"test_index": 7, "label": cifar.classes[cifar.test.labels[7]], "predicted": predicted,
                     "confidence": confidence}


def test_load_checkpoint_takes_a_shipped_name(tmp_path, monkeypatch):
    by_name, by_path = load_checkpoint("fastnet"), load_checkpoint(shipped_file("fastnet"))
    assert by_name.path == by_path.path == shipped_file("fastnet")
    named, pathed = by_name.model.state_dict(), by_path.model.state_dict()
    assert named.keys() == pathed.keys() and all(torch.equal(named[k], pathed[k]) for k in named)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint("fastnett")
    assert "fastnett" in str(error.value) and all(p.stem in str(error.value) for p in shipped_files())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lenet").write_bytes(b"a file of that name")  # a file here is that file, not the shipped one
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        load_checkpoint("lenet")
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        load_checkpoint("fastnet", data=b"uploaded bytes")  # an upload's name is only its name
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        load_checkpoint("sub/fastnet")  # a path, not a name


def read_csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_export_a_confusion_cell(cifar, tmp_path, capsys):
    arts = split_artifacts(load_named_checkpoint("lenet"), cifar, "test")
    cat, dog = cifar.classes.index("cat"), cifar.classes.index("dog")
    out = tmp_path / "exports" / "cat-as-dog.csv"
    data = ["--data", str(cifar.root)]
    cell = ["export", "-c", "lenet", "--what", "cell", "--true", "cat", "--pred", "dog", *data]
    assert main([*cell, "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    rows = read_csv(out.read_text())
    assert len(rows) == int(((arts.labels == cat) & (arts.predicted == dog)).sum()) > 0
    assert {(r["label"], r["prediction"], r["split"]) for r in rows} == {("cat", "dog", "test")}
    confidences = [float(r["confidence"]) for r in rows]
    assert confidences == sorted(confidences, reverse=True)  # as the Evaluate page: most confident first
    assert [float(arts.probs[int(r["index"]), dog]) for r in rows] == confidences
    assert [p.name for p in out.parent.iterdir()] == ["cat-as-dog.csv"]  # written atomically: no temporary left
    assert main([*cell, "--top", "3", "--format", "json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["about"]["images_in_cell"] == len(rows)
    assert [str(image["index"]) for image in exported["images"]] == [r["index"] for r in rows[:3]]


@pytest.mark.parametrize("flags, named", [
    (["--true", "kat", "--pred", "dog"], "'kat' (--true)"), (["--true", "cat", "--pred", "Dog"], "'Dog' (--pred)"),
])  # fmt: skip
def test_export_refuses_an_unknown_class(cifar, tmp_path, capsys, flags, named):
    out = tmp_path / "never.csv"
    assert main(["export", "-c", "lenet", "--what", "cell", *flags, "-o", str(out), "--data", str(cifar.root)]) == 2
    err = capsys.readouterr().err
    assert named in err and ", ".join(cifar.classes) in err and "Traceback" not in err and not out.exists()


def test_export_the_most_confident_mistakes(cifar, capsys):
    arts = split_artifacts(load_named_checkpoint("lenet"), cifar, "val")
    assert main(["export", "-c", "lenet", "--what", "mistakes", "--split", "val", "--top", "30", "--format", "json",
                 "--data", str(cifar.root)]) == 0
    exported = json.loads(capsys.readouterr().out)
    images = exported["images"]
    assert exported["about"]["mistakes"] == int((arts.predicted != arts.labels).sum()) and len(images) == 30
    assert all(i["label"] != i["prediction"] and i["split"] == "val" for i in images)
    confidences = [i["confidence"] for i in images]
    wrong = arts.predicted != arts.labels
    assert confidences == sorted(confidences, reverse=True) and confidences[0] == float(arts.probs[wrong].max())


def test_export_suspicious_images_by_training_loss(cifar, capsys):
    # --ranking training-loss needs no influence index: fast even for lenet, whose default index is an ensemble
    assert main(["export", "-c", "lenet", "--what", "suspicious", "--ranking", "training-loss", "--top", "20",
                 "--data", str(cifar.root)]) == 0
    rows = read_csv(capsys.readouterr().out)
    probs = split_artifacts(load_named_checkpoint("lenet"), cifar, "train").probs
    losses = [float(r["training_loss"]) for r in rows]
    assert len(rows) == 20 and losses == sorted(losses, reverse=True)
    for row, loss in zip(rows, losses):
        i = int(row["index"])
        assert row["split"] == "train" and row["label"] == cifar.classes[cifar.train.labels[i]]
        assert loss == pytest.approx(-np.log(probs[i, cifar.train.labels[i]]), rel=1e-4)
    assert main(["export", "-c", "lenet", "--what", "suspicious", "--split", "test"]) == 2  # before any data
    assert "--split" in capsys.readouterr().err


@pytest.mark.slow
def test_export_the_influence_of_training_images_on_a_test_image(cifar, capsys):
    data = ["--data", str(cifar.root)]
    # head, the cheapest attribution index for lenet, as in test_precompute_warms_the_app_caches
    assert main(["influence", "-c", "lenet", "--test-index", "7", "--method", "head", "--k", "4", "--json", *data]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert main(["export", "-c", "lenet", "--what", "influence", "--test-index", "7", "--method", "head", "--top", "4",
                 "--format", "json", *data]) == 0
    exported = json.loads(capsys.readouterr().out)
    images = exported["images"]
    assert [(i["effect"], i["index"], i["source_index"], i["label"], i["prediction"], i["score"]) for i in images] == [
        (effect, e["train_index"], e["source_index"], e["label"], e["predicted"], e["score"])
        for effect in ("helpful", "harmful") for e in expected[effect]]
    about = exported["about"]
    assert about["method"] == "head" and about["split"] == "train"
    assert about["test_image"]["index"] == 7 and about["test_image"]["prediction"] == expected["query"]["predicted"]
    assert main(["export", "-c", "lenet", "--what", "influence", "--test-index", "7", "--method", "head", "--top", "4",
                 *data]) == 0
    assert [r["effect"] for r in read_csv(capsys.readouterr().out)] == ["helpful"] * 4 + ["harmful"] * 4


HOSTILE_NAMES = ["\x1b]0;pwned\x07\x1b[2Jcleared", "\x9b31mred", "abc\u202edcba", "bell\x07\x08back", "nul\x00x"]


@pytest.mark.slow
def test_names_from_files_never_reach_the_terminal_as_control_characters(tmp_path):
    """The rule (cli.InertStream, written once): whatever the CLI writes, control characters, C1 escapes and
    bidirectional overrides from names read from files come out as visible escapes, never obeyed. Every hostile
    name at once, in one folder name (a file name cannot hold NUL; the checkpoint's recorded name does)."""
    name = "|".join(HOSTILE_NAMES)
    folder = tmp_path / name.replace("\x00", "")
    folder.mkdir()
    path = save_checkpoint(folder / "model.safetensors", create_model("lenet"), {"name": name})
    done = run("models", "summary", "-c", str(path))
    assert done.returncode == 0, done.stderr
    missing = run("evaluate", "-c", str(folder / "absent.safetensors"))
    assert missing.returncode == 2 and "error:" in missing.stderr
    for text in (done.stdout, done.stderr, missing.stdout, missing.stderr):
        assert not any(c in text for c in "\x1b\x9b\x07\x08\x00\u202e"), repr(text[:300])
    shown = folder.name.translate(__import__("cifarviz.cli", fromlist=["_INERT_TABLE"])._INERT_TABLE)
    assert shown in done.stdout and shown in missing.stderr  # the name is there, as visible escapes


@pytest.mark.slow
def test_a_huge_message_is_cut_and_says_how_long_it_was(tmp_path):
    done = run("evaluate", "-c", "x" * 200 + "/" + "y" * 30_000)
    assert done.returncode == 2
    assert len(done.stderr) < 2_300 and "characters)" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly(tmp_path):
    """`python -m cifarviz ... | head -1` stops without a traceback (the rest of the output has no reader)."""
    reader = subprocess.Popen([sys.executable, "-m", "cifarviz", "models"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=REPO)
    reader.stdout.readline()
    reader.stdout.close()  # as head does after its line
    _, err = reader.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err


def test_a_finished_training_whose_save_fails_keeps_its_weights_and_says_where(cifar_small, tmp_path, monkeypatch):
    from cifarviz.core import recipes
    from cifarviz.core.train import TrainConfig

    real_save = recipes.save_checkpoint

    def full_disk(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "out")):
            raise OSError(28, "No space left on device", str(path))
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(recipes, "save_checkpoint", full_disk)
    monkeypatch.setattr(recipes.tempfile, "gettempdir", lambda: str(tmp_path / "kept"))
    (tmp_path / "kept").mkdir()
    config = TrainConfig(model="lenet", epochs=1, batch_size=64, seed=0)
    with pytest.raises(CheckpointError, match="No space left on device") as error:
        recipes.train_and_save(config, cifar_small, tmp_path / "out" / "m.safetensors")
    kept = list((tmp_path / "kept").glob("*.safetensors"))
    assert len(kept) == 1 and str(kept[0]) in str(error.value)
    assert load_checkpoint(kept[0]).model is not None  # the trained weights, loadable
