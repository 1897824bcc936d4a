"""2-D maps of what a network learned: t-SNE, UMAP or PCA of a split's penultimate features (or raw pixels).

    emb = embedding(checkpoint, dataset, "test", "tsne", {"perplexity": 30})   # cached on disk, once ever
    emb.coords, emb.indices, emb.labels, emb.predicted                         # (n, 2) and per-point arrays
    knn_accuracy(emb.coords, emb.labels)                                       # how well the map separates classes

A map is computed once per (checkpoint weights and test-time augmentation, the split's exact images, method,
parameters, subset, seed) through the store (a plain .npz, schema-checked on read: a map with NaN coordinates, other
indices or labels is rebuilt, never shown); a file lock per map makes a second process wait for the first one's
file. `checkpoint=None` maps the raw pixels, the baseline that shows what the network added. Inputs with more than
50 dimensions (fastnet's 192 features, 3,072 pixels) are first reduced to 50 with PCA, as openTSNE's and UMAP's
guides advise: faster neighbour search, the same map."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifarviz.core.errors import CifarvizError
from cifarviz.store.artifacts import model_identity, split_artifacts, split_digest, split_tta
from cifarviz.store.cache import Array, CacheKey, Schema, default_store, digest_array

EMBED_VERSION = 2  # 2: through the store, keyed by the model's architecture and arguments too
SEED = 0
PCA_DIMS = 50  # inputs wider than this are reduced with PCA before t-SNE / UMAP
METHODS = {"tsne": "t-SNE (openTSNE)", "umap": "UMAP (umap-learn)", "pca": "PCA (scikit-learn)"}
DEFAULT_PARAMS = {"tsne": {"perplexity": 30.0}, "umap": {"n_neighbors": 15, "min_dist": 0.1}, "pca": {}}
TSNE_EXAGGERATION_ITERS, TSNE_ITERS = 250, 500  # openTSNE's defaults
MIN_POINTS = 20
# openTSNE's threads busy-wait: on a small machine shared with a server and other work more threads were slower, not
# faster (bench/bench_embed.py, figures in the README); big machines get 4.
TSNE_JOBS = 1 if (os.cpu_count() or 1) <= 4 else 4
FFT_FROM = 10_000  # openTSNE's own rule: Barnes-Hut below, FFT-interpolated gradients from here on


class EmbeddingError(CifarvizError):
    """A bad method, parameter, split or subset for a 2-D map."""


@dataclass(frozen=True, eq=False)  # hashed by identity: maps are loaded once per file and cached
class Embedding:
    coords: np.ndarray  # (n, 2) float32
    indices: np.ndarray  # (n,) image indices into the split
    labels: np.ndarray  # (n,) true classes
    predicted: np.ndarray | None  # (n,) the checkpoint's predictions; None for raw pixels
    info: dict  # source, split, method, params, seed, seconds (the computation's own time)

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------- parameters


def check_params(method: str, params: dict | None, n_points: int | None = None) -> dict:
    """The method's full parameters (defaults filled in, canonical types), or one EmbeddingError saying what to fix."""
    if method not in METHODS:
        raise EmbeddingError(f"Unknown embedding method {method!r}. Methods: {', '.join(METHODS)}.")
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULT_PARAMS[method]))
    if unknown:
        allowed = ", ".join(DEFAULT_PARAMS[method]) or "none"
        raise EmbeddingError(f"{method} takes no parameter {', '.join(unknown)} (its parameters: {allowed}).")
    full = {**DEFAULT_PARAMS[method], **params}
    try:
        full = {key: type(DEFAULT_PARAMS[method][key])(value) for key, value in full.items()}
    except (TypeError, ValueError):
        raise EmbeddingError(f"{method} parameters must be numbers, not {params}.") from None
    if method == "tsne":
        perplexity = full["perplexity"]
        if not 2 <= perplexity <= 100:
            raise EmbeddingError(f"perplexity {perplexity:g} is out of range: choose 2 to 100 (30 is usual).")
        if n_points is not None and perplexity >= (n_points - 1) / 3:
            raise EmbeddingError(f"perplexity {perplexity:g} is too large for {n_points:,} points: choose less than "
                                 f"{(n_points - 1) / 3:.0f}, or map more points.")
    elif method == "umap":
        if not 2 <= full["n_neighbors"] <= 200:
            raise EmbeddingError(f"n_neighbors {full['n_neighbors']} is out of range: choose 2 to 200 (15 is usual).")
        if n_points is not None and full["n_neighbors"] >= n_points:
            raise EmbeddingError(f"n_neighbors {full['n_neighbors']} needs more than {n_points:,} points: choose "
                                 "fewer neighbours, or map more points.")
        if not 0 <= full["min_dist"] <= 1:
            raise EmbeddingError(f"min_dist {full['min_dist']:g} is out of range: choose 0 to 1 (0.1 is usual).")
    return full


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise EmbeddingError(f"seed {seed!r} is out of range: choose a whole number from 0 to {2**32 - 1:,} (--seed).")


def subset_indices(n_total: int, size: int | None, seed: int = SEED) -> np.ndarray | None:
    """`size` images of a split picked at random (sorted), the same ones for the same seed; None means all."""
    check_seed(seed)
    if size is None or size >= n_total:
        return None
    if size < MIN_POINTS:
        raise EmbeddingError(f"A map of {size} images is too small: choose at least {MIN_POINTS}.")
    return np.sort(np.random.default_rng(seed).choice(n_total, size, replace=False))


def _check_subset(subset, n_total: int, split: str) -> np.ndarray:
    if subset is None:
        return np.arange(n_total)
    idx = np.asarray(subset)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise EmbeddingError("A subset is a list of image indices (integers).")
    if len(idx) < MIN_POINTS:
        raise EmbeddingError(f"A map of {len(idx)} images is too small: choose at least {MIN_POINTS}.")
    if idx.min() < 0 or idx.max() >= n_total:
        raise EmbeddingError(f"Subset indices must be 0 to {n_total - 1:,} (the {split} split has {n_total:,} images).")
    if len(np.unique(idx)) != len(idx):
        raise EmbeddingError("A subset lists some images twice; give each image once.")
    return idx.astype(np.int64)


# --------------------------------------------------------------------------- cache


_LAYERS: dict[int, tuple] = {}  # id(model) -> (weak reference, its convolutions' names): asked on every rerun
_LAYERS_LOCK = threading.Lock()


def layer_names(model) -> list[str]:
    """The model's convolutions that output a map, in forward order (saliency.conv_layers), once per model."""
    import weakref

    from cifarviz.analysis.saliency import conv_layers

    with _LAYERS_LOCK:
        known = _LAYERS.get(id(model))
    if known is None or known[0]() is not model:
        known = (weakref.ref(model), [n for n, _ in conv_layers(model, np.zeros((32, 32, 3), np.uint8))])
        with _LAYERS_LOCK:
            _LAYERS[id(model)] = known
            while len(_LAYERS) > 64:
                _LAYERS.pop(next(iter(_LAYERS)))
    return list(known[1])


def check_layer(checkpoint, layer: str | None) -> None:
    """`layer`: None (the penultimate features, the head's input) or one of the checkpoint's convolutions."""
    if layer is None:
        return
    if checkpoint is None:
        raise EmbeddingError("Raw pixels have no layers: map a checkpoint's layer, or the pixels.")
    names = layer_names(checkpoint.model)
    if layer not in names:
        raise EmbeddingError(f"{checkpoint.name} has no convolution {layer!r} to map; its convolutions: "
                             f"{', '.join(names)}.")


def embedding_key(checkpoint, dataset, split: str, method: str, params: dict | None = None, subset=None,
                  seed: int = SEED, layer: str | None = None) -> CacheKey:
    """The store key of one map: the source (the model's identity and TTA, or the raw pixels; the layer when not
    the penultimate features), the split's exact images, which of them, the method with all its parameters and
    fixed settings, and the seed."""
    check_seed(seed)
    check_layer(checkpoint, layer)
    if split not in ("train", "val", "test"):
        raise EmbeddingError(f"Unknown split {split!r}: choose train, val or test.")
    n_total = len(dataset.split(split))
    idx = _check_subset(subset, n_total, split)
    full = check_params(method, params, len(idx))
    source = "pixels" if checkpoint is None else {**model_identity(checkpoint), "tta": split_tta(checkpoint, split)}
    if layer is not None:  # a convolution's channels, averaged over positions, of the plain images
        source = {**source, "tta": "none", "layer": layer}
    settings = {"pca_dims": PCA_DIMS, "tsne_iters": [TSNE_EXAGGERATION_ITERS, TSNE_ITERS], "fft_from": FFT_FROM}
    return CacheKey("embeddings", EMBED_VERSION, {
        "source": source, "images": split_digest(dataset, split), "split": split, "method": method, "params": full,
        "which": "all" if subset is None else digest_array(idx), "seed": seed, "settings": settings,
    }, label=method)


def embedding_path(checkpoint, dataset, split: str, method: str, params: dict | None = None, subset=None,
                   seed: int = SEED, layer: str | None = None) -> Path:
    """The cache file of one map (see embedding_key)."""
    return default_store().path(embedding_key(checkpoint, dataset, split, method, params, subset, seed, layer))


def embedding_ready(checkpoint, dataset, split: str, method: str, params: dict | None = None, subset=None,
                    seed: int = SEED, layer: str | None = None) -> bool:
    """Whether the map is at hand (stored, or kept in memory without a disk) without computing it."""
    return default_store().has(embedding_key(checkpoint, dataset, split, method, params, subset, seed, layer))


def _schema(expected_indices: np.ndarray, expected_labels: np.ndarray, with_predictions: bool) -> Schema:
    def matches(arrays, dims):
        if not np.array_equal(arrays["indices"], expected_indices):
            return "its image indices are not the ones asked for"
        if not np.array_equal(arrays["labels"], expected_labels):
            return "its labels differ from the split's"
        if len(arrays["predicted"]) != (len(expected_indices) if with_predictions else 0):
            return "it has the wrong number of predictions"
        try:
            info = json.loads(str(arrays["info"]))
        except ValueError:
            return "its info is not JSON"
        return None if isinstance(info, dict) else "its info is not a JSON object"

    return Schema({"coords": Array("f", ("n", 2)), "indices": Array("i", ("n",), low=0, below="total"),
                   "labels": Array("i", ("n",), low=0), "predicted": Array("i", (None,), low=0),
                   "info": Array("U", ())}, check=matches)


def _embedding(arrays: dict) -> Embedding:
    """One Embedding per stored result: pages cache by identity."""
    ident = id(arrays["coords"])
    with _MAPS_LOCK:
        known = _MAPS.get(ident)
        if known is not None and known.coords is arrays["coords"]:
            return known
        predicted = arrays["predicted"] if arrays["predicted"].size else None
        emb = _MAPS[ident] = Embedding(arrays["coords"], arrays["indices"], arrays["labels"], predicted,
                                       json.loads(str(arrays["info"])))
        while len(_MAPS) > 32:
            _MAPS.pop(next(iter(_MAPS)))
    return emb


_MAPS: dict[int, Embedding] = {}
_MAPS_LOCK = threading.Lock()


def embedding(checkpoint, dataset, split: str, method: str, params: dict | None = None, subset=None, *,
              seed: int = SEED, on_progress=None, on_partial=None, layer: str | None = None) -> Embedding:
    """The 2-D map of `split` (or of the images `subset` of it): from the store, or computed and stored now.

    `checkpoint=None` maps the raw pixels. `on_progress(fraction)` is called while it runs; `on_partial(coords)`
    with each intermediate layout of a t-SNE (its starting PCA layout first), for a first view that refines.
    `layer`: map that convolution's channels (averaged over positions) instead of the penultimate features."""
    key = embedding_key(checkpoint, dataset, split, method, params, subset, seed, layer)
    data = dataset.split(split)
    idx = _check_subset(subset, len(data), split)
    full = check_params(method, params, len(idx))

    def compute() -> dict:
        if checkpoint is None:
            inputs, predicted = data.images[idx].reshape(len(idx), -1).astype(np.float32) / 255, None
        else:
            arts = split_artifacts(checkpoint, dataset, split)
            inputs, predicted = arts.features[idx], arts.predicted[idx]
            if layer is not None:
                from cifarviz.core.inference import layer_features

                stage = getattr(on_progress, "stage", None)
                if stage:
                    stage(f"reading layer {layer} of the {len(idx):,} images")
                inputs = layer_features(checkpoint.model, data.images[idx], layer)
        start = time.perf_counter()
        coords = compute_embedding(inputs, method, full, seed=seed, on_progress=on_progress, on_partial=on_partial)
        info = {"source": "raw pixels" if checkpoint is None else checkpoint.name, "layer": layer or "penultimate",
                "split": split, "method": method,
                "params": full, "seed": seed, "points": len(idx), "seconds": round(time.perf_counter() - start, 2)}
        return {"coords": coords, "indices": idx, "labels": data.labels[idx],
                "predicted": np.zeros(0, np.int64) if predicted is None else predicted,
                "info": np.array(json.dumps(info))}

    schema = _schema(idx, data.labels[idx], checkpoint is not None)
    return _embedding(default_store().cached(key, compute, schema, dims={"n": len(idx), "total": len(data)}))


# --------------------------------------------------------------------------- methods


def compute_embedding(inputs: np.ndarray, method: str, params: dict | None = None, *, seed: int = SEED,
                      on_progress=None, on_partial=None) -> np.ndarray:
    """(n, 2) float32 coordinates of `inputs` (n, d), uncached. Deterministic for a seed (`on_partial`, see
    `embedding`, only looks: the result is the same with it or without)."""
    report = on_progress or (lambda fraction: None)
    stage = getattr(report, "stage", None) or (lambda text, linear=False: None)  # a job's reporter says stages
    params = check_params(method, params, len(inputs))
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    report(0.01)
    if method == "pca" or x.shape[1] > PCA_DIMS:
        stage("projecting with PCA" if method == "pca" else f"reducing to {PCA_DIMS} dimensions (PCA)")
        from sklearn.decomposition import PCA

        x = PCA(2 if method == "pca" else PCA_DIMS, random_state=seed).fit_transform(x).astype(np.float32)
    report(0.05)
    if method == "umap" and on_partial is not None:
        on_partial(np.ascontiguousarray(x[:, :2]))  # UMAP has no layout until it ends: show the PCA one meanwhile
    if method == "tsne":
        x = _tsne(x, params["perplexity"], seed, report, on_partial, stage)
    elif method == "umap":
        x = _umap(x, params["n_neighbors"], params["min_dist"], seed, report, stage)
    report(1.0)
    return np.ascontiguousarray(x, dtype=np.float32)


def _tsne(x: np.ndarray, perplexity: float, seed: int, report, on_partial=None, stage=None) -> np.ndarray:
    """openTSNE in its two phases (early exaggeration, then the rest), so progress is reported per iteration.

    From 10,000 points the gradients are FFT-interpolated with ints_in_interval=2, half the grid resolution of
    openTSNE's default: faster, with the same 10-NN accuracy in the map (bench/bench_embed.py)."""
    from openTSNE import TSNEEmbedding, affinity, initialization

    start = initialization.pca(x, random_state=seed)
    show = on_partial or (lambda coords: None)
    show(np.array(start, dtype=np.float32))  # a first view in a second: the PCA layout t-SNE starts from
    stage = stage or (lambda text, linear=False: None)
    stage("finding each image's neighbours")
    affinities = affinity.PerplexityBasedNN(x, perplexity=perplexity, n_jobs=TSNE_JOBS, random_state=seed)
    report(0.15)
    total = TSNE_EXAGGERATION_ITERS + TSNE_ITERS
    done = [0]

    def callback(iteration, error, embedding):  # openTSNE restarts the count in each phase
        report(0.15 + 0.85 * (done[0] + iteration) / total)
        show(np.array(embedding, dtype=np.float32))  # a copy: openTSNE goes on moving its own array
        return False

    fft = {"negative_gradient_method": "fft", "ints_in_interval": 2} if len(x) >= FFT_FROM else {
        "negative_gradient_method": "bh"}
    emb = TSNEEmbedding(start, affinities, n_jobs=TSNE_JOBS, random_state=seed,
                        callbacks=callback, callbacks_every_iters=25, **fft)
    stage("laying out: pulling neighbours together", linear=True)
    emb = emb.optimize(TSNE_EXAGGERATION_ITERS, exaggeration=12, momentum=0.5)
    done[0] = TSNE_EXAGGERATION_ITERS
    stage("laying out: refining", linear=True)
    emb = emb.optimize(TSNE_ITERS, momentum=0.8)
    return np.asarray(emb)


class _EpochReader:
    """A file for umap-learn's tqdm bar (its documented `tqdm_kwds`): turns "n/total" writes into progress."""

    def __init__(self, report, start: float, on_first=None):
        self.report, self.start, self.on_first = report, start, on_first

    def write(self, text: str) -> None:
        done, _, total = text.strip().partition("/")
        if done.isdigit() and total.isdigit() and int(total):
            if self.on_first is not None:  # the first epoch: the layout stage begins
                self.on_first()
                self.on_first = None
            self.report(self.start + (1 - self.start) * int(done) / int(total))

    def flush(self) -> None:
        pass


def _umap(x: np.ndarray, n_neighbors: int, min_dist: float, seed: int, report, stage=None) -> np.ndarray:
    """umap-learn, seeded (which makes it single-threaded: reproducible maps matter more in a class).
    The first call in a process compiles umap's numba functions (see bench/bench_embed.py)."""
    import umap

    stage = stage or (lambda text, linear=False: None)
    stage("finding each image's neighbours and building the graph")
    reader = _EpochReader(report, 0.4, lambda: stage("laying out", linear=True))  # neighbours and the graph
    # (and the first call's compilation) come first; the layout's epochs then report through umap's bar
    model = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed, n_jobs=1,
                      tqdm_kwds={"disable": False, "file": reader, "bar_format": "{n}/{total}", "mininterval": 0.2})
    return model.fit_transform(x)


# --------------------------------------------------------------------------- reading a map


def knn_accuracy(coords: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Leave-one-out k-nearest-neighbour accuracy in the map: how often a point's k nearest other points vote for
    its own class (ties go to the nearest of the tied classes). Chance is about 1/classes."""
    from sklearn.neighbors import NearestNeighbors

    n = len(coords)
    if not 1 <= k < n:
        raise EmbeddingError(f"k = {k} must be 1 to {n - 1} for {n:,} points.")
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(coords).kneighbors(coords, return_distance=False)
    not_self = neighbours != np.arange(n)[:, None]
    not_self[not_self.all(1), -1] = False  # a point tied with k others at distance 0 may not list itself
    neighbours = neighbours[not_self].reshape(n, k)
    votes = labels[neighbours]
    counts = (votes[:, :, None] == np.arange(labels.max() + 1)).sum(1)
    best = counts.max(1, keepdims=True)
    tied = counts[np.arange(n)[:, None], votes] == best  # the nearest neighbour whose class has the most votes
    winner = votes[np.arange(n), tied.argmax(1)]
    return float((winner == labels).mean())


def inside_polygon(coords: np.ndarray, polygon) -> np.ndarray:
    """Which of the (n, 2) points lie inside the closed polygon [(x, y), ...] (even-odd rule, by ray casting)."""
    poly = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    x, y = np.asarray(coords, dtype=np.float64).T
    inside = np.zeros(len(x), dtype=bool)
    if len(poly) < 3:
        return inside
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (y0 > y) != (y1 > y)  # the edge spans the point's height
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < at)
    return inside


def selected_indices(emb: Embedding, box: dict | None = None, points=None, polygon=None) -> np.ndarray:
    """Image indices (into the split) selected on a map: inside a box {"x": [lo, hi], "y": [lo, hi]} (either order),
    inside a lasso `polygon` [(x, y), ...], and/or the points given as image indices. Indices that are not on the
    map are ignored."""
    chosen = np.zeros(len(emb), dtype=bool)
    if box:
        (x0, x1), (y0, y1) = sorted(box["x"]), sorted(box["y"])
        x, y = emb.coords[:, 0], emb.coords[:, 1]
        chosen |= (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    if polygon is not None:
        chosen |= inside_polygon(emb.coords, polygon)
    if points is not None:
        chosen |= np.isin(emb.indices, np.asarray(list(points), dtype=np.int64))
    return emb.indices[chosen]


def class_mix(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """How many of the given labels fall in each class."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)
