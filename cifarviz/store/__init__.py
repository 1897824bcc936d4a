"""The store layer: every file cifarviz caches goes through `cached()` (cache.py), and the cached things built on
it: a dataset's decoded pixels (datasets.py) and a checkpoint's predictions and features (artifacts.py)."""

from cifarviz.store.cache import Array, CacheKey, Schema, SchemaError, Store, default_store, digest_array

__all__ = ["Array", "CacheKey", "Schema", "SchemaError", "Store", "default_store", "digest_array"]
