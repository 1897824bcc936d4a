import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def run(*args, env_extra=None, cwd=REPO):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "cifarviz", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_help_explains_every_command():
    out = run("--help").stdout
    for command in ("data", "models", "train", "evaluate", "export-features"):
        assert command in out
    train_help = run("train", "--help").stdout
    assert "--lr" in train_help and "--recipe" in train_help and "--translate" in train_help


def test_models_list_and_summary():
    listing = run("models").stdout
    assert "fastnet" in listing and "s8net-ln" in listing
    summary = run("models", "summary", "s8net-bn")
    assert summary.returncode == 0 and "Total params: 37,664" in summary.stdout


def test_data_describes_the_real_copy(cifar):
    result = run("data", "--data", str(cifar.root), "--json")
    info = json.loads(result.stdout)
    assert info["sizes"] == {"train": 45000, "val": 5000, "test": 10000}
    assert info["per_class"]["test"]["cat"] == 1000


def test_missing_data_is_one_clear_line(tmp_path):
    result = run("data", "--data", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr and "CIFARVIZ_DATA" in result.stderr


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


def test_train_writes_a_checkpoint(cifar, tmp_path):
    out = tmp_path / "tiny.safetensors"
    result = run("train", "--model", "cifar10net", "--epochs", "1", "--batch-size", "256", "--lr", "0.002",
                 "--optimizer", "adam", "--data", str(cifar.root), "--out", str(out))
    assert result.returncode == 0, result.stderr
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["architecture"] == "cifar10net" and meta["train_config"]["lr"] == 0.002
    assert meta["metrics"]["test_accuracy"] > 0.3


def test_bad_checkpoint_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    result = run("evaluate", "--checkpoint", str(bad))
    assert result.returncode == 2 and "bad.safetensors" in result.stderr and "Traceback" not in result.stderr


def test_precompute_warms_the_app_caches(cifar):
    from cifarviz.artifacts import artifact_path
    from cifarviz.checkpoint import load_checkpoint

    result = run("precompute", "-c", "lenet", "--data", str(cifar.root))
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert [line[1] for line in lines] == ["test", "val", "train"]
    checkpoint = load_checkpoint(REPO / "checkpoints" / "lenet.safetensors")
    assert all(artifact_path(checkpoint, cifar, split).is_file() for split in ("test", "val", "train"))
    again = run("precompute", "-c", "lenet", "--data", str(cifar.root))
    assert again.stdout.count("already cached") == 3
