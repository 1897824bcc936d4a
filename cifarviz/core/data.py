"""CIFAR-10 as uint8 arrays: find it, decode it once, cache it, split it.

Two source layouts are recognised under a data root:

* the original python archive, ``ROOT/cifar-10-batches-py/`` (downloaded through
  torchvision's utilities, checksum verified, when nothing is there), and
* an image-folder tree, ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``
  (PNG/JPEG; class names are the folder names; other sizes are resized to 32x32).

`read_cifar10` decodes; `cifarviz.store.datasets.load_cifar10` (what the app, CLI and
library use) caches the decoded arrays through the store, keyed by the source's content
(file contents for the python archive; names, sizes and modification times for image
folders), so a second load is a single ``np.load``. The first decode of an
image folder runs in worker processes (fresh interpreters: no fork, no re-import of
``__main__``, no torch), so it uses every core from a script, pytest or a Streamlit
thread. The 50,000 training images are split with a seeded permutation into
train/val (45,000/5,000 by default); "training image i" means
``dataset.train.images[i]`` everywhere: library, CLI and app.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decode import _decode_images, _read_python_batch, _RestrictedUnpickler
from .errors import DataError

# .utils imports torch, so it is imported inside the functions that need it: decode workers stay light.

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
PYTHON_DIR = "cifar-10-batches-py"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
CACHE_VERSION = 1  # part of the fingerprint that checkpoints record: never change it
DECODE_VERSION = 2  # part of the cache key only: bump it when decoding changes, so old caches are rebuilt
DEFAULT_VAL_SIZE = 5000


def default_data_root() -> Path:
    """`--data` beats `CIFARVIZ_DATA`, which beats ``./data``."""
    from cifarviz.core.settings import settings

    return settings().data


class Once:
    """A value computed on first use by the first thread that asks (the others wait for it); a failure is kept
    and raised again to every later caller, so a bad image is reported the same way each time."""

    def __init__(self, compute):
        self._compute, self._lock, self._value, self._error = compute, threading.Lock(), None, None

    @property
    def done(self) -> bool:
        return self._compute is None

    def __call__(self):
        if self._compute is not None:
            with self._lock:
                if self._compute is not None and self._error is None:
                    try:
                        self._value = self._compute()
                        self._compute = None
                    except DataError as exc:
                        self._error = exc
        if self._error is not None:
            raise self._error
        return self._value


class Split:
    """One split: images (N, 32, 32, 3) uint8, labels (N,) int64, and where each came from.

    `images` may be given as a `Once`: the pixels are then decoded on first use, so the app can show the test
    split's results while the training images are still on their way."""

    __slots__ = ("__weakref__", "_images", "labels", "name", "source_index")

    def __init__(self, name: str, images, labels: np.ndarray, source_index: np.ndarray):
        self.name, self._images, self.labels, self.source_index = name, images, labels, source_index

    @property
    def images(self) -> np.ndarray:
        return self._images() if isinstance(self._images, Once) else self._images

    @property
    def decoded(self) -> bool:
        """Whether `images` is at hand (no decoding on first use)."""
        return not isinstance(self._images, Once) or self._images.done

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"Split({self.name!r}, {len(self)} images)"


@dataclass(frozen=True)
class CIFAR10:
    """The whole dataset, split, with training-split statistics."""

    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    root: Path
    layout: str  # "python" or "image-folder"
    fingerprint: str
    split_seed: int
    stats: Once | tuple  # ((mean r, g, b), (std r, g, b)) of the training split, in [0, 1] units
    content_key: str = ""  # the fingerprint plus the files' modification times (what the decoded pixels depend on)

    @property
    def mean(self) -> tuple[float, float, float]:
        return (self.stats() if isinstance(self.stats, Once) else self.stats)[0]

    @property
    def std(self) -> tuple[float, float, float]:
        return (self.stats() if isinstance(self.stats, Once) else self.stats)[1]

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise DataError(f"Unknown split {name!r}: choose train, val or test.")
        return getattr(self, name)

    def describe(self) -> dict:
        """What a checkpoint records about the data its numbers were measured on."""
        return {
            "root": str(self.root),
            "layout": self.layout,
            "fingerprint": self.fingerprint,
            "split_seed": self.split_seed,
            "sizes": {s: len(self.split(s)) for s in ("train", "val", "test")},
        }


# --------------------------------------------------------------------------- discovery


def detect_layout(root: Path) -> str:
    if (root / PYTHON_DIR / "data_batch_1").is_file():
        return "python"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "image-folder"
    return ""


def _layout_help(root: Path) -> str:
    return (
        f"Looked in {root.resolve()} for either\n"
        f"  (a) {PYTHON_DIR}/ (the original CIFAR-10 python archive), or\n"
        f"  (b) train/<class>/*.png|jpg and test/<class>/*.png|jpg (an image-folder tree).\n"
        "Fix: point cifarviz at the right folder with --data PATH or the CIFARVIZ_DATA environment variable, "
        "or run `python -m cifarviz data --download` on a machine with internet access."
    )


def _scan_image_folder(root: Path) -> dict[str, list[tuple[str, int, int]]]:
    """{split: [(relative path, size, mtime_ns), ...]} sorted by class then file name."""
    try:
        return _scan_image_folder_unchecked(root)
    except OSError as exc:  # a symlink loop, a dangling mount, no permission: name the entry, no traceback
        where = exc.filename or root
        if exc.errno == errno.ELOOP:
            raise DataError(f"{where} is a symbolic link loop (it points back to itself). Remove it and try again.") \
                from None
        raise DataError(f"{where} cannot be read ({exc.strerror or exc}). Fix or remove it and try again.") from None


def _scan_image_folder_unchecked(root: Path) -> dict[str, list[tuple[str, int, int]]]:
    found: dict[str, list[tuple[str, int, int]]] = {}
    classes_per_split = {}
    for split in ("train", "test"):
        split_dir = root / split
        class_dirs = sorted(d.name for d in os.scandir(split_dir) if d.is_dir() and not d.name.startswith("."))
        if not class_dirs:
            raise DataError(f"{split_dir} has no class folders.\n" + _layout_help(root))
        classes_per_split[split] = class_dirs
        entries = []
        for cls in class_dirs:
            files = []
            for entry in os.scandir(split_dir / cls):
                if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():  # no Path(): fast
                    stat = entry.stat()
                    files.append((entry.name, stat.st_size, stat.st_mtime_ns))
            files.sort()
            if not files:
                raise DataError(f"Class folder {split_dir / cls} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
            entries += [(f"{split}/{cls}/{name}", size, mtime) for name, size, mtime in files]
        found[split] = entries
    if classes_per_split["train"] != classes_per_split["test"]:
        raise DataError(
            f"The class folders differ between {root / 'train'} ({', '.join(classes_per_split['train'])}) "
            f"and {root / 'test'} ({', '.join(classes_per_split['test'])}). Both splits need the same class folders."
        )
    return found


def _fingerprint(items) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(repr(item).encode())
    return digest.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc}). Fix its permissions or download again.") \
            from None
    return digest.hexdigest()


def _image_folder_classes(entries) -> tuple[str, ...]:
    return tuple(sorted({rel.split("/")[1] for rel, *_ in entries["train"]}))


def _image_folder_labels(entries, part: str) -> np.ndarray:
    class_index = {name: i for i, name in enumerate(_image_folder_classes(entries))}
    return np.array([class_index[rel.split("/")[1]] for rel, *_ in entries[part]], dtype=np.int64)


def _decode_image_folder(root: Path, entries, part: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    from tqdm.auto import tqdm

    rels = [rel for rel, *_ in entries[part]]
    what = "training" if part == "train" else part
    with tqdm(total=len(rels), desc=f"decoding {what} images", unit="img", disable=not progress) as bar:
        images = _decode_images([os.path.join(root, rel) for rel in rels], bar.update)
    return images, _image_folder_labels(entries, part)


PYTHON_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _python_classes(root: Path) -> tuple[str, ...]:
    base = root / PYTHON_DIR
    missing = [n for n in PYTHON_BATCHES["train"] + PYTHON_BATCHES["test"] if not (base / n).is_file()]
    if missing:
        raise DataError(f"{base} is incomplete: missing {', '.join(missing)}. Delete it and download again.")
    meta = base / "batches.meta"
    if meta.is_file():
        try:
            with open(meta, "rb") as fh:
                names = _RestrictedUnpickler(fh, encoding="bytes").load()[b"label_names"]
            return tuple(n.decode() for n in names)
        except Exception:  # noqa: BLE001 - fall back to the canonical names
            pass
    return CIFAR10_CLASSES


def _decode_python(root: Path, part: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batches = [_read_python_batch(root / PYTHON_DIR / name, n_classes) for name in PYTHON_BATCHES[part]]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def download_cifar10(root: Path, progress: bool = True) -> None:
    """Fetch and verify the python archive into ROOT; fail in seconds when offline."""
    from urllib.parse import urlparse

    from .utils import host_reachable, offline

    host = urlparse(CIFAR10_URL).hostname
    if offline() or not host_reachable(host):
        why = "CIFARVIZ_OFFLINE is set" if offline() else f"{host} cannot be reached from this machine"
        raise DataError(
            f"CIFAR-10 is not in {root.resolve()} and cannot be downloaded: {why}.\n"
            f"Fix: download {CIFAR10_URL} elsewhere and unpack it into {root.resolve()}, "
            "or point CIFARVIZ_DATA / --data at an image-folder copy (train/<class>/*, test/<class>/*)."
        )
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CIFAR10_URL, str(root), md5=CIFAR10_MD5)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"Downloading CIFAR-10 into {root} failed: {exc}") from None


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class Source:
    """A CIFAR-10 source found under a root: its layout, identity and classes (nothing decoded yet)."""

    root: Path
    layout: str  # "python" or "image-folder"
    fingerprint: str  # what checkpoints record: names and sizes (image folders) or file contents (python)
    content_key: str  # the fingerprint plus each image's modification time: what decoded pixels depend on
    classes: tuple[str, ...]
    entries: dict | None  # image-folder files per part, None for the python archive

    def size(self, part: str) -> int | None:
        """Images in the source's "train" or "test" part; None when only decoding tells (the python archive)."""
        return None if self.entries is None else len(self.entries[part])

    def labels(self, part: str) -> np.ndarray | None:
        """An image folder's labels (from its class folder names) without decoding; None for the python archive."""
        return None if self.entries is None else _image_folder_labels(self.entries, part)

    def decode(self, part: str, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of the "train" or "test" part, decoded now (no cache)."""
        if self.layout == "python":
            return _decode_python(self.root, part, len(self.classes))
        return _decode_image_folder(self.root, self.entries, part, progress)


def find_source(root: str | os.PathLike | None = None, *, download: bool = True, progress: bool = True) -> Source:
    """The CIFAR-10 source under ROOT (default: ``CIFARVIZ_DATA`` or ``./data``), downloaded when allowed and
    missing; a clear DataError when it is not there."""
    root = Path(root) if root is not None else default_data_root()
    layout = detect_layout(root) if root.is_dir() else ""
    if not layout:
        if root.is_dir() and any(root.iterdir()) and not (root / PYTHON_DIR).exists():
            raise DataError(f"{root.resolve()} does not look like CIFAR-10.\n" + _layout_help(root))
        if not download:
            raise DataError("No CIFAR-10 data found.\n" + _layout_help(root))
        download_cifar10(root, progress=progress)
        layout = detect_layout(root)
    fingerprint, content_key, entries = _identify(root, layout)
    classes = _python_classes(root) if layout == "python" else _image_folder_classes(entries)
    return Source(root, layout, fingerprint, content_key, tuple(classes), entries)


def _decode_now(source: Source, part: str, progress: bool):
    return source.decode(part, progress)


def read_cifar10(
    root: str | os.PathLike | None = None,
    *,
    download: bool = True,
    val_size: int = DEFAULT_VAL_SIZE,
    split_seed: int = 0,
    progress: bool = True,
    lazy: bool = False,
    load_part=_decode_now,
    load_stats=None,
) -> CIFAR10:
    """CIFAR-10 from ROOT, split into train/val/test. The store's `load_cifar10` is this with a disk cache.

    lazy: decode an image folder's training images on first use of ``train.images`` / ``val.images`` /
    ``mean`` (a bad training image then raises there). The app's first visit shows test results while the
    50,000 training images are still to be decoded.
    load_part(source, part, progress) -> (images, labels): how a part's pixels are obtained (decoded, or cached).
    load_stats(images, source, split_seed, val_size) -> (mean, std): the training split's statistics."""
    source = find_source(root, download=download, progress=progress)

    def part(name: str) -> tuple[np.ndarray, np.ndarray]:
        return load_part(source, name, progress)

    test_images, test_labels = part("test")
    if lazy and source.layout == "image-folder":  # labels come from the folder names: only the pixels wait
        train = (lambda: part("train")[0]), source.labels("train")
    else:  # the python archive's labels are inside its batches (and reading them takes a second)
        train = part("train")
    test = Split("test", test_images, test_labels, np.arange(len(test_labels)))
    stats = load_stats or (lambda images, *_: train_stats(images))
    return _split(train, test, source, val_size, split_seed, stats)


def _identify(root: Path, layout: str):
    """(fingerprint, content key, image-folder entries or None) of the source under ROOT."""
    if layout == "python":
        # File contents, so a relabelled copy (same names and sizes) is a dataset of its own.
        files = sorted(p for p in (root / PYTHON_DIR).iterdir() if p.is_file())
        identity = [(p.name, _file_digest(p)) for p in files]
        entries, stamps = None, []
    else:
        # Names and sizes (cheap; the shipped checkpoints record this fingerprint); the content key adds each
        # image's modification time, so an image replaced by one of the same size is decoded again.
        entries = _scan_image_folder(root)
        files = entries["train"] + entries["test"]
        identity = [(rel, size) for rel, size, _ in files]
        stamps = [mtime for *_, mtime in files]
    fingerprint = _fingerprint([layout, CACHE_VERSION, *identity])
    return fingerprint, f"{layout}-{fingerprint}-{_fingerprint([DECODE_VERSION, *stamps])}", entries


def _split(train, test, source: Source, val_size: int, split_seed: int, stats_of) -> CIFAR10:
    """Split the source's training part (images, or a function that decodes them; labels) into train/val."""
    full_images, full_labels = train
    root = source.root
    if val_size < 0:
        raise DataError(f"val_size={val_size} must not be negative.")
    if val_size >= len(full_labels):
        if val_size != DEFAULT_VAL_SIZE:
            raise DataError(
                f"val_size (--val-size) {val_size:,} must be below {len(full_labels):,}, the number of training "
                f"images in {root}: choose 0 to {len(full_labels) - 1:,}."
            )
        val_size = len(full_labels) // 10  # the default on a small custom dataset: keep a tenth for validation
    order = np.random.default_rng(split_seed).permutation(len(full_labels))
    train_idx, val_idx = np.sort(order[val_size:]), np.sort(order[:val_size])
    if callable(full_images):  # decoded on first use; the whole part is dropped once it is split

        def split_pixels() -> tuple[np.ndarray, np.ndarray]:
            images = full_images()
            return images[train_idx], images[val_idx]

        pixels = Once(split_pixels)
        train_images, val_images = Once(lambda: pixels()[0]), Once(lambda: pixels()[1])
        stats = Once(lambda: stats_of(train_images(), source, split_seed, val_size))
    else:
        train_images, val_images = full_images[train_idx], full_images[val_idx]
        stats = stats_of(train_images, source, split_seed, val_size)
    return CIFAR10(
        train=Split("train", train_images, full_labels[train_idx], train_idx),
        val=Split("val", val_images, full_labels[val_idx], val_idx),
        test=test,
        classes=tuple(source.classes),
        root=root,
        layout=source.layout,
        fingerprint=source.fingerprint,
        split_seed=split_seed,
        stats=stats,
        content_key=source.content_key,
    )


def train_stats(images: np.ndarray) -> tuple[tuple, tuple]:
    """Per-channel mean/std of uint8 images, in [0, 1] units."""
    # Exact per-channel histograms of the 256 levels (6x faster than summing floats), then their moments.
    pixels = images.reshape(-1, 3)
    counts = np.zeros((3, 256))
    for start in range(0, len(pixels), 1_000_000):
        chunk = pixels[start : start + 1_000_000]
        for channel in range(3):
            counts[channel] += np.bincount(chunk[:, channel], minlength=256)
    levels = np.arange(256) / 255.0
    total = max(len(pixels), 1)
    mean = counts @ levels / total
    std = np.sqrt(np.maximum(counts @ levels**2 / total - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(x) for x in std)
