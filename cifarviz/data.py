"""CIFAR-10 as uint8 arrays: find it, decode it once, cache it, split it.

Two source layouts are recognised under a data root:

* the original python archive, ``ROOT/cifar-10-batches-py/`` (downloaded through
  torchvision's utilities, checksum verified, when nothing is there), and
* an image-folder tree, ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``
  (PNG/JPEG; class names are the folder names; other sizes are resized to 32x32).

Decoded arrays are cached on disk keyed by the source's fingerprint, so a second
load is a single ``np.load``. The 50,000 training images are split with a seeded
permutation into train/val (45,000/5,000 by default); "training image i" means
``dataset.train.images[i]`` everywhere: library, CLI and app.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError
from .utils import atomic_write, cache_dir, host_reachable, offline

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
PYTHON_DIR = "cifar-10-batches-py"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
CACHE_VERSION = 1


def default_data_root() -> Path:
    """`--data` beats `CIFARVIZ_DATA`, which beats ``./data``."""
    return Path(os.environ.get("CIFARVIZ_DATA") or "data")


@dataclass(frozen=True)
class Split:
    """One split: images (N, 32, 32, 3) uint8, labels (N,) int64, and where each came from."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    source_index: np.ndarray  # index into the source's own train (or test) order

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class CIFAR10:
    """The whole dataset, split, with training-split statistics."""

    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    mean: tuple[float, float, float]  # per channel, on the training split, in [0, 1] units
    std: tuple[float, float, float]
    root: Path
    layout: str  # "python" or "image-folder"
    fingerprint: str
    split_seed: int

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


def _scan_image_folder(root: Path) -> dict[str, list[tuple[str, int]]]:
    """{split: [(relative path, size), ...]} sorted by class then file name."""
    found: dict[str, list[tuple[str, int]]] = {}
    classes_per_split = {}
    for split in ("train", "test"):
        split_dir = root / split
        class_dirs = sorted(d.name for d in os.scandir(split_dir) if d.is_dir() and not d.name.startswith("."))
        if not class_dirs:
            raise DataError(f"{split_dir} has no class folders.\n" + _layout_help(root))
        classes_per_split[split] = class_dirs
        entries = []
        for cls in class_dirs:
            files = sorted(
                (e.name, e.stat().st_size)
                for e in os.scandir(split_dir / cls)
                if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS
            )
            if not files:
                raise DataError(f"Class folder {split_dir / cls} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
            entries += [(f"{split}/{cls}/{name}", size) for name, size in files]
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


# --------------------------------------------------------------------------- decoding


def _decode_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (32, 32):
                img = img.resize((32, 32), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"Could not read image {path}: {exc}. Remove or replace the file and try again.") from None


def _decode_image_folder(root: Path, entries, progress: bool):
    from tqdm.auto import tqdm

    classes = sorted({rel.split("/")[1] for rel, _ in entries["train"]})
    out = {}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        for split in ("train", "test"):
            rels = [rel for rel, _ in entries[split]]
            images = np.empty((len(rels), 32, 32, 3), dtype=np.uint8)
            bar = tqdm(total=len(rels), desc=f"decoding {split}", unit="img", disable=not progress)
            for i, arr in enumerate(pool.map(_decode_image, (root / r for r in rels), chunksize=256)):
                images[i] = arr
                bar.update(1)
            bar.close()
            labels = np.array([classes.index(r.split("/")[1]) for r in rels], dtype=np.int64)
            out[split] = (images, labels)
    return out, tuple(classes)


class _RestrictedUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles; allow only what numpy arrays need, so a planted file runs nothing."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def _read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            batch = _RestrictedUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing to the user
        raise DataError(
            f"{path} is not a readable CIFAR-10 python batch ({type(exc).__name__}: {exc}). "
            f"Delete {path.parent} and download again with `python -m cifarviz data --download`."
        ) from None
    return np.ascontiguousarray(data), labels


def _decode_python(root: Path):
    base = root / PYTHON_DIR
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in names + ["test_batch"] if not (base / n).is_file()]
    if missing:
        raise DataError(f"{base} is incomplete: missing {', '.join(missing)}. Delete it and download again.")
    parts = [_read_python_batch(base / n) for n in names]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = _read_python_batch(base / "test_batch")
    classes = CIFAR10_CLASSES
    meta = base / "batches.meta"
    if meta.is_file():
        try:
            with open(meta, "rb") as fh:
                names_ = _RestrictedUnpickler(fh, encoding="bytes").load()[b"label_names"]
            classes = tuple(n.decode() for n in names_)
        except Exception:  # noqa: BLE001 - fall back to the canonical names
            pass
    return {"train": train, "test": test}, classes


def download_cifar10(root: Path, progress: bool = True) -> None:
    """Fetch and verify the python archive into ROOT; fail in seconds when offline."""
    from urllib.parse import urlparse

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


def load_cifar10(
    root: str | os.PathLike | None = None,
    *,
    download: bool = True,
    val_size: int = 5000,
    split_seed: int = 0,
    progress: bool = True,
    use_cache: bool = True,
) -> CIFAR10:
    """Load CIFAR-10 from ROOT (default: ``CIFARVIZ_DATA`` or ``./data``), decoding at most once per source."""
    root = Path(root) if root is not None else default_data_root()
    layout = detect_layout(root) if root.is_dir() else ""
    if not layout:
        if root.is_dir() and any(root.iterdir()) and not (root / PYTHON_DIR).exists():
            raise DataError(f"{root.resolve()} does not look like CIFAR-10.\n" + _layout_help(root))
        if not download:
            raise DataError("No CIFAR-10 data found.\n" + _layout_help(root))
        download_cifar10(root, progress=progress)
        layout = detect_layout(root)

    if layout == "python":
        files = sorted(p for p in (root / PYTHON_DIR).iterdir() if p.is_file())
        identity = [(p.name, p.stat().st_size) for p in files]
        entries = None
    else:
        entries = _scan_image_folder(root)
        identity = entries["train"] + entries["test"]
    fingerprint = _fingerprint([layout, CACHE_VERSION, *identity])
    # The cache key also covers modification times, so an edited file is decoded again.
    stamp_source = files if layout == "python" else [root / "train", root / "test"]
    stamps = [os.stat(p).st_mtime_ns for p in stamp_source]
    cache_file = cache_dir() / "data" / f"{layout}-{fingerprint}-{_fingerprint(stamps)}.npz"

    arrays = None
    if use_cache and cache_file.is_file():
        try:
            with np.load(cache_file) as z:
                arrays = {s: (z[f"{s}_images"], z[f"{s}_labels"]) for s in ("train", "test")}
                classes = tuple(json.loads(str(z["classes"])))
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
            arrays = None
    if arrays is None:
        arrays, classes = _decode_python(root) if layout == "python" else _decode_image_folder(root, entries, progress)
        if use_cache:
            with atomic_write(cache_file) as fh:
                np.savez(
                    fh,
                    classes=np.array(json.dumps(list(classes))),
                    **{f"{s}_images": arrays[s][0] for s in arrays},
                    **{f"{s}_labels": arrays[s][1] for s in arrays},
                )
    return _split(arrays, classes, root, layout, fingerprint, val_size, split_seed)


def _split(arrays, classes, root, layout, fingerprint, val_size, split_seed) -> CIFAR10:
    full_images, full_labels = arrays["train"]
    if val_size < 0:
        raise DataError(f"val_size={val_size} must not be negative.")
    if val_size >= len(full_labels):  # a small custom dataset: keep a tenth for validation
        val_size = len(full_labels) // 10
    order = np.random.default_rng(split_seed).permutation(len(full_labels))
    train_idx, val_idx = np.sort(order[val_size:]), np.sort(order[:val_size])
    test_images, test_labels = arrays["test"]
    train = Split("train", full_images[train_idx], full_labels[train_idx], train_idx)
    val = Split("val", full_images[val_idx], full_labels[val_idx], val_idx)
    test = Split("test", test_images, test_labels, np.arange(len(test_labels)))
    mean, std = _train_stats(train.images, f"{fingerprint}-{split_seed}-{val_size}")
    return CIFAR10(
        train=train,
        val=val,
        test=test,
        classes=tuple(classes),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        root=root,
        layout=layout,
        fingerprint=fingerprint,
        split_seed=split_seed,
    )


def _train_stats(images: np.ndarray, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std in [0, 1] units, computed exactly once per (data, split) and cached."""
    stats_file = cache_dir() / "data" / f"stats-{key}.json"
    try:
        stats = json.loads(stats_file.read_text())
        return np.array(stats["mean"]), np.array(stats["std"])
    except (OSError, ValueError, KeyError):
        pass
    channels = images.reshape(-1, 3)
    total, total_sq = np.zeros(3), np.zeros(3)
    for start in range(0, len(channels), 1_000_000):
        chunk = channels[start : start + 1_000_000].astype(np.float64) / 255.0
        total += chunk.sum(axis=0)
        total_sq += (chunk**2).sum(axis=0)
    mean = total / len(channels)
    std = np.sqrt(np.maximum(total_sq / len(channels) - mean**2, 0.0))
    with atomic_write(stats_file, "w") as fh:
        json.dump({"mean": mean.tolist(), "std": std.tolist()}, fh)
    return mean, std


def load_image_file(data: bytes | str | os.PathLike, max_pixels: int = 25_000_000) -> np.ndarray:
    """Read any user image (bytes or path) as a 32x32 RGB uint8 array, with a clear error for non-images.

    The size is checked from the header before decoding, so a huge photo is refused cheaply.
    """
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    too_big = "The image is {w}x{h} pixels; the limit is {limit:,} pixels. Use a smaller image."
    try:
        with Image.open(source) as img:
            if img.width * img.height > max_pixels:
                raise DataError(too_big.format(w=img.width, h=img.height, limit=max_pixels))
            img.draft("RGB", (64, 64))  # JPEGs decode at reduced size: large photos stay cheap
            img = img.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
            return np.array(img, dtype=np.uint8)  # a writable copy: torch refuses read-only memory
    except Image.DecompressionBombError as exc:
        raise DataError(f"The image is far too large to open safely ({exc}). Use a smaller image.") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"That file is not an image Pillow can read ({exc}). Upload a PNG or JPEG.") from None
