"""Shared fixtures.

Real-data tests read the CIFAR-10 copy named by CIFARVIZ_DATA (default: the
development copy at ../shared/data/cifar10-jpeg). When it is missing they are
skipped with a reason that says so, and CI fails on any skip.
"""

from __future__ import annotations

import html
import os
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
from browser import _shared_page, browser, page, server  # noqa: F401  (real-browser fixtures, one server per session)
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DEV_DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg"

# Nothing may download in tests, and caches go to a private folder unless one is given.
os.environ["CIFARVIZ_OFFLINE"] = "1"
os.environ.setdefault("CIFARVIZ_CACHE", tempfile.mkdtemp(prefix="cifarviz-test-cache-"))
os.environ.setdefault("TORCH_HOME", tempfile.mkdtemp(prefix="cifarviz-test-torch-"))
os.environ.setdefault("TQDM_DISABLE", "1")
# Tests point the data box at folders of their own, as on a personal machine; the shared server's default (locked)
# has tests of its own that unset this.
os.environ.setdefault("CIFARVIZ_LOCK_DATA", "0")


def visible(text: str) -> str:
    """What a person reads of a Markdown string the app sent: names and messages are written with numeric character
    references and word joiners (cifarviz.ui.text.md) so that nothing in them renders; the browser shows the text."""
    return html.unescape(text).replace("\u2060", "")


def real_data_root() -> Path:
    """Absolute, so tests that change the working folder still find it (CI passes a relative path)."""
    return Path(os.environ.get("CIFARVIZ_DATA") or DEV_DATA).resolve()


@pytest.fixture(scope="session")
def cifar():
    """The real dataset, decoded once per test session."""
    from cifarviz.core.data import detect_layout
    from cifarviz.store.datasets import load_cifar10

    root = real_data_root()
    if not root.is_dir() or not detect_layout(root):
        pytest.skip(f"real-data test: no CIFAR-10 at {root} (set CIFARVIZ_DATA)")
    return load_cifar10(root, download=False, progress=False)


@pytest.fixture(scope="session")
def cifar_small(cifar):
    """A class-balanced slice of the real data (2,000 train / 500 val / 1,000 test) for quick training tests."""
    import dataclasses

    from cifarviz.core.data import Split

    def take(split, n):
        idx = np.sort(np.random.default_rng(1).choice(len(split), n, replace=False))
        return Split(split.name, split.images[idx], split.labels[idx], split.source_index[idx])

    return dataclasses.replace(cifar, train=take(cifar.train, 2000), val=take(cifar.val, 500), test=take(cifar.test, 1000))


def write_image_folder(root: Path, classes=("cat", "dog", "frog"), per_class=(6, 3), size=32, ext=".png", seed=0):
    """A tiny synthetic image-folder tree: each class has its own dominant colour."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for ci, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                pixels[..., ci % 3] += 180
                Image.fromarray(pixels).save(folder / f"{i:04d}{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "tiny")


@pytest.fixture(autouse=True)
def no_work_left_behind():
    """After each test: this process's collectors stop, and the workers they started for its runs folders end (a
    collector would otherwise start a worker for a test's leftover queued runs once the test's settings are gone)."""
    yield
    from cifarviz.services.work import collector, worker

    for root in collector.stop_all():
        if root.is_dir():
            worker.stop_local_workers(root, signal.SIGKILL)


@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    """A private runs folder for the library, the workers it starts (they inherit the environment) and the app."""
    root = tmp_path / "runs"
    monkeypatch.setenv("CIFARVIZ_RUNS", str(root))
    monkeypatch.setenv("CIFARVIZ_MAX_RUNS", "1")
    yield root


# The fast lane: `python -m pytest -m "not slow"` (about 2 minutes) leaves out what takes more than seconds: these
# modules (real browsers, the lecture hall's processes, trainings of the recipes, wheels, PostgreSQL, the broker),
# marked here in one place so a new test in one of them is slow by default, and single tests elsewhere that mark
# themselves @pytest.mark.slow (the app's pages through AppTest, CLI subprocesses, retraining checks).
SLOW_MODULES = {"test_browser", "test_browser_names", "test_browser_train", "test_browser_views", "test_serve",
                "test_lecture_hall", "test_retrain", "test_ensemble", "test_tune_postgres", "test_wheel",
                "test_shipped_checkpoints", "test_work_queue"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (browsers, trainings, servers, the app's pages); "
                            "-m 'not slow' skips it")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
