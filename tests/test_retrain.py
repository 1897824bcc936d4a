"""The Influence page's "Retrain without these images", for real: one training of the checkpoint's recipe on every
image it was trained on minus a test image's top helpful images (never a subset), in a background run of the runs
queue or from the CLI, judged against the spread of that test image's loss over the recipe's seeds (the checkpoint
and the replicas it ships with)."""

import dataclasses
import json
import time

import numpy as np
import pytest

from cifarviz.analysis.influence import load_or_fit, lookup
from cifarviz.cli import main as cli
from cifarviz.core.checkpoint import SHIPPED_DIR, load_checkpoint
from cifarviz.core.inference import predict
from cifarviz.core.recipes import RECIPES, train_and_save
from cifarviz.services import retrain, runs


def wait_done(run_id, root, timeout=420):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs.start(root)
        run = runs.load_run(run_id, root)
        if run.state not in runs.ACTIVE:
            return run
        time.sleep(1)
    raise AssertionError(f"{run_id} did not finish in {timeout} s: {runs.log_tail(runs.load_run(run_id, root))}")


def plain_loss(model, dataset, test_index) -> float:
    probs = predict(model, dataset.test.images[[test_index]], features=False).probs[0]
    return float(-np.log(probs[dataset.test.labels[test_index]]))


@pytest.fixture(scope="module")
def small_checkpoint(cifar, tmp_path_factory):
    """The lenet recipe (2 epochs) on 2,000 training images: a run the page would offer, with its provenance."""
    small = runs.training_subset(cifar, 2000, seed=0)
    path, _ = train_and_save(dataclasses.replace(RECIPES["lenet"], epochs=2), small,
                             tmp_path_factory.mktemp("ckpt") / "small.safetensors")
    return load_checkpoint(path)


def test_retrain_without_the_helpful_images_runs_in_the_background_on_every_trained_image(cifar, small_checkpoint,
                                                                                        tmp_path):
    checkpoint, root = small_checkpoint, tmp_path / "runs"
    index = load_or_fit("head", checkpoint, cifar)  # over the 2,000 images it was trained on
    test_index = 11
    result = lookup(index, checkpoint, cifar, test_index, k=100)
    removed = [e.train_index for e in result.helpful]
    predicted = index.predicted_loss_change(sum(e.score for e in result.helpful), 0.5)
    run_id = retrain.submit_retrain(checkpoint, cifar, test_index=test_index, choice="helpful", removed=removed,
                                    method="head", predicted_change=predicted, owner="me", root=root)
    random_id = retrain.submit_retrain(checkpoint, cifar, test_index=test_index, choice="random",
                                       removed=np.arange(0, 40000, 400), method="head", predicted_change=None,
                                       owner="me", root=root)
    run = wait_done(run_id, root)
    assert run.state == runs.COMPLETED, (run.error, runs.log_tail(run))
    measured = retrain.retrain_result(run)
    assert measured["removed"] == 100 and measured["train_images"] == 2000 - 100 == measured["trained_on"] - 100
    assert measured["predicted_change"] == pytest.approx(predicted) and measured["method"] == "head"
    # a run ships no other seeds of its recipe: the band is the checkpoint alone, and the words say it cannot tell
    assert measured["band"]["n"] == 1 and len(measured["seeds"]) == 1 and not measured["beyond"]
    assert "cannot tell a real effect from seed noise" in measured["verdict"]
    # the plain loss of the true label, as the page says: the checkpoint's own figure is its cross-entropy
    assert measured["seeds"][0]["loss"] == pytest.approx(plain_loss(checkpoint.model, cifar, test_index), rel=1e-4)
    assert measured["change"] == pytest.approx(measured["retrained"]["loss"] - measured["seeds"][0]["loss"])
    assert [r.id for r in retrain.retrain_runs(checkpoint.path, test_index, root)] == [random_id, run_id]

    other = wait_done(random_id, root)
    assert other.state == runs.COMPLETED, (other.error, runs.log_tail(other))
    measured = retrain.retrain_result(other)
    # 100 "random" positions, of which only those the checkpoint was trained on count as removed; no subset
    trained = set(checkpoint.meta["provenance"]["train_images"]["indices"])
    expected = sum(int(cifar.train.source_index[i]) in trained for i in range(0, 40000, 400))
    assert measured["removed"] == expected and measured["train_images"] == 2000 - expected


def test_the_proof_on_the_shipped_lenet_uses_every_training_image_and_its_twenty_seeds(cifar, capsys):
    """The CLI's proof (the page's, scripted): lenet, a test image, its 100 most similar training images removed.
    One training on the other 44,900 images it was trained on; the band is the shipped checkpoint and its 19
    replicas measured on that image; the words agree with where the retrained loss lands."""
    lenet = load_checkpoint(SHIPPED_DIR / "lenet.safetensors")
    test_index = 7
    assert cli(["retrain-without", "-c", "lenet", "--test-index", str(test_index), "--method", "similarity",
                "--data", str(cifar.root), "--json"]) == 0
    out = capsys.readouterr()
    assert "Training lenet's recipe (seed 0, 20 epochs) once on 44,900 images" in out.err  # said before it starts
    result = json.loads(out.out)
    assert retrain.valid_result(result)
    assert result["train_images"] == len(cifar.train) - 100 == 44_900 and result["removed"] == 100
    band, seeds = result["band"], result["seeds"]
    assert band["n"] == len(seeds) == 20 and len({s["name"] for s in seeds}) == 20
    assert seeds[0]["name"] == "lenet" and seeds[0]["loss"] == pytest.approx(plain_loss(lenet.model, cifar, test_index),
                                                                             rel=1e-4)
    losses = [s["loss"] for s in seeds]
    assert band["low"] == pytest.approx(min(losses)) and band["high"] == pytest.approx(max(losses))
    loss = result["retrained"]["loss"]
    assert result["beyond"] == (not band["low"] <= loss <= band["high"])
    assert ("beyond seed noise" in result["verdict"]) == result["beyond"]
    assert ("inside the spread of the 20 seeds" in result["verdict"]) == (not result["beyond"])


def test_the_verdict_says_where_the_loss_lands_against_the_seeds():
    band = {"mean": 0.5, "sd": 0.1, "low": 0.3, "high": 0.7, "n": 20}
    words, beyond = retrain.verdict(1.2, band, "helpful")
    assert beyond and "higher than every one of the 20 seeds" in words and "1-in-21" in words
    assert "held the prediction up" in words
    words, beyond = retrain.verdict(0.1, band, "helpful")
    assert beyond and "lower than every one" in words and "did better without them" in words
    words, beyond = retrain.verdict(0.6, band, "helpful")
    assert not beyond and "cannot tell" in words
    words, beyond = retrain.verdict(0.00041, {**band, "low": 7.6e-05, "high": 0.0095}, "helpful")
    assert "0.00041" in words and "0.000:" not in words  # a confident image's small losses stay readable


def test_a_damaged_or_older_result_is_not_shown_as_a_measurement(cifar, small_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARVIZ_MAX_RUNS", "0")  # nothing trains it: only its files are tested
    run_id = retrain.submit_retrain(small_checkpoint, cifar, test_index=0, choice="random", removed=[1],
                                    method="head", predicted_change=None, root=tmp_path)
    run = runs.load_run(run_id, tmp_path)
    good = {"version": retrain.RESULT_VERSION, "retrained": {"loss": 0.5, "predicted": 3}, "seeds": [
        {"name": "x", "loss": 0.4, "predicted": 3}], "band": {"mean": 0.4, "sd": 0.0, "low": 0.4, "high": 0.4, "n": 1},
        "train_images": 10, "removed": 1, "verdict": "v", "beyond": False, "classes": ["a"] * 10}
    assert retrain.valid_result(good)
    for bad in ({**good, "version": 1}, {**good, "seeds": []}, {**good, "retrained": {"loss": "0.5", "predicted": 3}},
                {**good, "band": {**good["band"], "high": float("nan")}}, {**good, "classes": [1] * 10},
                {"before": {}, "after": {}, "subset": True}):
        assert not retrain.valid_result(bad)
    (run.dir / retrain.RESULT).write_text(json.dumps({**good, "version": 1}))
    assert retrain.retrain_result(run) is None  # not completed, and not this version either


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
