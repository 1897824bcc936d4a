"""The faithful default: TRAK over an ensemble of models, proven by retraining the network without the images it
names (the CI-sized version of bench/bench_retrain.py), and its index: what it is built from, what it keeps, and
that its precomputed lists are the computation itself."""

import dataclasses
import shutil

import numpy as np
import pytest

from cifarviz.analysis.influence import (
    METHODS,
    InfluenceError,
    available_methods,
    class_lookup,
    default_method,
    ensemble_scores,
    how_sure,
    index_key,
    load_or_fit,
    lookup,
    method_choice,
)
from cifarviz.core.checkpoint import SHIPPED_DIR, ensemble_member_files, load_checkpoint, shipped_files
from cifarviz.core.data import Split
from cifarviz.core.inference import predict
from cifarviz.core.models import model_card
from cifarviz.core.recipes import RECIPES, train_and_save
from cifarviz.core.train import train


@pytest.fixture(scope="module")
def snapshot_run(cifar_small, tmp_path_factory):
    """A run saved with per-epoch snapshots (the Train page's "save a checkpoint of every epoch"): 6 epochs of
    the lenet recipe on 2,000 images. Its ensemble is the checkpoint and snapshots 3, 4 and 5."""
    folder = tmp_path_factory.mktemp("run")
    config = dataclasses.replace(RECIPES["lenet"], epochs=6)
    train_and_save(config, cifar_small, folder / "model.safetensors", snapshot_dir=folder / "epochs")
    return folder


def test_ensemble_index_is_its_computation_and_knows_its_members(cifar_small, snapshot_run):
    checkpoint = load_checkpoint(snapshot_run / "model.safetensors")
    members = ensemble_member_files(checkpoint)
    assert [p.name for p in members] == ["epoch-003.safetensors", "epoch-004.safetensors", "epoch-005.safetensors"]
    assert "trak-ensemble" in available_methods(checkpoint)

    index = load_or_fit("trak-ensemble", checkpoint, cifar_small)
    models = [checkpoint.model, *(load_checkpoint(p).model for p in members)]
    tests = np.array([3, 140, 777])
    full, self_scores, _, _ = ensemble_scores(models, cifar_small, tests)
    for row, t in enumerate(tests):  # a lookup reads the lists the full computation ranks
        result = lookup(index, checkpoint, cifar_small, int(t), k=10)
        assert [e.train_index for e in result.helpful] == list(np.argsort(-full[row], kind="stable")[:10])
        np.testing.assert_allclose([e.score for e in result.harmful], np.sort(full[row])[:10], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(index.self_influence(), self_scores, rtol=1e-4, atol=1e-7)
    # how sure each answer is: for every listed image, how many of the 4 models alone rank it in their own top 100
    # (model m alone is TRAK with its own projection seed m, as inside the ensemble)
    alone = [ensemble_scores([model], cifar_small, tests, seed=m)[0] for m, model in enumerate(models)]
    for row, t in enumerate(tests):
        result = lookup(index, checkpoint, cifar_small, int(t), k=10)
        own_tops = [set(np.argsort(-scores[row], kind="stable")[:100]) for scores in alone]
        expected = [sum(e.train_index in top for top in own_tops) for e in result.helpful]
        assert result.agreement["helpful"] == expected and result.agreement["models"] == 4
        assert result.agreement["helpful_share"] == pytest.approx(np.mean(np.array(expected) >= 2))
        own_bottoms = [set(np.argsort(scores[row], kind="stable")[:100]) for scores in alone]
        assert result.agreement["harmful"] == [sum(e.train_index in b for b in own_bottoms) for e in result.harmful]
    airplanes = np.flatnonzero(cifar_small.test.labels == 0)
    mean = ensemble_scores(models, cifar_small, airplanes)[0].mean(0)
    expected = np.argsort(-mean, kind="stable")[:5]
    assert [e.train_index for e in class_lookup(index, checkpoint, cifar_small, "airplane", k=5).helpful] == \
        list(expected)
    with pytest.raises(InfluenceError, match="at most 100"):
        lookup(index, checkpoint, cifar_small, 3, k=101)

    # the same label helps, another label hurts (the one sign convention)
    same = [np.mean([e.label == cifar_small.classes[cifar_small.test.labels[t]] for e in r]) for t in range(0, 1000, 50)
            for r in [lookup(index, checkpoint, cifar_small, t, k=10).helpful]]
    other = [np.mean([e.label == cifar_small.classes[cifar_small.test.labels[t]] for e in r]) for t in range(0, 1000, 50)
             for r in [lookup(index, checkpoint, cifar_small, t, k=10).harmful]]
    assert np.mean(same) > np.mean(other) + 0.3

    # a member replaced: another key (the index is never served for models it was not built from)
    key = index_key("trak-ensemble", checkpoint, cifar_small)
    shutil.copy(snapshot_run / "epochs" / "epoch-002.safetensors", members[0])
    assert index_key("trak-ensemble", checkpoint, cifar_small) != key


def test_every_checkpoints_default_is_measured_at_least_as_good_as_similarity(snapshot_run):
    """The rule, on every shipped checkpoint, a run and an upload: the default is an attribution method whose
    applicable figure is at least similarity's, or similarity itself where no attribution method reached it (and
    then the page's "similarity explains it better" path is on). A run's snapshot ensemble carries its own measured
    figure (below similarity's); a run of another recipe is told that its figure is the card's recipe's."""
    for path in shipped_files():
        checkpoint = load_checkpoint(path)
        choice = method_choice(checkpoint)
        assert choice.figures is not None, path.name
        if choice.method == "similarity":
            assert choice.similarity_wins and choice.figure(choice.best_attribution) < choice.figure("similarity")
        else:
            assert not choice.similarity_wins and choice.figure(choice.method) >= choice.figure("similarity")
        assert choice.method in available_methods(checkpoint) and choice.quick in available_methods(checkpoint)
        assert not METHODS[choice.quick].takes_minutes  # what answers while the default builds takes seconds
        assert default_method(checkpoint) == choice.method

    lenet = load_checkpoint(SHIPPED_DIR / "lenet.safetensors")
    card = model_card("lenet")
    assert len(ensemble_member_files(lenet)) == len(card.replicas) == 19
    choice = method_choice(lenet)
    assert choice.method == "trak-ensemble" and choice.applies == "recipe"
    assert choice.quick == "similarity"  # measured above the head: it answers while the ensemble builds
    assert card.influence.mean_change["similarity"] > card.influence.mean_change["head"]
    upload = dataclasses.replace(lenet, path=None)  # an uploaded copy is not the shipped file: no replicas
    assert default_method(upload) == "similarity" and method_choice(upload).similarity_wins

    run = load_checkpoint(snapshot_run / "model.safetensors")  # lenet, 6 epochs, with per-epoch snapshots
    choice = method_choice(run)
    assert "trak-ensemble" in available_methods(run) and choice.method != "trak-ensemble"
    assert choice.applies == "other recipe" and "epochs" in choice.differs
    sentence = how_sure(run, choice.method)
    assert "this run's recipe differs" in sentence and "epochs" in sentence
    # its ensemble is of its own snapshots: the figure measured for exactly that (bench_retrain's trak-snapshots),
    # never the 20 replicas' figure, and said as such
    assert choice.ensemble_of == "snapshots"
    snapshots_figure = card.influence.mean_change["trak-snapshots"]
    assert choice.figure("trak-ensemble") == snapshots_figure != card.influence.mean_change["trak-ensemble"]
    ensemble_sentence = how_sure(run, "trak-ensemble")
    assert f"{snapshots_figure:+.2f}" in ensemble_sentence and "per-epoch snapshots" in ensemble_sentence
    assert snapshots_figure < choice.figure("similarity") and choice.method == "similarity"  # measured below it


_POOL_DATA = {}


def _pool_start(data) -> None:
    import torch

    torch.set_num_threads(1)  # two processes of one thread each: on two cores faster than one of two threads
    _POOL_DATA["data"] = data


def _pool_train(seed: int, removed) -> dict:
    """One training of the lenet recipe with `seed` on the pool's data without the positions `removed`."""
    data = _POOL_DATA["data"]
    if removed is not None:
        keep = np.setdiff1d(np.arange(len(data.train)), removed)
        data = dataclasses.replace(data, train=Split("train", data.train.images[keep], data.train.labels[keep],
                                                     data.train.source_index[keep]))
    model = train(dataclasses.replace(RECIPES["lenet"], seed=seed), data).model
    return {k: v.clone() for k, v in model.state_dict().items()}


def _trainings(data, jobs: list[tuple[int, object]]) -> list:
    """Every (seed, removed) training, on as many processes as there are cores (each its own PyTorch thread);
    the models come back in order."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    from cifarviz.core.models import create_model

    with ProcessPoolExecutor(max(1, min(2, os.cpu_count() or 1)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_pool_start, initargs=(data,)) as pool:
        states = list(pool.map(_pool_train, *zip(*jobs)))
    models = []
    for state in states:
        model = create_model("lenet", **RECIPES["lenet"].model_args)
        model.load_state_dict(state)
        models.append(model.eval())
    return models


def _plain_losses(model, dataset, idx):
    probs = predict(model, dataset.test.images[idx], features=False).probs
    return -np.log(probs[np.arange(len(idx)), dataset.test.labels[idx]] + 1e-12)


def test_removing_the_default_methods_helpful_images_really_raises_the_test_loss(cifar, record_property):
    """The product's claim, checked the way a sceptical researcher would: the lenet recipe on a fixed 4,000-image
    subset, 6 correctly classified test images (seeded); for each, the whole network retrained without the default
    method's top 200 helpful images (5%) and without the 200 most similar same-label images; and twice without 200
    random ones (a random removal knows no test image, so each of the two is measured on all six). The default
    (TRAK over 20 models, as lenet ships it) raises the test loss more than random removal, and by no less than
    similarity's beyond two standard errors of their paired difference. 34 trainings, two processes of one thread
    each (on two cores faster than one process of two threads, and the same numbers whatever the thread settings); none
    validates (nothing here reads a validation figure). bench/bench_retrain.py runs the card's protocol (5,000
    images, 24 test images); 4,000 here keeps CI under its 30 minutes (this test was a quarter of it)."""
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(len(cifar.train), 4000, replace=False))
    t = cifar.train
    data = dataclasses.replace(cifar, train=Split("train", t.images[subset], t.labels[subset], t.source_index[subset]),
                               val=Split("val", cifar.val.images[:0], cifar.val.labels[:0], cifar.val.source_index[:0]))
    models = _trainings(data, [(s, None) for s in range(1 + len(model_card("lenet").replicas))])
    base = models[0]
    probs = predict(base, data.test.images, features=False).probs
    correct = np.flatnonzero(probs.argmax(1) == data.test.labels)
    tests = np.sort(np.random.default_rng(1).choice(correct, 6, replace=False))
    before = _plain_losses(base, data, tests)
    trak = ensemble_scores(models, data, tests)[0]
    features = predict(base, data.train.images).features
    test_features = predict(base, data.test.images[tests]).features
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarity = (test_features / np.linalg.norm(test_features, axis=1, keepdims=True)) @ unit.T
    similarity = np.where(data.train.labels[None] == data.test.labels[tests][:, None], similarity, -similarity)
    k = 200

    removals = {"default": [np.argsort(-trak[row], kind="stable")[:k] for row in range(len(tests))],
                "similarity": [np.argsort(-similarity[row], kind="stable")[:k] for row in range(len(tests))],
                "random": [np.random.default_rng(seed).choice(len(data.train), k, replace=False)
                           for seed in (1000, 1001)]}
    jobs = [(RECIPES["lenet"].seed, removed) for method in removals for removed in removals[method]]
    retrained = iter(_trainings(data, jobs))
    change = {"default": [], "similarity": [], "random": []}
    for method, removed_sets in removals.items():
        for row, _ in enumerate(removed_sets):  # every test image's change of plain loss after its retraining
            changes = _plain_losses(next(retrained), data, tests) - before
            # a method's removal is for one test image; a random removal knows none, so it counts on all six
            change[method] += changes.tolist() if method == "random" else [float(changes[row])]
    mean = {m: float(np.mean(v)) for m, v in change.items()}
    for m, v in mean.items():
        record_property(f"{m}_mean_change", v)
    print("mean change of the plain test loss:", mean)
    paired = np.array(change["default"]) - np.array(change["similarity"])
    noise = float(paired.std(ddof=1) / np.sqrt(len(paired)))
    record_property("default_minus_similarity", float(paired.mean()))
    record_property("default_minus_similarity_standard_error", noise)
    print(f"default - similarity per image: {paired.round(3).tolist()}, mean {paired.mean():+.3f} (SE {noise:.3f})")
    assert mean["default"] > mean["random"] + 0.5
    # Six images cannot rank the default and the similarity baseline (the card's 24 do: +3.42 vs +2.39; on this
    # subset alone similarity led); what six can show is that the default is not measurably worse than it.
    assert paired.mean() > -2 * noise
