"""2-D maps of penultimate features (cifarviz.analysis.embed), their CLI and the Embeddings page, on the real development
data and the shipped checkpoints. Maps are of a fixed 2,000-image test subset (a few seconds each) unless a test
needs more."""

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import visible
from streamlit.testing.v1 import AppTest

from cifarviz.analysis import embed
from cifarviz.analysis.embed import (
    Embedding,
    EmbeddingError,
    check_params,
    class_mix,
    compute_embedding,
    embedding,
    embedding_path,
    knn_accuracy,
    selected_indices,
    subset_indices,
)
from cifarviz.cli import main
from cifarviz.core.checkpoint import load_checkpoint
from cifarviz.store import default_store
from cifarviz.store.artifacts import split_artifacts

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "checkpoints"
SUBSET = subset_indices(10_000, 2_000)


@pytest.fixture(scope="module")
def fastnet():
    return load_checkpoint(SHIPPED / "fastnet.safetensors")


@pytest.fixture(scope="module")
def lenet():
    return load_checkpoint(SHIPPED / "lenet.safetensors")


@pytest.mark.slow
def test_tsne_maps_of_real_features_separate_classes_by_how_good_the_network_is(cifar, fastnet, lenet):
    maps = {}
    for checkpoint in (fastnet, lenet, None):
        emb = embedding(checkpoint, cifar, "test", "tsne", {"perplexity": 30}, SUBSET)
        assert emb.coords.shape == (2000, 2) and emb.coords.dtype == np.float32 and np.isfinite(emb.coords).all()
        assert np.array_equal(emb.indices, SUBSET) and np.array_equal(emb.labels, cifar.test.labels[SUBSET])
        if checkpoint is not None:
            assert np.array_equal(emb.predicted, split_artifacts(checkpoint, cifar, "test").predicted[SUBSET])
        maps[emb.info["source"]] = knn_accuracy(emb.coords, emb.labels)
    print("10-NN accuracy in the t-SNE maps:", maps)
    assert maps["fastnet"] >= 0.8 and maps["fastnet"] >= maps["lenet"] + 0.1  # 0.88 vs 0.68 measured
    assert maps["lenet"] >= 0.5 > 0.1 * 3  # far above chance (10 classes)
    assert maps["lenet"] >= maps["raw pixels"] + 0.2  # what the network learned that the pixels do not show


@pytest.mark.slow
@pytest.mark.parametrize("method,params", [("tsne", {"perplexity": 20}), ("umap", {"n_neighbors": 10}),
                                           ("pca", {})])
def test_maps_are_deterministic_under_a_seed(cifar, fastnet, method, params):
    features = split_artifacts(fastnet, cifar, "test").features[SUBSET[:600]]
    first = compute_embedding(features, method, params, seed=3)
    assert first.shape == (600, 2) and np.isfinite(first).all()
    assert np.allclose(first, compute_embedding(features, method, params, seed=3), atol=1e-5)
    if method != "pca":  # a seed changes a stochastic map
        assert not np.allclose(first, compute_embedding(features, method, params, seed=4), atol=1e-2)


def test_a_map_is_computed_once_then_read_from_disk(cifar, lenet, monkeypatch):
    calls, fractions = [], []
    real = embed.compute_embedding
    monkeypatch.setattr(embed, "compute_embedding", lambda *a, **k: calls.append(1) or real(*a, **k))  # spy only
    subset = subset_indices(10_000, 700, seed=5)
    path = embedding_path(lenet, cifar, "test", "pca", {}, subset)
    path.unlink(missing_ok=True)
    first = embedding(lenet, cifar, "test", "pca", {}, subset, on_progress=fractions.append)
    assert path.is_file() and calls == [1] and fractions[-1] == 1.0
    second = embedding(lenet, cifar, "test", "pca", None, subset, on_progress=fractions.append)  # defaults: same key
    assert calls == [1] and np.array_equal(first.coords, second.coords)
    default_store().forget()  # a new process: from the file, still not recomputed
    assert np.array_equal(embedding(lenet, cifar, "test", "pca", {}, subset).coords, first.coords) and calls == [1]
    assert not list(path.parent.glob(".*.tmp"))
    with np.load(path, allow_pickle=False) as z:  # plain arrays, readable without pickle
        assert set(z.files) == {"coords", "indices", "labels", "predicted", "info", "__key__"}  # and its key
    # everything that changes the content changes the file
    others = {embedding_path(lenet, cifar, "test", "pca", {}, subset_indices(10_000, 700, seed=6)),
              embedding_path(lenet, cifar, "test", "tsne", {}, subset),
              embedding_path(lenet, cifar, "test", "tsne", {"perplexity": 31}, subset),
              embedding_path(None, cifar, "test", "pca", {}, subset),
              embedding_path(lenet, cifar, "test", "pca", {}, subset, seed=1),
              embedding_path(lenet, cifar, "test", "pca", {}, None)}
    assert path not in others and len(others) == 6


def test_selection_gives_the_image_indices_inside_the_box_or_clicked():
    coords = np.array([[0, 0], [1, 1], [2, 2], [3, 3], [1, 3]], dtype=np.float32)
    emb = Embedding(coords, np.array([10, 11, 12, 13, 14]), np.array([0, 1, 1, 2, 0]), None, {})
    assert selected_indices(emb, box={"x": [0.5, 2.5], "y": [0.5, 2.5]}).tolist() == [11, 12]
    assert selected_indices(emb, box={"x": [2.5, 0.5], "y": [3.5, 0.5]}).tolist() == [11, 12, 14]  # any order
    assert selected_indices(emb, points=[13, 99]).tolist() == [13]  # 99 is not on this map
    assert selected_indices(emb, box={"x": [5, 6], "y": [5, 6]}).tolist() == []
    assert class_mix(emb.labels[[1, 2, 4]], 4).tolist() == [1, 2, 0, 0]


def test_knn_accuracy_in_a_map():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    separated = rng.normal(size=(200, 2)) * 0.1 + labels[:, None] * 10
    assert knn_accuracy(separated, labels) == 1.0
    mixed = knn_accuracy(rng.normal(size=(2000, 2)), rng.integers(0, 10, 2000))
    assert 0.03 < mixed < 0.2  # about chance
    pairs = np.repeat(rng.normal(size=(20, 2)) * 100, 2, axis=0)  # each point twice, at distance 0 from itself
    assert knn_accuracy(pairs, np.repeat(rng.integers(0, 10, 20), 2), k=1) == 1.0  # its twin votes, never itself
    with pytest.raises(EmbeddingError, match="k = 200"):
        knn_accuracy(separated, labels, k=200)


@pytest.mark.parametrize("method,params,words", [
    ("isomap", {}, "Unknown embedding method 'isomap'"),
    ("tsne", {"perplexity": 0.5}, "choose 2 to 100"),
    ("tsne", {"n_neighbors": 5}, "tsne takes no parameter n_neighbors"),
    ("umap", {"min_dist": 3}, "min_dist 3 is out of range"),
    ("umap", {"n_neighbors": "many"}, "must be numbers"),
    ("pca", {"perplexity": 30}, "its parameters: none"),
])
def test_bad_parameters_get_one_clear_message(method, params, words):
    with pytest.raises(EmbeddingError, match=words):
        check_params(method, params)


def test_bad_subsets_and_sizes(cifar):
    with pytest.raises(EmbeddingError, match="too large for 100 points"):
        check_params("tsne", {"perplexity": 50}, n_points=100)
    with pytest.raises(EmbeddingError, match="at least 20"):
        subset_indices(10_000, 5)
    with pytest.raises(EmbeddingError, match="0 to 9,999"):
        embedding_path(None, cifar, "test", "pca", {}, np.arange(9_990, 10_030))
    with pytest.raises(EmbeddingError, match="twice"):
        embedding_path(None, cifar, "test", "pca", {}, np.zeros(30, dtype=int))
    with pytest.raises(EmbeddingError, match="Unknown split"):
        embedding_path(None, cifar, "holdout", "pca", {})


def test_cli_embed_writes_the_map_and_reuses_the_cache(cifar, tmp_path, capsys):
    out = tmp_path / "map.csv"
    args = ["embed", "-c", "lenet", "--method", "pca", "--subset", "500", "--data", str(cifar.root), "--out", str(out)]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "lenet: pca map of 500 test images" in first and "10-NN accuracy in the map" in first
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 500 and set(rows[0]) == {"index", "x", "y", "label", "predicted"}
    lenet = split_artifacts(load_checkpoint(SHIPPED / "lenet.safetensors"), cifar, "test")
    i = int(rows[0]["index"])
    assert rows[0]["label"] == cifar.classes[lenet.labels[i]]
    assert rows[0]["predicted"] == cifar.classes[lenet.predicted[i]]
    assert main(args) == 0 and "already cached" in capsys.readouterr().out
    assert main(["embed", "-c", "lenet", "--method", "umap", "--perplexity", "30"]) == 2  # before any data
    assert "umap takes no parameter perplexity" in capsys.readouterr().err
    assert main(["embed", "--method", "pca"]) == 2 and "--pixels" in capsys.readouterr().err


# --------------------------------------------------------------------------- the page (AppTest)


@pytest.mark.slow
def test_embeddings_page_map_comparison_selection_and_inspector(cifar, fastnet):
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = str(cifar.root)
    at.session_state["emb_method"] = "pca"  # seconds on the whole test split
    at.run()
    at.switch_page("pages/embeddings.py").run()
    deadline = time.monotonic() + 300
    while at.progress or not at.get("vega_lite_chart"):  # a progress bar, then the map
        assert not at.exception, [e.value for e in at.exception]
        assert time.monotonic() < deadline, "the map never arrived"
        time.sleep(1)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    emb = embedding(fastnet, cifar, "test", "pca", {})
    page = "\n".join(m.value for m in at.markdown)
    assert f"10-NN accuracy in this map: {knn_accuracy(emb.coords, emb.labels):.1%}" in page
    assert len(at.get("vega_lite_chart")) == 1

    at.selectbox(key="emb_compare").set_value("raw pixels (PCA to 50 dimensions first)").run()
    while at.progress:
        assert time.monotonic() < deadline, "the pixel map never arrived"
        time.sleep(1)
        at.run()
    assert not at.exception and len(at.get("vega_lite_chart")) == 2
    assert page.count("10-NN accuracy in this map") == 1
    assert "\n".join(m.value for m in at.markdown).count("10-NN accuracy in this map") == 2

    # a box's images (what a drag on the map stores) as a grid with their class mix; a tile opens the inspector
    inside = selected_indices(emb, box={"x": [emb.coords[:, 0].min(), np.median(emb.coords[:, 0])],
                                        "y": [emb.coords[:, 1].min(), np.median(emb.coords[:, 1])]})
    at.session_state["emb_selected"] = ("test", inside.tolist())
    at.run()
    assert f"{len(inside):,} images in the box" in [s.value for s in at.subheader]
    mix = class_mix(cifar.test.labels[inside], 10)
    top = int(np.argmax(mix))
    assert f"{cifar.classes[top]} {mix[top]}" in "\n".join(m.value for m in at.markdown)
    tiles = [b for b in at.button if b.key and b.key.startswith("emb-selection-test-")]
    assert [int(b.key.rsplit("-", 1)[1]) for b in tiles] == inside[:60].tolist()
    predicted = split_artifacts(load_checkpoint(SHIPPED / "fastnet.safetensors"), cifar, "test").predicted
    for b in tiles[:20]:  # each tile names the true label first, as the export and the Influence page do
        i = int(b.key.rsplit("-", 1)[1])
        true, guess = cifar.classes[cifar.test.labels[i]], cifar.classes[predicted[i]]
        assert b.label.endswith(f"✓ {true}" if true == guess else f"✗ {true} → {guess}"), b.label
    tiles[0].click().run()
    assert f"Test image #{inside[0]}" in "\n".join(m.value for m in at.markdown)

    # the projector's search: image numbers and class names ring their points and list them below
    at.session_state["inspect"] = None
    at.selectbox(key="emb_compare").set_value("nothing").run()
    at.text_input(key="emb_find").set_value(f"{inside[1]}, 9999999, nonsense {inside[2]}").run()
    assert not at.exception and "2 images found" in [s.value for s in at.subheader]
    spec = json.loads(at.get("vega_lite_chart")[0].proto.spec)
    assert len(spec["layer"]) == 2  # the points, and the rings over the found ones
    found = [int(b.key.rsplit("-", 1)[1]) for b in at.button if b.key and b.key.startswith("emb-selection-test-")]
    assert found == sorted([int(inside[1]), int(inside[2])])
    at.text_input(key="emb_find").set_value("FROG").run()
    assert f"{(cifar.test.labels == 6).sum():,} images found" in [s.value for s in at.subheader]

    # the layer to map, from the network's own convolutions
    at.text_input(key="emb_find").set_value("").run()
    at.selectbox(key="emb_layer").set_value("features.3.conv2").run()
    while at.progress:
        assert time.monotonic() < deadline + 300, "the layer's map never arrived"
        time.sleep(1)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    layer_map = embedding(fastnet, cifar, "test", "pca", {}, layer="features.3.conv2")
    assert f"10-NN accuracy in this map: {knn_accuracy(layer_map.coords, layer_map.labels):.1%}" in \
        "\n".join(m.value for m in at.markdown)
    assert any("layer features.3.conv2's channels" in visible(c.value) for c in at.caption)


@pytest.mark.slow
def test_a_tsne_shows_its_layouts_as_it_goes_and_ends_where_it_would_without(cifar, fastnet):
    """The first layout (t-SNE's PCA start) comes before the slow neighbour search, then one every 25
    iterations; watching changes nothing: the final map is the one computed without a watcher."""
    features = split_artifacts(fastnet, cifar, "test").features[:1500]
    seen, fractions = [], []

    def progress(fraction):
        fractions.append(fraction)

    watched = embed.compute_embedding(features, "tsne", {"perplexity": 30}, on_progress=progress,
                                      on_partial=lambda coords: seen.append((len(fractions), coords)))
    plain = embed.compute_embedding(features, "tsne", {"perplexity": 30})
    np.testing.assert_array_equal(watched, plain)
    first_at, first = seen[0]
    assert max(fractions[:first_at]) < 0.15  # before the affinities (the slow part before any movement)
    assert first.shape == (1500, 2) and not np.allclose(first, plain)  # a start, not the answer
    assert len(seen) >= (embed.TSNE_EXAGGERATION_ITERS + embed.TSNE_ITERS) // 25
    assert np.allclose(seen[-1][1], plain, atol=1e-3 * np.abs(plain).max())  # the last layout is the map


@pytest.mark.slow
def test_the_embeddings_page_shows_the_layout_while_the_map_computes(cifar, fastnet):
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = str(cifar.root)
    at.session_state["emb_perplexity"] = 37  # a map no other test computed, of 2,000 training images (seconds)
    at.session_state["emb_split"], at.session_state["emb_train_size"] = "train", 2_000
    split_artifacts(fastnet, cifar, "train")  # the features (computed in the background, in class)
    at.run()
    at.switch_page("pages/embeddings.py").run()
    deadline, preview, stages = time.monotonic() + 600, None, set()
    while not at.get("vega_lite_chart") or at.progress:
        assert not at.exception, [e.value for e in at.exception]
        assert time.monotonic() < deadline, "the map never arrived"
        if any("Still arranging" in c.value for c in at.caption) and at.get("vega_lite_chart"):
            preview = json.loads(at.get("vega_lite_chart")[0].proto.spec)
        stages |= {p.proto.text.split(": ", 1)[1].split(",")[0] for p in at.get("progress") if ": " in p.proto.text}
        time.sleep(0.25)
        at.run()
    assert preview is not None, "no layout was shown while the t-SNE ran"
    assert "10-NN accuracy in this map" in "\n".join(m.value for m in at.markdown)  # then the finished map
    final = json.loads(at.get("vega_lite_chart")[0].proto.spec)
    # the preview's colours and legend are the finished map's: a class keeps its colour when the map lands
    for key in ("scale", "title"):
        assert preview["encoding"]["color"][key] == final["encoding"]["color"][key], key
    assert stages & {"finding each image's neighbours", "laying out: pulling neighbours together",
                     "laying out: refining"}, stages  # the bar says what the work is doing, in words


@pytest.mark.slow
def test_a_map_of_minutes_is_asked_for_first(cifar, fastnet):
    """All 45,000 training images on a t-SNE map are minutes of work: choosing them starts nothing until "Compute
    this map", and once measured here the page says how long it took."""
    from cifarviz.services.jobs import JOBS
    from cifarviz.store import timings
    from cifarviz.ui.embeddings import map_timing_key

    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = str(cifar.root)
    at.session_state["emb_split"], at.session_state["emb_train_size"] = "train", len(cifar.train)
    at.session_state["emb_perplexity"] = 41
    split_artifacts(fastnet, cifar, "train")  # the features a map of training images starts from
    at.run()
    at.switch_page("pages/embeddings.py").run()
    assert not at.exception, [e.value for e in at.exception]
    page = "\n".join(m.value for m in at.markdown)
    assert "map of **45,000** images is not computed yet" in page and "a few minutes" in page
    assert not at.progress and not [key for key in JOBS._jobs if "tsne" in key]  # nothing started
    timings.record(map_timing_key(fastnet, cifar, "train", "tsne", np.arange(len(cifar.train))), 300.0)
    at.run()
    assert "about 5 minutes (as long as it took on this server last time)" in "\n".join(m.value for m in at.markdown)
    assert not at.progress and not [key for key in JOBS._jobs if "tsne" in key]


@pytest.mark.slow
def test_a_map_of_an_early_layer_separates_the_classes_less_than_the_penultimate_features(cifar, fastnet):
    """The layer to embed is the reader's choice: on fastnet's test images, the first convolution's channels
    (colours and edges) separate the classes far less on a PCA map than the penultimate features do; each map is
    stored under its own key and says which layer it maps; a name that is not a convolution is refused."""
    subset = np.arange(2000)
    deep = embedding(fastnet, cifar, "test", "pca", {}, subset)
    early = embedding(fastnet, cifar, "test", "pca", {}, subset, layer="features.0")
    assert early.info["layer"] == "features.0" and deep.info["layer"] == "penultimate"
    assert embed.embedding_path(fastnet, cifar, "test", "pca", {}, subset, layer="features.0") != \
        embed.embedding_path(fastnet, cifar, "test", "pca", {}, subset)
    early_acc, deep_acc = knn_accuracy(early.coords, early.labels), knn_accuracy(deep.coords, deep.labels)
    assert early_acc + 0.15 < deep_acc, (early_acc, deep_acc)
    with pytest.raises(embed.EmbeddingError, match="no convolution 'head'"):
        embedding(fastnet, cifar, "test", "pca", {}, subset, layer="head")
    with pytest.raises(embed.EmbeddingError, match="Raw pixels have no layers"):
        embedding(None, cifar, "test", "pca", {}, subset, layer="features.0")


@pytest.mark.slow
def test_a_lasso_selects_the_points_inside_its_outline(cifar, fastnet):
    """The lasso (drawn on the Plotly map) selects exactly the points inside its outline, any shape: checked against
    matplotlib's point-in-polygon on the real test map, for a concave outline."""
    from matplotlib.path import Path as Outline

    from cifarviz.ui.embeddings import lasso_polygon, lasso_selection

    emb = embedding(fastnet, cifar, "test", "pca", {})
    low, high = emb.coords.min(0), emb.coords.max(0)
    (x0, y0), (x1, y1) = low + 0.013 * (high - low), high - 0.017 * (high - low)  # no point on an edge
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    outline = [(x0, y0), (x1, y0), (cx, cy), (x1, y1), (x0, y1)]  # an arrowhead: concave at the centre
    event = {"selection": {"lasso": [{"x": [p[0] for p in outline], "y": [p[1] for p in outline]}], "points": []}}
    assert lasso_polygon(event) == outline and lasso_polygon({"selection": {"lasso": []}}) is None
    chosen = selected_indices(emb, polygon=lasso_polygon(event))
    expected = emb.indices[Outline(np.array(outline)).contains_points(emb.coords)]
    assert set(chosen.tolist()) == set(expected.tolist()) and 0 < len(chosen) < len(emb)
    assert embed.inside_polygon(emb.coords, outline[:2]).sum() == 0  # two points are no outline
    assert set(lasso_selection(emb, event).tolist()) == set(expected.tolist())
    reported = {"selection": {"lasso": [], "points": [{"customdata": [7]}, {"customdata": [3]}]}}
    assert lasso_selection(emb, reported).tolist() == [3, 7] and lasso_selection(emb, {}) is None


@pytest.mark.slow
def test_the_map_draws_with_a_lasso_when_asked(cifar, fastnet):
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = str(cifar.root)
    at.session_state["emb_method"] = "pca"
    at.run()
    at.switch_page("pages/embeddings.py").run()
    deadline = time.monotonic() + 300
    while at.progress or not at.get("vega_lite_chart"):
        assert time.monotonic() < deadline, "the map never arrived"
        time.sleep(1)
        at.run()
    at.segmented_control(key="emb_select_with").set_value("lasso").run()
    assert not at.exception, [e.value for e in at.exception]
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert figure["layout"]["dragmode"] == "lasso" and len(figure["data"]) == 10  # a trace per class
    assert "Draw a lasso on a map" in "\n".join(c.value for c in at.caption)
