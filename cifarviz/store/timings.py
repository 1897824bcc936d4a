"""How long long computations took on this machine (an influence index, a map), so a page can say how long one
will take *before* it starts it, and ask first when that is more than about a minute.

One small JSON file in the cache folder, {key: seconds}; the key names what determines the time (the method, the
architecture and its size, how many images, the device). Read back checked (a damaged file is ignored, never
trusted); written atomically; at most MAX_KEYS entries, the newest kept."""

from __future__ import annotations

import json
import math
import threading

from cifarviz.core.errors import CifarvizError
from cifarviz.core.utils import atomic_write, bounded_json, cache_dir

MAX_KEYS = 256
_LOCK = threading.Lock()


def _path():
    return cache_dir() / "timings.json"


def _read() -> dict[str, float]:
    try:
        data = bounded_json(_path().read_text())
    except (OSError, ValueError, CifarvizError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(k, str) and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v) and v > 0}


def expected_seconds(key: str) -> float | None:
    """The last measured duration of `key` here, or None when it never ran on this machine."""
    return _read().get(key)


def record(key: str, seconds: float) -> None:
    if not (math.isfinite(seconds) and seconds > 0):
        return
    with _LOCK:
        data = _read()
        data.pop(key, None)
        data[key] = round(float(seconds), 2)
        while len(data) > MAX_KEYS:
            data.pop(next(iter(data)))
        try:
            with atomic_write(_path(), "w") as f:
                json.dump(data, f, indent=1)
        except (OSError, CifarvizError):  # a read-only cache folder: estimates are a courtesy, never a failure
            pass
