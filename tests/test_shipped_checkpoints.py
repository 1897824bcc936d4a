"""Every number shipped in a checkpoint is re-measured here on the development copy."""

from pathlib import Path

import pytest

from cifarviz.core.checkpoint import load_checkpoint, read_metadata
from cifarviz.core.models import count_parameters
from cifarviz.core.train import evaluate_split

SHIPPED = sorted((Path(__file__).resolve().parent.parent / "checkpoints").glob("*.safetensors"))


def test_checkpoints_are_shipped_and_small():
    names = {p.stem for p in SHIPPED}
    assert {"fastnet", "lenet", "s8net-bn", "s8net-gn", "s8net-ln", "cifar10net", "deepnet-conv", "deepnet-res",
            "deepnet-skip"} <= names
    total = sum(p.stat().st_size + p.with_suffix(".json").stat().st_size for p in SHIPPED)
    assert total < 30e6


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_stored_accuracy_is_reproduced(path, cifar):
    checkpoint = load_checkpoint(path)
    meta = checkpoint.meta
    assert meta["data"]["fingerprint"] == cifar.fingerprint, "measured on other data than the dev copy"
    assert meta["metrics"]["measured_on"]["split"] == "test" and meta["status"] == "completed"
    assert len(meta["history"]) == meta["train_config"]["epochs"]
    measured = evaluate_split(checkpoint.model, cifar.test, checkpoint.tta)["accuracy"]
    assert measured == pytest.approx(meta["metrics"]["test_accuracy"], abs=0.002)


def test_targets_from_the_issue():
    meta = {p.stem: read_metadata(p) for p in SHIPPED}
    fast = meta["fastnet"]
    assert fast["metrics"]["test_accuracy"] >= 0.90 and fast["train_seconds"] <= 30 * 60 and fast["device"] == "cpu"
    s8 = meta["s8net-bn"]
    assert s8["metrics"]["test_accuracy"] >= 0.70 and s8["train_config"]["epochs"] <= 20 and s8["parameters"] < 50_000
    for name in ("s8net-gn", "s8net-ln"):  # trained the same way, for the normalisation comparison
        assert meta[name]["train_config"]["epochs"] == s8["train_config"]["epochs"]
    assert meta["lenet"]["metrics"]["test_accuracy"] >= 0.55


def test_parameter_count_in_metadata_is_true():
    for path in SHIPPED:
        checkpoint = load_checkpoint(path)
        assert checkpoint.meta["parameters"] == count_parameters(checkpoint.model)
