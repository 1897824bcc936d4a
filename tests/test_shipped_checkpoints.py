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


SHIPPED_STORE = Path(__file__).resolve().parent.parent / "checkpoints" / "store"


def test_the_default_checkpoints_faithful_index_ships_and_a_fresh_clone_answers_from_it(cifar, tmp_path, monkeypatch):
    """lenet's default (TRAK over 20 models) takes minutes to build; it comes with the project, and a fresh cache
    answers from it without building anything, on this machine's copy of the data (whose files have other
    modification times than the copy it was built on: every copy has its own).
    Every file under checkpoints/store is the current key of a shipped checkpoint's default index: none is stale."""
    import subprocess
    import sys

    from cifarviz.analysis.influence import METHODS, default_method, index_key, index_ready, load_or_fit, lookup
    from cifarviz.core.checkpoint import shipped_files
    from cifarviz.store.cache import default_store

    import os

    session_cache = os.environ.get("CIFARVIZ_CACHE")  # decoded data already there: the CLI below reuses it
    monkeypatch.setenv("CIFARVIZ_CACHE", str(tmp_path / "fresh-cache"))
    expected = set()
    for path in shipped_files():
        checkpoint = load_checkpoint(path)
        method = default_method(checkpoint)
        if METHODS[method].takes_minutes or METHODS[method].needs_members:
            expected.add(default_store().shipped_path(index_key(method, checkpoint, cifar)))
    assert expected, "the default checkpoint with a slow default index ships it"
    assert {p for p in SHIPPED_STORE.rglob("*.npz")} == expected  # nothing stale, nothing missing
    everything = [p for p in SHIPPED_STORE.parent.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in everything) < 60e6  # the checkpoints folder's budget

    lenet = load_checkpoint(SHIPPED_STORE.parent / "lenet.safetensors")
    assert index_ready("trak-ensemble", lenet, cifar)
    monkeypatch.setattr(METHODS["trak-ensemble"], "fit", classmethod(lambda *a, **k: pytest.fail("built, not read")))
    index = load_or_fit("trak-ensemble", lenet, cifar)
    result = lookup(index, lenet, cifar, 343, k=8)
    assert len(result.helpful) == 8 and result.agreement["models"] == 20
    assert not default_store().path(index_key("trak-ensemble", lenet, cifar)).exists()  # nothing copied

    # the CLI, as a newcomer runs it: no "Building ..." announcement, the answer at once, nothing built
    env = {**os.environ, "CIFARVIZ_CACHE": session_cache or str(tmp_path / "cli-cache")}
    done = subprocess.run([sys.executable, "-m", "cifarviz", "influence", "-c", "lenet", "--test-index", "343",
                           "--data", str(cifar.root), "--json"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Building" not in done.stderr and '"method": "trak-ensemble"' in done.stdout
    monkeypatch.setenv("CIFARVIZ_CACHE", env["CIFARVIZ_CACHE"])
    assert not default_store().path(index_key("trak-ensemble", lenet, cifar)).exists()
