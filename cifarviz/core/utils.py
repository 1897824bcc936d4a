"""Small shared helpers: devices, seeding, atomic writes, network reachability."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import tempfile
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"', re.DOTALL)  # a JSON string, escapes included
JSON_MAX_DEPTH = 32  # the deepest nesting any file cifarviz reads needs is 4; 100,000 brackets are an attack


def bounded_json(text: str | bytes, max_bytes: int = 16 * 2**20, max_depth: int = JSON_MAX_DEPTH):
    """json.loads for text read from a file (checkpoint metadata, run records): refused with ValueError, saying
    why, when it is larger than `max_bytes` or nests deeper than `max_depth` (the parser and every recursive
    reader after it would otherwise raise RecursionError)."""
    if len(text) > max_bytes:
        raise ValueError(f"{len(text):,} bytes of JSON, more than the {max_bytes:,} allowed")
    raw = text.encode("utf-8", "replace") if isinstance(text, str) else bytes(text)
    structure = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)  # brackets outside strings
    opens = (structure == ord("[")) | (structure == ord("{"))
    closes = (structure == ord("]")) | (structure == ord("}"))
    if structure.size and int(np.cumsum(opens.astype(np.int64) - closes).max(initial=0)) > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return json.loads(text)


def pick_device(preference: str = "auto") -> torch.device:
    """`auto` means CUDA when present, else CPU. Never assumes a GPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        from .errors import CifarvizError

        raise CifarvizError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cache_dir() -> Path:
    """The cache folder ($CIFARVIZ_CACHE, else ~/.cache/cifarviz), created if needed. Cached computations go
    through the store (cifarviz.store), which copes with a folder it cannot write; this is for the files that
    must be kept on disk (uploads), and says clearly when that is impossible."""
    from cifarviz.core.errors import CifarvizError
    from cifarviz.core.settings import settings

    path = settings().cache_dir
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CifarvizError(f"The cache folder {path} cannot be created ({exc.strerror or exc}). Fix: point "
                            "CIFARVIZ_CACHE at a writable folder.") from None
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Write to a temporary file beside `path`, then rename over it.

    A crash mid-write leaves the previous file intact (rename is atomic on POSIX
    and Windows within one filesystem). A killed process leaves its temporary
    behind; those of the same target over an hour old are removed here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    with contextlib.suppress(OSError):
        cutoff = os.stat(tmp).st_mtime - 3600  # the filesystem's clock, like the leftovers' times
        for entry in os.scandir(path.parent):
            middle = entry.name[len(prefix) : -len(".tmp")]  # mkstemp's random part: no dots
            if entry.name.startswith(prefix) and entry.name.endswith(".tmp") and middle and "." not in middle:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise



@contextlib.contextmanager
def file_lock(target: Path, timeout: float = -1):
    """An exclusive lock on `target` for every thread and process on this machine (`target`.lock beside it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=timeout):
        yield


def offline() -> bool:
    """CIFARVIZ_OFFLINE=1 forbids every download (tests and air-gapped classrooms set it)."""
    from cifarviz.core.settings import settings

    return settings().offline


def host_reachable(host: str, port: int = 443, timeout: float = 4.0) -> bool:
    """A quick TCP probe so downloads fail in seconds, not after a long hang."""
    if offline():
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
