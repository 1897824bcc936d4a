"""CIFAR-10 with its decoded pixels and training statistics cached through the store.

    dataset = load_cifar10()            # the first call decodes every image, later ones read the cache

The key of a decoded part is the source's content (names, sizes and modification times of an image folder, file
contents of the python archive) and the part; two copies of one dataset that differ only in modification times
have files of their own, so switching between them never decodes again. On read the pixels' shape, the number of
images and (for image folders, whose labels are the folder names) every label are checked against the source.
"""

from __future__ import annotations

import os

import numpy as np

from cifarviz.core.data import CIFAR10, DECODE_VERSION, DEFAULT_VAL_SIZE, Source, read_cifar10, train_stats
from cifarviz.store.cache import Array, CacheKey, Schema, default_store

PIXELS = {"images": Array("u", ("n", 32, 32, 3)), "labels": Array("i", ("n",), low=0, below="classes")}
STATS_SCHEMA = Schema({"mean": Array("f", (3,), low=0.0, below=1.0 + 1e-9), "std": Array("f", (3,), low=0.0,
                                                                                          below=1.0 + 1e-9)})
STATS_VERSION = 1


def _pixels_schema(source: Source, part: str) -> Schema:
    expected = source.labels(part)

    def labels_match(arrays, dims):
        if expected is not None and not np.array_equal(arrays["labels"], expected):
            return "labels differ from the class folders of the source"
        return None

    return Schema(PIXELS, check=labels_match)


def pixels_key(source: Source, part: str) -> CacheKey:
    """The store key of a source part's decoded pixels: the source's content and the part."""
    return CacheKey("data", DECODE_VERSION, {"content": source.content_key, "part": part}, label=part)


def _cached_part(source: Source, part: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    key = pixels_key(source, part)

    def decode():
        images, labels = source.decode(part, progress)
        return {"images": images, "labels": labels}

    dims = {"classes": len(source.classes)}
    if source.size(part) is not None:
        dims["n"] = source.size(part)
    arrays = default_store().cached(key, decode, _pixels_schema(source, part), dims=dims, memo=False)
    return arrays["images"], arrays["labels"]


def _cached_stats(images: np.ndarray, source: Source, split_seed: int, val_size: int):
    key = CacheKey("stats", STATS_VERSION, {"content": source.content_key, "split_seed": split_seed,
                                            "val_size": val_size, "train_images": len(images)})

    def compute():
        mean, std = train_stats(images)
        return {"mean": np.array(mean), "std": np.array(std)}

    arrays = default_store().cached(key, compute, STATS_SCHEMA)
    return tuple(float(m) for m in arrays["mean"]), tuple(float(s) for s in arrays["std"])


def load_cifar10(
    root: str | os.PathLike | None = None,
    *,
    download: bool = True,
    val_size: int = DEFAULT_VAL_SIZE,
    split_seed: int = 0,
    progress: bool = True,
    use_cache: bool = True,
    lazy: bool = False,
) -> CIFAR10:
    """Load CIFAR-10 from ROOT (default: ``CIFARVIZ_DATA`` or ``./data``), decoding at most once per source.

    Arguments as `cifarviz.core.data.read_cifar10`; `use_cache=False` decodes without reading or writing the cache."""
    if not use_cache:
        return read_cifar10(root, download=download, val_size=val_size, split_seed=split_seed, progress=progress,
                            lazy=lazy)
    return read_cifar10(root, download=download, val_size=val_size, split_seed=split_seed, progress=progress,
                        lazy=lazy, load_part=_cached_part, load_stats=_cached_stats)
