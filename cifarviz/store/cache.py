"""One store for every file cifarviz caches: keyed by content, locked, written atomically, checked on read, bounded.

    key = CacheKey("artifacts", 3, {"model": ..., "weights": ..., "images": ..., "tta": "flip"})
    arrays = default_store().cached(key, compute, SCHEMA, dims={"n": 10_000})

* The key is a versioned record of *everything* that determines the content (architecture and its arguments,
  weights, the data's content and the exact images, the method and all its arguments); its hash names the file.
* `compute()` returns a dict of numpy arrays. It runs at most once per key on this machine at a time: a file lock
  makes a second process wait for the first one's file instead of computing it again.
* A file is read back only after its schema check (names, dtypes, shapes, row counts, finiteness, value bounds).
  A file that fails, or that is not a readable .npz at all, is logged with the reason, removed and rebuilt; it
  is never served. Only such format errors are caught: a bug in a caller's code raises.
* Files are written atomically (temporary file, then rename). The folder is bounded (`CIFARVIZ_CACHE_MAX_GB`):
  reading a file marks it used, and after each write the least recently used files go until it fits.
* A full, read-only or missing disk (or `CIFARVIZ_CACHE` naming a file) is not an error: the result is kept in
  memory for this process, and one warning says why and how to fix it (`Store.warnings`, shown by the app).
* Results too slow to compute on a fresh clone come with the project (checkpoints/store/KIND/FILE, written by
  `python -m cifarviz precompute --ship`), filed under the key's portable name (CacheKey.portable): read only when
  it matches, checked the same way, never written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifarviz.core.errors import CifarvizError
from cifarviz.core.settings import settings
from cifarviz.core.utils import atomic_write, file_lock

log = logging.getLogger("cifarviz.store")
SUFFIX = ".npz"
KEY_ARRAY = "__key__"  # in every file: the digest of the key it was computed for, checked on read
# Errors that mean "the disk cannot keep this file", as opposed to a bug: the store then works from memory.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG}


class SchemaError(CifarvizError):
    """A cached file (or a freshly computed result) does not have the shape its schema promises."""


# --------------------------------------------------------------------------- keys


def canonical(value):
    """JSON-able form of a key part: tuples as lists, numpy scalars as numbers, dict keys sorted by json.dumps."""
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cache key part {value!r} ({type(value).__name__}) is not a plain value")


@dataclass(frozen=True)
class CacheKey:
    """What a cached file holds: its kind (a folder), the format version of that kind, and every input.

    `parts` must name everything that changes the content; two keys with equal parts share one file."""

    kind: str
    version: int
    parts: Mapping = field(default_factory=dict)
    label: str = ""  # a readable prefix of the file name (e.g. the method); not part of the identity
    # The same content named so that another machine computes the same name (the data by its files' names and
    # sizes, not their modification times, which a copy changes): what a shipped copy is filed under. Not part of
    # the identity; None: the parts themselves.
    portable: Mapping | None = None

    def __post_init__(self):
        if not self.kind.isidentifier():
            raise ValueError(f"cache kind {self.kind!r} must be a plain name")
        object.__setattr__(self, "parts", canonical(self.parts))
        if self.portable is not None:
            object.__setattr__(self, "portable", canonical(self.portable))

    @property
    def shipped_filename(self) -> str:
        """The file name of a shipped copy (from the portable parts)."""
        return self._shipped().filename

    @property
    def shipped_digest(self) -> str:
        return self._shipped().digest

    def _shipped(self) -> CacheKey:
        return self if self.portable is None else CacheKey(self.kind, self.version, self.portable, label=self.label)

    @property
    def digest(self) -> str:
        text = json.dumps([self.kind, self.version, self.parts], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @property
    def filename(self) -> str:
        label = "".join(c if c.isalnum() or c in "-_" else "-" for c in self.label)[:40]
        return f"{label + '-' if label else ''}v{self.version}-{self.digest}{SUFFIX}"

    def __hash__(self) -> int:
        return hash((self.kind, self.digest))

    def __eq__(self, other) -> bool:
        return isinstance(other, CacheKey) and (self.kind, self.digest) == (other.kind, other.digest)


def digest_array(array: np.ndarray) -> str:
    """A short content hash of an array (e.g. the exact image indices of a split)."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- schemas


@dataclass(frozen=True)
class Array:
    """One array of a cached file. `shape` entries are sizes, dimension names (equal wherever they appear, and
    equal to `dims[name]` when the reader knows it) or None (any). `kind` is numpy's dtype kind: "f" float,
    "i" signed integer, "u" unsigned, "b" bool, "U" text. `low`/`below`: inclusive lower and exclusive upper
    bound of every value (a number or a dimension name)."""

    kind: str
    shape: tuple = ()
    finite: bool = True
    low: float | str | None = None
    below: float | str | None = None


@dataclass(frozen=True)
class Schema:
    arrays: Mapping[str, Array]
    check: Callable[[dict, dict], str | None] | None = None  # extra rule: returns what is wrong, or None

    def validate(self, arrays: Mapping[str, np.ndarray], dims: Mapping[str, int] | None = None) -> None:
        """Raise SchemaError saying exactly what is wrong (the first problem found)."""
        sizes = dict(dims or {})
        missing = sorted(set(self.arrays) - set(arrays))
        if missing:
            raise SchemaError(f"missing array(s) {', '.join(missing)}")
        extra = sorted(set(arrays) - set(self.arrays))
        if extra:
            raise SchemaError(f"unexpected array(s) {', '.join(extra)}")
        for name, spec in self.arrays.items():
            value = arrays[name]
            if not isinstance(value, np.ndarray):
                raise SchemaError(f"{name} is a {type(value).__name__}, not an array")
            if value.dtype.kind != spec.kind and not (spec.kind == "i" and value.dtype.kind == "u"):
                raise SchemaError(f"{name} has dtype {value.dtype}, expected kind {spec.kind!r}")
            if len(value.shape) != len(spec.shape):
                raise SchemaError(f"{name} has shape {value.shape}, expected {len(spec.shape)} dimension(s)")
            for axis, (got, want) in enumerate(zip(value.shape, spec.shape)):
                if want is None:
                    continue
                if isinstance(want, str):
                    want = sizes.setdefault(want, got)
                if got != want:
                    raise SchemaError(f"{name} has {got} entries along axis {axis}, expected {want}")
        for name, spec in self.arrays.items():  # values, once every dimension is known
            value = arrays[name]
            if spec.kind == "f" and spec.finite and value.size and not np.isfinite(value).all():
                raise SchemaError(f"{name} holds NaN or infinite values")
            if value.size and spec.kind in "fiu":
                low, below = _bound(spec.low, sizes), _bound(spec.below, sizes)
                if low is not None and value.min() < low:
                    raise SchemaError(f"{name} holds {value.min()}, below its lowest allowed value {low}")
                if below is not None and value.max() >= below:
                    raise SchemaError(f"{name} holds {value.max()}, not below {below}")
        if self.check is not None and (problem := self.check(dict(arrays), sizes)):
            raise SchemaError(problem)


def _load_checked(path: Path, digest: str) -> dict:
    """A cached file's arrays, trusted only if it is a plain file (not a link to another result) and carries the
    key it was computed for: another checkpoint's file copied into this key's place is refused, not served."""
    if path.is_symlink():
        raise SchemaError("it is a symbolic link; the cache keeps only files it wrote itself")
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    recorded = arrays.pop(KEY_ARRAY, None)
    if recorded is None or recorded.shape != () or recorded.dtype.kind != "U":
        raise SchemaError("it records no key (written by another version, or not by the cache)")
    if str(recorded) != digest:
        raise SchemaError("it was computed for another key (copied or moved from another result)")
    return arrays


def _bound(bound, sizes):
    if isinstance(bound, str):
        return sizes.get(bound)
    return bound


# --------------------------------------------------------------------------- the store


class Store:
    """The cache folder: `cached()` for every computed file, a size cap, and a memory fallback."""

    def __init__(self, root: str | os.PathLike, max_bytes: int, memo_entries: int = 24, memo_bytes: int = 2**30,
                 shipped: str | os.PathLike | None = None):
        self.root = Path(root)
        # Read-only results that come with the project (checkpoints/store/: the default checkpoint's influence
        # index, minutes to build), found by the key's portable file name: used only where it matches exactly,
        # checked like any other file, never written, evicted or removed.
        self.shipped = Path(shipped) if shipped is not None else None
        self.max_bytes = int(max_bytes)
        self.warnings: list[str] = []
        self._memo: OrderedDict[tuple, dict] = OrderedDict()  # recent reads and in-memory results, by key
        self._memo_entries, self._memo_bytes = memo_entries, memo_bytes
        self._lock = threading.Lock()
        self._disk_ok = True

    def path(self, key: CacheKey) -> Path:
        return self.root / key.kind / key.filename

    # ---- reading

    def read(self, key: CacheKey, schema: Schema, dims: Mapping[str, int] | None = None, *,
             memo: bool = True) -> dict | None:
        """The key's arrays if a valid file (or an in-memory result) is there, else None. An invalid file is
        logged and removed. The arrays are shared with every later reader: never modify them."""
        memo_key = (key.kind, key.digest, _dims_key(dims))
        with self._lock:
            if memo_key in self._memo:
                self._memo.move_to_end(memo_key)
                return self._memo[memo_key]
        path = self.path(key)
        shipped = not (path.is_file() or path.is_symlink())
        if shipped:
            path = self.shipped_path(key)
            if path is None or not (path.is_file() or path.is_symlink()):
                return None
        try:
            arrays = _load_checked(path, key.shipped_digest if shipped else key.digest)
            schema.validate(arrays, dims)
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, SchemaError) as exc:
            self._reject(path, exc, remove=not shipped)
            return None
        if not shipped:
            with contextlib.suppress(OSError):  # "last used", for eviction; a read-only disk keeps the old time
                now = time.time_ns()
                os.utime(path, ns=(now, now))
        if memo:
            self._remember(memo_key, arrays)
        return arrays

    def has(self, key: CacheKey) -> bool:
        """Whether the key's result is at hand without computing it: its file exists, or (without a disk) this process
        keeps it in memory. Cheap: no file is read (a damaged file is found, and rebuilt, when it is read)."""
        with self._lock:
            if any(k[:2] == (key.kind, key.digest) for k in self._memo):
                return True
        shipped = self.shipped_path(key)
        return self.path(key).is_file() or (shipped is not None and shipped.is_file())

    def shipped_path(self, key: CacheKey) -> Path | None:
        """Where a result that comes with the project would lie (None without a shipped folder)."""
        return self.shipped / key.kind / key.shipped_filename if self.shipped is not None else None

    def ship(self, key: CacheKey, schema: Schema, dims: Mapping[str, int] | None = None) -> Path:
        """Copy the key's cached file, checked, into the shipped folder (compressed, atomically): for maintainers,
        so that a fresh clone finds a result that takes minutes to compute. The result must be cached."""
        if self.shipped is None:
            raise SchemaError("This store has no shipped folder to copy results into.")
        arrays = self.read(key, schema, dims, memo=False)  # checked; the cache's copy, else the shipped one
        if arrays is None:
            raise SchemaError(f"Nothing valid is cached for {key.filename}: compute it first.")
        target = self.shipped_path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target) as fh:
            np.savez_compressed(fh, **arrays, **{KEY_ARRAY: np.array(key.shipped_digest)})
        return target

    def _reject(self, path: Path, exc: BaseException, *, remove: bool = True) -> None:
        reason = str(exc) or type(exc).__name__
        if not remove:  # a shipped file is never deleted: it is passed over, and the result computed into the cache
            log.warning("cifarviz: the shipped %s failed its check (%s); it is computed again instead.", path,
                        reason)
            return
        log.warning("cifarviz cache: %s failed its check (%s); it is removed and computed again.", path, reason)
        with contextlib.suppress(OSError):
            path.unlink()

    # ---- computing

    def cached(self, key: CacheKey, compute: Callable[[], Mapping[str, np.ndarray]], schema: Schema,
               dims: Mapping[str, int] | None = None, *, memo: bool = True) -> dict:
        """The key's arrays: read from disk, or computed now (once per machine at a time) and saved.
        memo: keep them in this process's small memory cache too (off for big files that callers keep)."""
        arrays = self.read(key, schema, dims, memo=memo)
        if arrays is not None:
            return arrays
        path = self.path(key)
        if self._disk_ok:
            try:
                with file_lock(path):
                    arrays = self.read(key, schema, dims, memo=memo)  # another process may have written it meanwhile
                    if arrays is None:
                        arrays = self._compute(compute, schema, dims)
                        self._write(path, arrays, key)
                        if memo or not self._disk_ok:  # a write the disk refused: keep the finished result
                            self._remember((key.kind, key.digest, _dims_key(dims)), arrays)
                    return arrays
            except OSError as exc:
                if not _disk_trouble(exc):
                    raise
                self._disk_failed(exc)
        arrays = self.read(key, schema, dims) or self._compute(compute, schema, dims)
        # without a disk, memory is the only cache, whatever `memo` says
        self._remember((key.kind, key.digest, _dims_key(dims)), arrays)
        return arrays

    def _compute(self, compute, schema: Schema, dims) -> dict:
        arrays = {name: np.asarray(value) for name, value in dict(compute()).items()}
        schema.validate(arrays, dims)  # a result that breaks its own schema is a bug: raise, never save it
        return arrays

    def _write(self, path: Path, arrays: dict, key: CacheKey) -> None:
        try:
            with atomic_write(path) as fh:
                np.savez(fh, **arrays, **{KEY_ARRAY: np.array(key.digest)})
        except OSError as exc:
            if not _disk_trouble(exc):
                raise
            self._disk_failed(exc)
            return
        self.evict(keep=path)

    def _disk_failed(self, exc: OSError) -> None:
        with self._lock:
            if not self._disk_ok:
                return
            self._disk_ok = False
            where = exc.filename or self.root
            message = (f"The cache folder {self.root} cannot keep files ({exc.strerror or exc}: {where}). Results "
                       "are computed in memory and lost when the server stops. Fix: free disk space or point "
                       "CIFARVIZ_CACHE at a writable folder, then restart.")
            self.warnings.append(message)
        log.warning("cifarviz cache: %s", message)

    def _remember(self, memo_key: tuple, arrays: dict) -> None:
        with self._lock:
            self._memo[memo_key] = arrays
            self._memo.move_to_end(memo_key)
            size = lambda entry: sum(a.nbytes for a in entry.values())  # noqa: E731
            total = sum(size(entry) for entry in self._memo.values())
            while len(self._memo) > 1 and (len(self._memo) > self._memo_entries or total > self._memo_bytes):
                _, dropped = self._memo.popitem(last=False)
                total -= size(dropped)

    def forget(self) -> None:
        """Drop what this process keeps in memory (the files stay)."""
        with self._lock:
            self._memo.clear()

    # ---- bounding

    def files(self) -> list[os.DirEntry]:
        found = []
        with contextlib.suppress(OSError):
            for kind in os.scandir(self.root):
                if kind.is_dir(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        found += [e for e in os.scandir(kind.path) if e.name.endswith(SUFFIX) and e.is_file()]
        return found

    def size(self) -> int:
        return sum(_stat_size(e) for e in self.files())

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove the least recently used files until the folder is within its cap; `keep` stays."""
        entries = []
        for entry in self.files():
            with contextlib.suppress(OSError):
                stat = entry.stat()
                entries.append((stat.st_mtime_ns, stat.st_size, Path(entry.path)))
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                with contextlib.suppress(OSError):
                    Path(str(path) + ".lock").unlink()
                total -= size
                removed.append(path)
        if removed:
            log.info("cifarviz cache: removed %d least recently used file(s) to stay under %.1f GB", len(removed),
                     self.max_bytes / 2**30)
        kept = next((size for _, size, path in entries if path == keep), 0)
        if keep is not None and kept * 2 > self.max_bytes:  # the cap cannot hold what one command needs
            self._too_small(kept)
        return removed

    def _too_small(self, size: int) -> None:
        with self._lock:
            if any(w.startswith("The cache's cap") for w in self.warnings):
                return
            message = (f"The cache's cap (CIFARVIZ_CACHE_MAX_GB, {self.max_bytes / 2**30:.2g} GB) is too small for "
                       f"what one command needs: a single file is {size / 2**20:,.0f} MB, so the next one removes it "
                       "and every command computes it again (the decoded data alone is about 200 MB). Fix: set "
                       f"CIFARVIZ_CACHE_MAX_GB to at least {max(1.0, 4 * size / 2**30):.0f} and restart.")
            self.warnings.append(message)
        log.warning("cifarviz cache: %s", message)


def _stat_size(entry: os.DirEntry) -> int:
    try:
        return entry.stat().st_size
    except OSError:
        return 0


def _dims_key(dims) -> tuple:
    return tuple(sorted((dims or {}).items()))


def _disk_trouble(exc: OSError) -> bool:
    return isinstance(exc, (FileExistsError, NotADirectoryError, PermissionError)) or exc.errno in _DISK_ERRNOS


_stores: dict[tuple, Store] = {}
_stores_lock = threading.Lock()


def default_store() -> Store:
    """The store of the current settings (CIFARVIZ_CACHE, CIFARVIZ_CACHE_MAX_GB): one per folder and cap."""
    config = settings()
    ident = (str(config.cache_dir), config.cache_max_bytes)
    with _stores_lock:
        store = _stores.get(ident)
        if store is None:
            from cifarviz.core.checkpoint import SHIPPED_DIR

            store = _stores[ident] = Store(config.cache_dir, config.cache_max_bytes, shipped=SHIPPED_DIR / "store")
        return store
