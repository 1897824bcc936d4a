"""Influence methods, proven on the real development data: against leave-one-out retraining, and at finding
mislabelled training images; plus the lookup API, its cache, the CLI and the page."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from test_app import open_tab, run_until

from cifarviz.analysis.explore import ImageRef
from cifarviz.analysis.influence import (
    METHODS,
    class_lookup,
    index_path,
    load_or_fit,
    loss_ranking,
    lookup,
    suspicious,
    training_losses,
)
from cifarviz.analysis.influence.head import HeadInfluence, LinearHead, linear_head, smoothed_targets, softmax
from cifarviz.cli import main
from cifarviz.core.augment import AugmentConfig
from cifarviz.core.checkpoint import SHIPPED_DIR, load_checkpoint
from cifarviz.core.data import Split
from cifarviz.core.inference import predict
from cifarviz.core.models import model_card
from cifarviz.core.train import TrainConfig, train
from cifarviz.store.artifacts import split_artifacts

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "checkpoints"


# --------------------------------------------------------------------------- proof 1: leave-one-out retraining


def retrain_head(features, labels, theta, head: LinearHead, l2: float, smoothing: float, tol: float = 1e-10,
                 curvature=None):
    """Minimise mean cross-entropy + (l2/2)|theta|^2 over the head to convergence (Newton's method; the
    gradient and the stopping rule are computed here, independently of the method under test).

    `curvature`: a Hessian's Cholesky factor to step with instead of recomputing one at every step (the full
    data's, for a retraining without one image: the steps then shrink the gradient about a thousandfold each).
    Only the path changes: the stopping rule is the same, so the answer is the same minimum."""
    from scipy.linalg import cho_solve

    f = head.augmented(features)
    targets = smoothed_targets(labels, head.weight.shape[0], smoothing)

    def objective(theta_):
        logits = f @ theta_.T
        logits = logits - logits.max(1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return -(targets * log_probs).sum(1).mean() + 0.5 * l2 * (theta_ ** 2).sum()

    for _ in range(100):
        gradient = (softmax(f @ theta.T) - targets).T @ f / len(f) + l2 * theta
        if np.abs(gradient).max() < tol:
            return theta
        if curvature is None:
            current = LinearHead(*_split(theta, head), head.scale)
            factor = HeadInfluence.fit_arrays(features, labels, current, l2=l2, label_smoothing=smoothing,
                                              damping=0.0, self_influence=False).cholesky
        else:
            factor = curvature
        step = cho_solve((factor, True), gradient.ravel()).reshape(theta.shape)
        size, start = 1.0, objective(theta)  # backtracking: far from the optimum a full Newton step can overshoot
        while objective(theta - size * step) > start - 1e-4 * size * (gradient * step).sum() and size > 1e-6:
            size /= 2
        theta = theta - size * step
    raise AssertionError("the head did not converge")


def _split(theta, head):
    return (theta, None) if head.bias is None else (theta[:, :-1], theta[:, -1])


@pytest.mark.slow
@pytest.mark.parametrize("smoothing", [None, 0.2], ids=["as-trained", "label-smoothing-0.2"])
def test_head_influence_predicts_leave_one_out_retraining(cifar, smoothing):
    """Frozen features of a shipped checkpoint, 5,000 training images, the head retrained to convergence without
    each of a test image's 50 most influential images: predicted and actual changes of the *plain* test loss agree
    (Pearson >= 0.9), and helpful images (positive score) are the ones whose removal raises it. With label smoothing
    in the training loss the measurement is still the plain loss: a smoothed test gradient fails this."""
    checkpoint = load_checkpoint(SHIPPED / "s8net-bn.safetensors")
    l2 = checkpoint.meta["train_config"]["weight_decay"]
    smoothing = checkpoint.meta["train_config"]["label_smoothing"] if smoothing is None else smoothing
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(len(cifar.train), 5000, replace=False))
    features = predict(checkpoint.model, cifar.train.images[subset]).features.astype(np.float64)
    labels = cifar.train.labels[subset]
    start = linear_head(checkpoint.model)
    theta = retrain_head(features, labels, start.theta.copy(), start, l2, smoothing)
    head = LinearHead(*_split(theta, start), start.scale)
    index = HeadInfluence.fit_arrays(features, labels, head, l2=l2, label_smoothing=smoothing, damping=0.0)

    test_idx = rng.choice(len(cifar.test), 3, replace=False)
    if smoothing:  # the case where the two losses point apart: test images the model is surer of than 1 - 0.9 s
        sure = predict(checkpoint.model, cifar.test.images[:2000]).probs
        confident = np.flatnonzero(sure[np.arange(2000), cifar.test.labels[:2000]] > 0.9)
        test_idx = rng.choice(confident, 3, replace=False)
    test = predict(checkpoint.model, cifar.test.images[test_idx])

    def test_loss(theta_, t):
        f = head.augmented(test.features[[t]])
        return -np.log(softmax(f @ theta_.T)[0, cifar.test.labels[test_idx[t]]])

    for t in range(len(test_idx)):
        scores = index.scores_for_features(test.features[[t]], cifar.test.labels[test_idx[[t]]])[0]
        top = np.argsort(-np.abs(scores))[:50]
        base = test_loss(theta, t)
        actual = []
        for i in top:
            keep = np.arange(len(labels)) != i
            retrained = retrain_head(features[keep], labels[keep], theta.copy(), head, l2, smoothing,
                                     curvature=index.cholesky)
            actual.append(test_loss(retrained, t) - base)
        actual = np.array(actual)
        assert np.corrcoef(scores[top], actual)[0, 1] >= 0.9, (t, np.corrcoef(scores[top], actual)[0, 1])
        strong = np.abs(scores[top]) > 0.2 * np.abs(scores[top]).max()
        assert (np.sign(scores[top][strong]) == np.sign(actual[strong])).all()  # one sign convention


# --------------------------------------------------------------------------- proof 2: finding mislabelled images


@pytest.mark.slow
def test_self_influence_finds_flipped_labels(cifar, record_property):
    """Flip 5% of the labels of 5,000 training images, train lenet on them, and self-influence puts at least
    half of the flipped images in its top 10%. The plain training-loss ranking is reported beside it."""
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(len(cifar.train), 5000, replace=False))
    labels = cifar.train.labels[subset].copy()
    flipped = rng.choice(len(subset), 250, replace=False)
    labels[flipped] = (labels[flipped] + rng.integers(1, 10, len(flipped))) % 10
    noisy = dataclasses.replace(
        cifar, train=Split("train", cifar.train.images[subset], labels, cifar.train.source_index[subset]),
        val=Split("val", cifar.val.images[:500], cifar.val.labels[:500], cifar.val.source_index[:500]))
    config = TrainConfig(model="lenet", epochs=30, batch_size=128, lr=0.05, weight_decay=5e-4,
                         augment=AugmentConfig(translate=2, flip=True))
    trained = train(config, noisy)
    model = trained.model
    out = predict(model, noisy.train.images)
    index = HeadInfluence.fit_arrays(out.features, labels, linear_head(model), l2=config.weight_decay)
    top_tenth = np.argsort(-index.self_influence())[:500]
    recall = np.isin(flipped, top_tenth).mean()
    loss = -np.log(out.probs[np.arange(len(labels)), labels] + 1e-12)
    loss_recall = np.isin(flipped, np.argsort(-loss)[:500]).mean()
    # the area under the margin, recorded by the training run itself (no other model, no index)
    margin_recall = np.isin(flipped, np.argsort(trained.mean_margins, kind="stable")[:500]).mean()
    record_property("self_influence_recall", recall)
    record_property("training_loss_recall", loss_recall)
    record_property("area_under_margin_recall", margin_recall)
    print(f"flipped labels in the top 10%: self-influence {recall:.1%}, training loss {loss_recall:.1%}, "
          f"area under the margin {margin_recall:.1%}")
    assert recall >= 0.5 and margin_recall >= 0.5


# --------------------------------------------------------------------------- lookups, cache, methods


@pytest.fixture(scope="module")
def lenet():
    return load_checkpoint(SHIPPED / "lenet.safetensors")


def test_lookup_lists_and_json(cifar, lenet):
    index = load_or_fit("head", lenet, cifar)
    result = lookup(index, lenet, cifar, test_index=7, k=5)
    helpful, harmful = [e.score for e in result.helpful], [e.score for e in result.harmful]
    assert len(helpful) == len(harmful) == 5
    assert helpful == sorted(helpful, reverse=True) and harmful == sorted(harmful)
    assert helpful[0] > 0 > harmful[0]
    entry = result.helpful[0]
    assert cifar.train.source_index[entry.train_index] == entry.source_index
    assert cifar.classes[cifar.train.labels[entry.train_index]] == entry.label
    payload = json.loads(result.to_json())
    assert payload["query"] == {"test_index": 7} and payload["data_fingerprint"] == cifar.fingerprint
    assert set(payload["helpful"][0]) == {"train_index", "source_index", "label", "predicted", "score"}
    everything = lookup(index, lenet, cifar, test_index=7, k=len(cifar.train))  # k may be the whole split
    assert len(everything.helpful) == len(cifar.train)
    assert sorted(e.train_index for e in everything.helpful) == list(range(len(cifar.train)))


def test_index_is_fitted_once_and_reused(cifar, lenet, monkeypatch):
    path = index_path("head", lenet, cifar)
    load_or_fit("head", lenet, cifar)
    inode = path.stat().st_ino

    def no_fit(*args, **kwargs):
        raise AssertionError("the index was fitted again")

    monkeypatch.setattr(HeadInfluence, "fit", no_fit)
    again = load_or_fit("head", lenet, cifar)
    assert path.stat().st_ino == inode  # read, not rewritten
    assert index_path("similarity", lenet, cifar) != path
    # a class lookup is the mean over the class's test images, computed in one solve
    members = np.flatnonzero(cifar.test.labels == 0)[:40]
    np.testing.assert_allclose(again.mean_scores(lenet, cifar, members), again.scores(lenet, cifar, members).mean(0),
                               rtol=1e-4, atol=1e-9)
    assert class_lookup(again, lenet, cifar, cifar.classes[0], k=3).query["test_images"] == 1000


@pytest.mark.slow
def test_every_method_ranks_same_label_images_as_helpful(cifar, lenet):
    """Sanity across methods: the most helpful images share the test image's label far more often than the
    most harmful ones (the one sign convention, seen from the outside). The ensemble, which takes minutes over the
    whole split, is checked the same way on a smaller one (test_ensemble.py)."""
    for method in (m for m, cls in METHODS.items() if not cls.needs_members):
        index = load_or_fit(method, lenet, cifar)
        same = {"helpful": [], "harmful": []}
        for t in range(0, len(cifar.test), len(cifar.test) // 20):
            result = lookup(index, lenet, cifar, t, k=10)
            true = cifar.classes[cifar.test.labels[t]]
            same["helpful"].append(np.mean([e.label == true for e in result.helpful]))
            same["harmful"].append(np.mean([e.label == true for e in result.harmful]))
        assert np.mean(same["helpful"]) > np.mean(same["harmful"]) + 0.3, (method, same)


def test_suspicious_and_training_loss_rankings(cifar, lenet):
    index = load_or_fit("head", lenet, cifar)
    order, scores = suspicious(index, top=50)
    assert len(order) == 50 and (np.diff(scores) <= 0).all()
    losses = training_losses(lenet, cifar)
    assert losses[order].mean() > 5 * losses.mean()  # suspicious images are the ones the model gets badly wrong
    with pytest.raises(Exception, match="no self-influence"):
        load_or_fit("similarity", lenet, cifar).self_influence()


# --------------------------------------------------------------------------- CLI and page


@pytest.mark.slow
def test_cli_influence(cifar, capsys):
    # --method head: lenet's default, the ensemble of its 20 models, takes minutes to build (test_ensemble.py)
    assert main(["influence", "-c", "lenet", "--method", "head", "--data", str(cifar.root), "--test-index", "3",
                 "--k", "4", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["method"] == "head" and len(payload["helpful"]) == 4 and payload["query"]["test_index"] == 3
    assert main(["influence", "-c", "lenet", "--method", "head", "--data", str(cifar.root), "--self", "--top", "5",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["suspicious"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5] and rows[0]["self_influence"] >= rows[-1]["self_influence"]
    assert main(["influence", "-c", "lenet", "--method", "head", "--data", str(cifar.root), "--class", "ship",
                 "--k", "2"]) == 0
    assert "most harmful" in capsys.readouterr().out
    assert main(["influence", "-c", "lenet", "--data", str(cifar.root), "--k", "2"]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["influence", "-c", "lenet", "--data", str(cifar.root), "--test-index", "99999"]) == 2
    assert "out of range" in capsys.readouterr().err


@pytest.mark.slow
def test_influence_page_click_a_test_image(cifar, lenet):
    load_or_fit("head", lenet, cifar)  # the page reads the index the library built
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = str(cifar.root)
    # the head, picked as a teacher would: lenet's default (the 20-model ensemble) takes minutes to build
    at.session_state["influence_method"] = "head"
    at.session_state["influence_method_of"] = str(SHIPPED_DIR / "lenet.safetensors")
    at.run()
    at.sidebar.selectbox(key="checkpoint_label").set_value("lenet (shipped)").run()
    at.switch_page("pages/influence.py").run()
    assert not at.exception, [e.value for e in at.exception]
    def picks(at):
        return [int(b.key.rsplit("-", 1)[1]) for b in at.button if (b.key or "").startswith("influence-pick-test-")]

    run_until(at, picks, "the test predictions")
    first = min(picks(at))
    assert f"Test image #{first}:" in "\n".join(m.value for m in at.markdown)  # an answer before any click
    at.selectbox(key="influence_kind").set_value("misclassified").run()
    picks = [b for b in at.button if b.key and b.key.startswith("influence-pick-test-")]
    chosen = int(picks[0].key.rsplit("-", 1)[1])
    picks[0].click().run()
    page = "\n".join(m.value for m in at.markdown)
    assert f"Test image #{chosen}" in page and "Most helpful" in page and "Most harmful" in page
    expected = lookup(load_or_fit("head", lenet, cifar), lenet, cifar, chosen, k=8)
    shown = [int(b.key.rsplit("-", 1)[1]) for b in at.button if b.key and b.key.startswith(f"test-{chosen}-helpful-")]
    assert shown == [e.train_index for e in expected.helpful]
    # how sure the answer is (the card's retraining figures), and the retraining that lets a class see for itself
    captions = "\n".join(c.value for c in at.caption)
    figures = model_card("lenet").influence
    assert f"the test image's loss rose by **{figures.mean_change['head']:+.2f}**" in captions, captions
    assert any(b.key == f"retrain-{chosen}" for b in at.button)
    # two methods side by side on the same test image (only built indexes are offered), with their overlap
    load_or_fit("similarity", lenet, cifar)
    at.run()
    assert "similarity" in at.selectbox(key="influence_compare").options or \
        "Feature similarity (baseline)" in at.selectbox(key="influence_compare").options
    at.selectbox(key="influence_compare").set_value("similarity").run()
    assert not at.exception, [e.value for e in at.exception]
    other = lookup(load_or_fit("similarity", lenet, cifar), lenet, cifar, chosen, k=8)
    for side in ("helpful", "harmful"):
        mine = [e.train_index for e in getattr(expected, side)]
        theirs = [e.train_index for e in getattr(other, side)]
        assert [int(b.key.rsplit("-", 1)[1]) for b in at.button
                if (b.key or "").startswith(f"compare-similarity-{chosen}-{side}-")] == theirs
        assert [int(b.key.rsplit("-", 1)[1]) for b in at.button
                if (b.key or "").startswith(f"compare-head-{chosen}-{side}-")] == mine
        shared = len(set(mine) & set(theirs))
        assert f"**Most {side}**" in "\n".join(m.value for m in at.markdown)
        assert any(m.value.startswith(f"**Most {side}**") and f"**{shared}** of 8 images in both lists" in m.value
                   for m in at.markdown)
    at.selectbox(key="influence_compare").set_value("nothing").run()
    # each image opens the inspector, and a test image's inspector lists its influential training images
    next(b for b in at.button if b.key and b.key.startswith(f"test-{chosen}-helpful-")).click().run()
    assert f"Train image #{expected.helpful[0].train_index}" in "\n".join(m.value for m in at.markdown)
    at.session_state["inspect"] = ImageRef("test", chosen)
    at.run()
    inspector_helpful = [b for b in at.button if b.key and b.key.startswith("inspector-helpful-")]
    assert [int(b.key.rsplit("-", 1)[1]) for b in inspector_helpful] == [e.train_index for e in expected.helpful[:4]]
    at.session_state["inspect"] = None
    # the other tabs are drawn only when open (a page of three tabs of tiles was too slow for a class)
    open_tab(at, "influence_tab", "A whole class")
    keys = [b.key or "" for b in at.button]
    expected = class_lookup(load_or_fit("head", lenet, cifar), lenet, cifar, "airplane", k=8)
    assert [int(k.rsplit("-", 1)[1]) for k in keys if k.startswith("class-airplane-harmful-")] == \
        [e.train_index for e in expected.harmful]
    assert not any(k.startswith("influence-pick-") for k in keys)
    open_tab(at, "influence_tab", "Suspicious training images")
    keys = [b.key or "" for b in at.button]
    # the ranking measured best at finding flipped labels, and a plain one beside it (lenet's card: with the head,
    # the training loss; then self-influence on the right)
    assert sum(k.startswith("suspect-best-") for k in keys) == 8
    # each column's sentence says whose loss it ranks by (lenet's card puts the ensemble's mean beside the
    # checkpoint's own: both were "training loss" to a reader)
    assert any(c.value.startswith("how wrong this one checkpoint is") for c in at.caption)
    assert sum(k.startswith("suspect-other-") for k in keys) == 8
    by_loss, _ = loss_ranking(lenet, cifar, top=8)
    assert [int(k.rsplit("-", 1)[1]) for k in keys if k.startswith("suspect-best-")] == list(by_loss)
    order, _ = suspicious(load_or_fit("head", lenet, cifar), top=8)
    assert [int(k.rsplit("-", 1)[1]) for k in keys if k.startswith("suspect-other-")] == list(order)
    assert not any(k.startswith("class-airplane-") for k in keys)


def test_head_loss_reads_the_optimisers_decay_whichever_way_the_config_writes_it():
    """A decay written per step at the peak lr (fastnet's recipe) is weight_decay / lr as an L2 coefficient; the
    shipped checkpoints wrote the coefficient itself."""
    from types import SimpleNamespace

    from cifarviz.analysis.influence.head import training_loss_settings
    from cifarviz.core.train import TrainConfig

    per_step = TrainConfig(model="lenet", lr=1.5, weight_decay=0.002, weight_decay_mode="per_step", label_smoothing=0.2)
    decay, smoothing = training_loss_settings(SimpleNamespace(meta={"train_config": per_step.to_dict()}))
    assert decay == pytest.approx(per_step.decay_coefficient) == pytest.approx(0.002 / 1.5)
    assert smoothing == 0.2
    shipped = load_checkpoint(SHIPPED / "fastnet.safetensors")
    assert training_loss_settings(shipped)[0] == pytest.approx(shipped.meta["train_config"]["weight_decay"])


def test_influence_scores_read_well_in_a_narrow_caption():
    from cifarviz.ui.app import readable_score

    assert readable_score(0.00013) == "+1.3×10⁻⁴" and readable_score(-6e-05) == "−6.0×10⁻⁵"
    assert readable_score(-0.5) == "−0.5" and readable_score(0.0) == "+0"
    assert readable_score(9.96e-05) == "+1.0×10⁻⁴"
    assert "-" not in "".join(readable_score(x) for x in np.geomspace(1e-9, 10, 50) * np.resize([1, -1], 50))


@pytest.mark.slow
def test_helpful_images_for_confident_fastnet_predictions_share_their_class(cifar):
    """fastnet was trained with label smoothing 0.2. Scored with the plain test loss, the most helpful training images
    of a confident, correct prediction are mostly of its class and the most harmful mostly not; scored with the
    smoothed loss (the old swap) it was the other way round (34% vs 99%)."""
    fastnet = load_checkpoint(SHIPPED / "fastnet.safetensors")
    assert fastnet.meta["train_config"]["label_smoothing"] == 0.2
    index = load_or_fit("head", fastnet, cifar)
    test = split_artifacts(fastnet, cifar, "test", tta="none")
    p_true = test.probs[np.arange(len(test.labels)), test.labels]
    chosen = np.random.default_rng(0).choice(np.flatnonzero((test.predicted == test.labels) & (p_true > 0.9)), 20,
                                             replace=False)
    helpful, harmful = [], []
    for i in chosen:
        result = lookup(index, fastnet, cifar, int(i), k=10)
        label = cifar.classes[int(test.labels[i])]
        helpful.append(np.mean([e.label == label for e in result.helpful]))
        harmful.append(np.mean([e.label == label for e in result.harmful]))
    print(f"same label: helpful {np.mean(helpful):.0%}, harmful {np.mean(harmful):.0%}")
    assert np.mean(helpful) >= 0.7 and np.mean(harmful) <= 0.5


@pytest.mark.parametrize("config, message", [
    ({"label_smoothing": 5}, "outside"), ({"weight_decay": 1e308}, "plausible"), ({"weight_decay": "abc"}, "finite"),
    ({"label_smoothing": float("nan")}, "finite"), ({"weight_decay": 0.01, "weight_decay_mode": "per_step", "lr": 0},
                                                    "positive lr"),
])
def test_loss_settings_read_from_metadata_are_checked(config, message):
    from types import SimpleNamespace

    from cifarviz.analysis.influence import InfluenceError, Task

    with pytest.raises(InfluenceError, match=message):
        Task.from_checkpoint(SimpleNamespace(name="x", meta={"train_config": config}))
    task = Task.from_checkpoint(SimpleNamespace(name="x", meta={"train_config": {"weight_decay": 0.003, "lr": 1.5,
                                                                                "weight_decay_mode": "per_step"}}))
    assert task.l2 == pytest.approx(0.002) and task.measurement == "cross_entropy"


@pytest.mark.slow
def test_a_run_on_a_subset_gets_influence_over_the_images_it_saw(cifar, cifar_small, tmp_path):
    """The Train page's quick runs train on a subset: the 43,000 images such a run never saw (high loss, high
    self-influence) must not fill its lists."""
    from cifarviz.analysis.influence import loss_ranking, trained_positions
    from cifarviz.core.recipes import train_and_save

    path, _ = train_and_save(TrainConfig(model="lenet", epochs=1, batch_size=256), cifar_small, tmp_path / "run")
    run = load_checkpoint(path)
    positions, note = trained_positions(run, cifar)
    assert note is None and len(positions) == len(cifar_small.train) == 2000
    np.testing.assert_array_equal(cifar.train.source_index[positions], cifar_small.train.source_index)
    seen = set(positions.tolist())
    for method in ("head", "similarity"):
        index = load_or_fit(method, run, cifar)
        assert index.n_train == 2000 and index_path(method, run, cifar).is_file()  # where the app looks for it
        result = lookup(index, run, cifar, test_index=3, k=20)
        assert result.training_images == 2000
        assert {e.train_index for e in result.helpful + result.harmful} <= seen
        for entry in result.helpful:  # the entry names the image in the full training split
            assert cifar.train.source_index[entry.train_index] == entry.source_index
    order, _ = suspicious(load_or_fit("head", run, cifar), top=50)
    assert set(order.tolist()) <= seen
    assert set(loss_ranking(run, cifar, top=50)[0].tolist()) <= seen
    shipped = load_checkpoint(SHIPPED / "lenet.safetensors")  # trained before checkpoints kept the list
    everything, note = trained_positions(shipped, cifar)
    assert len(everything) == len(cifar.train) and "records no list" in note


@pytest.mark.parametrize("listed, words", [
    ([2**64] * 200, "outside"),  # above 2^63: numpy would raise OverflowError
    ([5], "fewer than"),  # one image: its lists would name it as most helpful and most harmful
    (list(range(49_990, 50_190)), "outside 0-49,999"),  # beyond the data: never blamed on --val-size
    ([3] * 300, "twice"),
    (list(range(150)) + ["7"], "not whole numbers"),
    ({"0": 1}, "not a list"),
])
def test_a_forged_record_of_training_images_is_named_and_ignored(cifar, listed, words):
    """provenance.train_images.indices, checked field by field: what is wrong is said, and influence is over every
    training image instead (never a crash, never a one-image index)."""
    import dataclasses

    from cifarviz.analysis.influence import trained_positions

    lenet = load_checkpoint(SHIPPED / "lenet.safetensors")
    meta = {**lenet.meta, "provenance": {"data_fingerprint": cifar.fingerprint,
                                         "train_images": {"indices": listed}}}
    positions, note = trained_positions(dataclasses.replace(lenet, meta=meta), cifar)
    assert len(positions) == len(cifar.train)
    assert "provenance.train_images.indices" in note and words in note and "val-size" not in note


def test_an_index_replaced_on_disk_is_read_again_not_served_from_memory(cifar_small, tmp_path, monkeypatch):
    """The app keeps indexes in memory keyed by which file holds them: a plain read (which touches the file's time
    for the store's LRU) keeps the key; a rebuilt file (written by rename: a new inode) changes it."""
    from cifarviz.ui.loaders import index_stamp

    monkeypatch.setenv("CIFARVIZ_CACHE", str(tmp_path / "cache"))
    lenet = load_checkpoint(SHIPPED_DIR / "lenet.safetensors")
    load_or_fit("similarity", lenet, cifar_small)
    first = index_stamp("similarity", lenet, cifar_small)
    load_or_fit("similarity", lenet, cifar_small)
    assert first and index_stamp("similarity", lenet, cifar_small) == first
    path = index_path("similarity", lenet, cifar_small)
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(path.read_bytes())
    fresh.replace(path)  # the same content in a new file, as every write of the store does it
    assert index_stamp("similarity", lenet, cifar_small) != first


def test_the_cli_says_what_it_builds_and_how_long_before_minutes_of_work(tmp_path, capsys, monkeypatch):
    """TRAK's index is minutes of work on the real split: before it starts, the CLI says what it builds, how long
    (per-example gradients timed now, or this machine's last build), and the quick measured method instead. Built
    once, it is not announced again. (A small image folder keeps the build itself to seconds.)"""
    from conftest import write_image_folder

    from cifarviz.core.data import CIFAR10_CLASSES

    monkeypatch.setenv("CIFARVIZ_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path / "data", classes=CIFAR10_CLASSES, per_class=(20, 3))
    args = ["influence", "-c", "lenet", "--method", "trak", "--data", str(tmp_path / "data"), "--val-size", "20",
            "--test-index", "2", "--k", "3", "--json"]
    assert main(args) == 0
    out = capsys.readouterr()
    said = out.err
    assert "Building the TRAK (whole network, projected gradients) index of lenet over 180 training images first" in said
    assert "estimated from per-example gradients timed just now" in said
    similarity = model_card("lenet").influence.mean_change["similarity"]
    assert "For an answer now: --method similarity (seconds). How sure? Retrained without" in said
    assert f"{similarity:+.2f}" in said
    assert json.loads(out.out)["method"] == "trak"  # and then it answered
    assert main(args) == 0
    assert "Building" not in capsys.readouterr().err  # built once: nothing to announce


@pytest.mark.slow
def test_a_training_run_records_each_images_margin_and_the_suspicious_list_uses_it(cifar, cifar_small, tmp_path):
    """train_and_save stores each training image's mean margin beside the weights; read back, the app's "area under
    the margin" ranking is that record, lowest margin first, over the images the run trained on. A file whose record
    is damaged (NaN, another type, unknown names, lengths that differ) loads its weights and ranks nothing by it."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from cifarviz.analysis.influence import MARGIN_RANKING, margin_ranking, suspicious_rankings
    from cifarviz.core.checkpoint import STATISTICS_PREFIX
    from cifarviz.core.recipes import RECIPES, train_and_save

    path, result = train_and_save(dataclasses.replace(RECIPES["lenet"], epochs=2), cifar_small,
                                  tmp_path / "run.safetensors")
    run = load_checkpoint(path)
    assert result.epoch_margins.shape == (2, len(cifar_small.train))
    # the second half of training: epoch 2 of 2
    np.testing.assert_allclose(run.statistics["mean_margin"], result.epoch_margins[1], rtol=1e-5, atol=1e-6)
    positions, values = margin_ranking(run, cifar, top=20)  # positions in the whole split's training images
    expected = np.argsort(result.mean_margins, kind="stable")[:20]
    assert list(cifar.train.source_index[positions]) == list(cifar_small.train.source_index[expected])
    np.testing.assert_allclose(values, -result.mean_margins[expected], rtol=1e-6)
    assert MARGIN_RANKING in suspicious_rankings(load_or_fit("head", run, cifar), run, cifar, top=5)

    tensors = load_file(path)
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    name = STATISTICS_PREFIX + "mean_margin"
    for damage in ({name: torch.full_like(tensors[name], float("nan"))}, {name: tensors[name].to(torch.int64)},
                   {STATISTICS_PREFIX + "surprise": tensors[name].clone()}, {name: tensors[name][:-1].clone()}):
        damaged = tmp_path / "damaged.safetensors"
        save_file({**tensors, **damage}, damaged, metadata=meta)
        loaded = load_checkpoint(damaged)
        assert loaded.statistics == {} and margin_ranking(loaded, cifar) is None
        assert torch.equal(loaded.model.head.weight, run.model.head.weight)  # the weights still load
