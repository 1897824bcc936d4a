"""The Influence page's "Retrain without these images", for real: a background run of the runs queue (its own
worker process) trains the checkpoint's recipe with and without a test image's top helpful images and measures
that test image's plain loss after each."""

import dataclasses
import time

import numpy as np
import pytest

from cifarviz.analysis.influence import load_or_fit, lookup
from cifarviz.core.checkpoint import load_checkpoint
from cifarviz.core.inference import predict
from cifarviz.core.recipes import RECIPES, train_and_save
from cifarviz.services import retrain, runs


def wait_done(run_id, root, timeout=420):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs.schedule(root)
        run = runs.load_run(run_id, root)
        if run.state not in runs.ACTIVE:
            return run
        time.sleep(1)
    raise AssertionError(f"{run_id} did not finish in {timeout} s: {runs.log_tail(runs.load_run(run_id, root))}")


@pytest.fixture(scope="module")
def small_checkpoint(cifar, tmp_path_factory):
    """The lenet recipe (2 epochs) on 2,000 training images: a run the page would offer, with its provenance."""
    small = runs.training_subset(cifar, 2000, seed=0)
    path, _ = train_and_save(dataclasses.replace(RECIPES["lenet"], epochs=2), small,
                             tmp_path_factory.mktemp("ckpt") / "small.safetensors")
    return load_checkpoint(path)


def test_retrain_without_the_helpful_images_runs_in_the_background_and_measures(cifar, small_checkpoint, tmp_path,
                                                                               monkeypatch):
    checkpoint, root = small_checkpoint, tmp_path / "runs"
    index = load_or_fit("head", checkpoint, cifar)  # over the 2,000 images it was trained on
    test_index = 11
    result = lookup(index, checkpoint, cifar, test_index, k=100)
    removed = [e.train_index for e in result.helpful]
    predicted = index.predicted_loss_change(sum(e.score for e in result.helpful), 0.5)
    run_id = retrain.submit_retrain(checkpoint, cifar, test_index=test_index, choice="helpful", removed=removed,
                                    method="head", predicted_change=predicted, owner="me", root=root)
    monkeypatch.setattr(retrain, "BUDGET_SECONDS", 0.01)  # too little for the whole split: a subset, said so
    subset_id = retrain.submit_retrain(checkpoint, cifar, test_index=test_index, choice="random",
                                       removed=np.arange(0, 40000, 400), method="head", predicted_change=None,
                                       owner="me", root=root)
    run = wait_done(run_id, root)
    assert run.state == runs.COMPLETED, (run.error, runs.log_tail(run))
    measured = retrain.retrain_result(run)
    assert measured["removed"] == 100 and measured["train_images"] == 2000 and not measured["subset"]
    assert measured["change"] == pytest.approx(measured["after"]["loss"] - measured["before"]["loss"])
    assert measured["predicted_change"] == pytest.approx(predicted) and measured["method"] == "head"
    for side in ("before", "after", "checkpoint"):
        assert 0 <= measured[side]["predicted"] < 10 and measured[side]["loss"] >= 0
    # the plain loss of the true label, as the page says: the checkpoint's own figure is its cross-entropy
    probs = predict(checkpoint.model, cifar.test.images[[test_index]], features=False).probs[0]
    assert measured["checkpoint"]["loss"] == pytest.approx(-np.log(probs[cifar.test.labels[test_index]]), rel=1e-4)
    assert [r.id for r in retrain.retrain_runs(checkpoint.path, test_index, root)] == [subset_id, run_id]

    subset = wait_done(subset_id, root)
    assert subset.state == runs.COMPLETED, (subset.error, runs.log_tail(subset))
    measured = retrain.retrain_result(subset)
    # 100 "random" positions, of which only those the checkpoint was trained on count as removed
    trained = set(checkpoint.meta["provenance"]["train_images"]["indices"])
    expected = sum(int(cifar.train.source_index[i]) in trained for i in range(0, 40000, 400))
    assert measured["subset"] and measured["removed"] == expected
    assert measured["train_images"] == retrain.MIN_SUBSET == 2000  # never fewer: a weaker model would mean little


def test_a_checkpoint_without_a_recipe_or_file_cannot_be_retrained(cifar, small_checkpoint, tmp_path):
    no_file = dataclasses.replace(small_checkpoint, path=None)
    with pytest.raises(runs.RunError, match="no file"):
        retrain.submit_retrain(no_file, cifar, test_index=0, choice="helpful", removed=[1], method="head",
                               predicted_change=None, root=tmp_path)
    no_recipe = dataclasses.replace(small_checkpoint, meta={"name": "upload"})
    with pytest.raises(runs.RunError, match="records no training recipe"):
        retrain.submit_retrain(no_recipe, cifar, test_index=0, choice="helpful", removed=[1], method="head",
                               predicted_change=None, root=tmp_path)
    with pytest.raises(runs.RunError, match="positions"):
        retrain.submit_retrain(small_checkpoint, cifar, test_index=0, choice="helpful", removed=[10 ** 7],
                               method="head", predicted_change=None, root=tmp_path)
    assert runs.list_runs(tmp_path) == []
