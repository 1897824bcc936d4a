"""Every `CIFARVIZ_*` environment variable, read in one place and checked once.

    from cifarviz.core.settings import settings
    settings().cache_dir, settings().runs_dir, settings().classroom

`settings()` parses the environment the first time it is asked and again only when a `CIFARVIZ_*` variable
changed since (a comparison of a few strings), so a server reads it once while a test that sets a variable sees it.
A bad value raises `SettingsError` naming the variable, what it holds and what it must be.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cifarviz.core.errors import CifarvizError

PREFIX = "CIFARVIZ_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}


class SettingsError(CifarvizError):
    """A CIFARVIZ_* environment variable holds a value cifarviz cannot use."""


@dataclass(frozen=True)
class Settings:
    """What the environment asks for. Field docs say the variable and its default."""

    data: Path  # CIFARVIZ_DATA: the CIFAR-10 folder (default ./data)
    cache_dir: Path  # CIFARVIZ_CACHE: every cached file (default ~/.cache/cifarviz)
    cache_max_bytes: int  # CIFARVIZ_CACHE_MAX_GB: the cache's size cap, least recently used files go first (10)
    runs_dir: Path  # CIFARVIZ_RUNS: training runs and the Optuna database (default ./runs)
    offline: bool  # CIFARVIZ_OFFLINE: never download anything (tests and air-gapped classrooms)
    classroom: bool  # CIFARVIZ_CLASSROOM: lock the data folder and turn uploads off
    # CIFARVIZ_LOCK_DATA: the data folder, CIFAR-10's download and the study database are the server's, not text
    # boxes for anyone (default on, a shared server's safe choice; 0 on your own machine; always on in classroom mode)
    lock_data: bool
    no_uploads: bool  # CIFARVIZ_NO_UPLOADS: no checkpoint or image uploads (also on in classroom mode)
    # CIFARVIZ_MAX_RUNS: workers this server starts for long work, each running one job at a time (1; 0: none, every
    # job waits for a worker on another machine)
    max_runs: int
    max_queued: int  # CIFARVIZ_MAX_QUEUED: runs waiting at most (8)
    session_runs: int  # CIFARVIZ_SESSION_RUNS: runs one browser session may have waiting or training (3)
    train_threads: int  # CIFARVIZ_TRAIN_THREADS: CPU threads of a training run (all cores but one)
    hover_thumbnails: int  # CIFARVIZ_HOVER_THUMBNAILS: map points that get a hover thumbnail (10,000)
    # CIFARVIZ_TEACHER_KEY: typed into the sidebar, it lets that session stop or cancel anyone's run (none: no teacher)
    teacher_key: str = field(default="", repr=False)
    # CIFARVIZ_JOB_WORKERS: threads that compute what viewers asked for (features, maps, indexes) (2)
    job_workers: int = 2
    # CIFARVIZ_BROKER: where the queue of long work lives: unset, a SQLite file in the runs folder (one machine);
    # redis://HOST:PORT/DB, a Redis server that workers on other machines reach too
    broker: str = ""

    @property
    def data_locked(self) -> bool:
        return self.lock_data or self.classroom

    @property
    def uploads_allowed(self) -> bool:
        return not (self.no_uploads or self.classroom)

    @classmethod
    def from_env(cls, env=None) -> Settings:
        env = os.environ if env is None else env
        cores = os.cpu_count() or 1
        home_cache = Path(os.path.expanduser("~")) / ".cache" / "cifarviz"
        return cls(
            data=Path(env.get(PREFIX + "DATA") or "data"),
            cache_dir=Path(env.get(PREFIX + "CACHE") or home_cache),
            cache_max_bytes=int(_number(env, "CACHE_MAX_GB", 10.0, least=0.01, most=1_000_000) * 2**30),
            runs_dir=Path(env.get(PREFIX + "RUNS") or "runs"),
            offline=_flag(env, "OFFLINE"),
            classroom=_flag(env, "CLASSROOM"),
            lock_data=_flag(env, "LOCK_DATA", default=True),
            no_uploads=_flag(env, "NO_UPLOADS"),
            max_runs=_count(env, "MAX_RUNS", 1, 0, most=256),
            max_queued=_count(env, "MAX_QUEUED", 8, 1, most=10_000),
            session_runs=_count(env, "SESSION_RUNS", 3, 1, most=1_000),
            train_threads=_count(env, "TRAIN_THREADS", max(1, cores - 1), 1, most=max(1, cores)),
            hover_thumbnails=_count(env, "HOVER_THUMBNAILS", 10_000, 0, most=60_000),
            teacher_key=_teacher_key(env),
            job_workers=_count(env, "JOB_WORKERS", 2, 1, most=64),
            broker=_broker(env),
        )


def variables() -> list[str]:
    """The variables Settings reads, for the README and error messages."""
    return [PREFIX + name for name in ("DATA", "CACHE", "CACHE_MAX_GB", "RUNS", "OFFLINE", "CLASSROOM", "LOCK_DATA",
                                       "NO_UPLOADS", "MAX_RUNS", "MAX_QUEUED", "SESSION_RUNS", "TRAIN_THREADS",
                                       "HOVER_THUMBNAILS", "TEACHER_KEY", "JOB_WORKERS", "BROKER")]


def _broker(env) -> str:
    url = env.get(PREFIX + "BROKER", "").strip()
    if url and (not url.startswith(("redis://", "rediss://", "unix://")) or len(url) > 1000 or not url.isprintable()):
        raise SettingsError(f"{PREFIX}BROKER={url[:80]!r}: use a Redis URL such as redis://gpu-box:6379/0, or leave it "
                            "unset for the queue in a file beside the runs (one machine).")
    return url


def _teacher_key(env) -> str:
    key = env.get(PREFIX + "TEACHER_KEY", "")
    if key and len(key) < 8:
        raise SettingsError(f"{PREFIX}TEACHER_KEY is {len(key)} characters long: use at least 8 (a student could "
                            "guess a shorter one), or leave it unset for no teacher in the app.")
    return key


def _flag(env, name: str, default: bool = False) -> bool:
    text = env.get(PREFIX + name, "").strip().lower()
    if not text:
        return default
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SettingsError(f"{PREFIX}{name}={text!r}: use 1 (on) or 0 (off).")


# Every number has an upper bound too (the rule for settings): a value no server could use (1e308 GB of cache,
# 100,000 training threads) is refused with its range, never overflowed or obeyed.


def _count(env, name: str, default: int, least: int, most: int) -> int:
    text = env.get(PREFIX + name, "").strip()
    try:  # a 400-digit number is refused before int() spends time on it
        value = default if not text else int(text) if len(text) <= 20 else None
    except ValueError:
        value = None
    if value is None or not least <= value <= most:
        raise SettingsError(f"{PREFIX}{name}={text[:40]!r}: it must be a whole number from {least} to {most:,} "
                            f"(default {default}).")
    return value


def _number(env, name: str, default: float, least: float, most: float) -> float:
    text = env.get(PREFIX + name, "").strip()
    try:
        value = default if not text else float(text) if len(text) <= 40 else None
    except ValueError:
        value = None
    if value is None or not least <= value <= most:
        raise SettingsError(f"{PREFIX}{name}={text[:40]!r}: it must be a number from {least} to {most:,} "
                            f"(default {default}).")
    return value


_lock = threading.Lock()
_current: tuple[tuple, Settings] | None = None


def settings() -> Settings:
    """The settings of the current environment (parsed again only when a CIFARVIZ_* variable changed)."""
    global _current
    snapshot = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(PREFIX)))
    known = _current
    if known is not None and known[0] == snapshot:
        return known[1]
    with _lock:
        parsed = Settings.from_env()
        _current = (snapshot, parsed)
    return parsed

