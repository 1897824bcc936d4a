"""Decoding images, in worker processes when there are many: any image file as 32x32 RGB uint8, CIFAR-10's
python batches through an unpickler that allows only numpy arrays, and user uploads.

The first decode of an image folder runs in worker processes (fresh interpreters: no fork, no re-import of
``__main__``, no torch), so it uses every core from a script, pytest or a Streamlit thread. Every failure is a
DataError that names the file and says what to do.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cifarviz.core.errors import DataError

MAX_IMAGE_PIXELS = 25_000_000  # larger images are refused from their header, before any decoding
DECODE_BLOCK = 256  # images per unit of work (and per progress update) when decoding
IMAGE_BYTES = 32 * 32 * 3
IMAGES_PER_PROCESS = 5000  # fewer than this per worker process and its start-up (~0.2 s) is not worth it


def _read_image(source, name: str, fix: str, max_pixels: int = MAX_IMAGE_PIXELS, draft: bool = False) -> np.ndarray:
    """Any image file (path or file object) as 32x32 RGB uint8; every failure is a DataError naming `name`.

    The size is checked from the header, so a huge file is refused without decoding it. EXIF orientation is
    applied (phone photos store their rotation as a tag) and 16-bit images are scaled to 8 bits.
    """
    try:
        with Image.open(source) as img:
            if img.width * img.height > max_pixels:
                size = f"{img.width}x{img.height}"
                raise DataError(f"{name} is {size} pixels, more than the {max_pixels:,} allowed. {fix}")
            if draft:
                img.draft("RGB", (64, 64))  # JPEGs decode at reduced size: large photos stay cheap
            ImageOps.exif_transpose(img, in_place=True)
            if img.mode.startswith("I"):  # 16-bit (or 32-bit integer) grayscale: convert() would clip it to white
                wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
                img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
            img = img.convert("RGB")
            if img.size != (32, 32):
                img = img.resize((32, 32), Image.Resampling.BILINEAR)
            return np.array(img, dtype=np.uint8)  # a writable copy: torch refuses read-only memory
    except Image.DecompressionBombError:  # Pillow's own limit, hit while reading the header
        bomb = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise DataError(f"{name} has more than {bomb:,} pixels; at most {max_pixels:,} are allowed. {fix}") from None
    except UnidentifiedImageError:  # its text shows the file object's repr: say it plainly instead
        raise DataError(f"{name} is not an image Pillow can read. {fix}") from None
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise DataError(f"{name} could not be decoded ({exc}). {fix}") from None


def _decode_image_list(paths: list[str]) -> np.ndarray:
    """Images from a dataset folder, stacked as (N, 32, 32, 3) uint8."""
    fix = "Remove or replace the file and try again."
    return np.stack([_read_image(path, path, fix) for path in paths]) if paths else np.empty((0, 32, 32, 3), np.uint8)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decode_images(paths: list[str], update=lambda n: None, workers: int | None = None) -> np.ndarray:
    """Decode many image files into one (N, 32, 32, 3) uint8 array, calling update(count) as they finish.

    workers: processes to use; default: one per core when each gets IMAGES_PER_PROCESS images, else none.
    """
    if workers is None:
        workers = min(_cpu_count(), len(paths) // IMAGES_PER_PROCESS)
    images = np.empty((len(paths), 32, 32, 3), dtype=np.uint8)
    lock = threading.Lock()

    def progress(count: int) -> None:
        with lock:
            update(count)

    todo = _decode_in_processes(paths, images, workers, progress) if workers >= 2 else [(0, len(paths))]
    # In this process: small folders, or slices whose worker process could not run here (a frozen app...).
    blocks = [(start, min(start + DECODE_BLOCK, hi)) for lo, hi in todo for start in range(lo, hi, DECODE_BLOCK)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for (lo, hi), block in zip(blocks, pool.map(lambda b: _decode_image_list(paths[b[0] : b[1]]), blocks)):
            images[lo:hi] = block
            progress(hi - lo)
    return images


_WORKER_EXIT_BAD_IMAGE = 3
_WORKER_CODE = (  # the caller's sys.path, so the worker imports this very module
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); from {} import _decode_worker; _decode_worker()"
)


def _decode_worker() -> None:
    """Body of a decode process: a JSON list of paths on stdin, their raw 32x32x3 pixels on stdout."""
    paths = json.load(sys.stdin)
    try:
        for start in range(0, len(paths), DECODE_BLOCK):
            sys.stdout.buffer.write(_decode_image_list(paths[start : start + DECODE_BLOCK]).tobytes())
        sys.stdout.buffer.flush()
    except DataError as exc:
        sys.stderr.write(str(exc))
        sys.exit(_WORKER_EXIT_BAD_IMAGE)


def _decode_in_processes(paths: list[str], images: np.ndarray, workers: int, progress) -> list[tuple[int, int]]:
    """Decode equal slices of `paths` in `workers` fresh interpreters, streaming pixels straight into `images`.

    Fresh interpreters (not multiprocessing) because fork is unsafe in a threaded server with torch loaded,
    and spawn re-runs the caller's unguarded script. Returns the slices that must still be decoded here.
    """
    bounds = np.linspace(0, len(paths), workers + 1).astype(int)
    slices = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    command = [sys.executable, "-c", _WORKER_CODE.format(__name__), json.dumps(sys.path)]
    started: list[subprocess.Popen] = []
    stopping = threading.Event()
    # Reader threads only count; the calling thread reports progress. A progress callback that takes locks of its
    # own (tqdm's write lock, shared with its monitor thread) is then never entered from several threads at once:
    # a CLI decode once hung there, every thread waiting on tqdm's lock.
    arrived, reported, counted = [0], [0], threading.Lock()

    def report() -> None:
        with counted:
            new, reported[0] = arrived[0] - reported[0], arrived[0]
        if new:
            progress(new)

    def run(lo: int, hi: int) -> bool:
        if stopping.is_set():
            return False
        with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: warnings can never block the worker
            try:
                proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
                started.append(proc)
                proc.stdin.write(json.dumps(paths[lo:hi]).encode())
                proc.stdin.close()
                target, done = memoryview(images[lo:hi]).cast("B"), 0
                while done < len(target):
                    got = proc.stdout.readinto(target[done : done + DECODE_BLOCK * IMAGE_BYTES])
                    if not got:
                        break
                    with counted:
                        arrived[0] += (done + got) // IMAGE_BYTES - done // IMAGE_BYTES
                    done += got
                proc.stdout.close()
            except OSError:  # no interpreter to start, or it died: decode this slice here instead
                return False
            if proc.wait() == _WORKER_EXIT_BAD_IMAGE:
                stderr.seek(0)
                raise DataError(stderr.read().decode(errors="replace").strip())
            return proc.returncode == 0 and done == len(target)

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(run, lo, hi) for lo, hi in slices]
        while True:
            done, pending = wait(futures, timeout=0.2, return_when=FIRST_EXCEPTION)
            report()
            for future in done:
                future.result()  # raises a bad image's DataError at once, without waiting for the other workers
            if not pending:
                break
        finished = [future.result() for future in futures]
    finally:
        stopping.set()
        for proc in started:  # on an error or an interrupt, stop the other workers at once
            if proc.poll() is None:
                proc.kill()
        pool.shutdown()
    return [s for s, ok in zip(slices, finished) if not ok]


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


def _read_python_batch(path: Path, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    fix = f"Delete {path.parent} and download again with `python -m cifarviz data --download`."
    try:
        with open(path, "rb") as fh:
            batch = _RestrictedUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing to the user
        reason = f"{type(exc).__name__}: {exc}"
        raise DataError(f"{path} is not a readable CIFAR-10 python batch ({reason}). {fix}") from None
    if labels.shape != (len(data),):
        raise DataError(f"{path} has {labels.size} labels for {len(data)} images; they must match one to one. {fix}")
    outside = labels[(labels < 0) | (labels >= n_classes)]
    if outside.size:
        raise DataError(f"{path} has label {outside[0]}, outside 0..{n_classes - 1} ({n_classes} classes). {fix}")
    return np.ascontiguousarray(data), labels


def load_image_file(data: bytes | str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read any user image (bytes or path) as a 32x32 RGB uint8 array, with a clear error for non-images.

    The size is checked from the header before decoding, so a huge photo is refused cheaply; EXIF
    orientation is applied, so a phone photo is upright.
    """
    from_bytes = isinstance(data, (bytes, bytearray))
    name = "The uploaded file" if from_bytes else str(data)
    fix = f"Use a PNG or JPEG of at most {max_pixels:,} pixels."
    return _read_image(io.BytesIO(data) if from_bytes else data, name, fix, max_pixels, draft=True)
