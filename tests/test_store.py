"""The one store: keys that cover everything, files checked before they are served, a size cap, and a disk that
cannot keep files (full, or CIFARVIZ_CACHE naming a file) degrading to memory with one warning."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write_image_folder, visible

from cifarviz.analysis.embed import embedding, embedding_path
from cifarviz.analysis.influence import InfluenceError, index_path, load_or_fit, lookup
from cifarviz.core.checkpoint import SHIPPED_DIR, load_checkpoint
from cifarviz.store import Array, CacheKey, Schema, SchemaError, Store, default_store
from cifarviz.store.artifacts import artifact_key, split_artifacts
from cifarviz.store.datasets import load_cifar10

SCHEMA = Schema({"values": Array("f", ("n", 2)), "labels": Array("i", ("n",), low=0, below="classes")})


def arrays(n=10, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"values": rng.normal(size=(n, 2)), "labels": rng.integers(0, classes, n)}


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A private cache folder and a 3-class image folder."""
    monkeypatch.setenv("CIFARVIZ_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "data", per_class=(30, 10))
    return load_cifar10(root, download=False, progress=False, val_size=9)


# ----------------------------------------------------------------------------- keys


def test_a_key_names_its_inputs_and_nothing_else():
    a = CacheKey("maps", 1, {"model": {"arch": "x", "args": [1, 2]}, "seed": 0})
    same = CacheKey("maps", 1, {"seed": 0, "model": {"args": (1, 2), "arch": "x"}}, label="another label")
    assert a == same and a.digest == same.digest  # order of keys, tuples vs lists, labels: same content
    assert a != CacheKey("maps", 2, a.parts)  # the format version counts
    assert a != CacheKey("maps", 1, {**a.parts, "seed": 1})
    with pytest.raises(TypeError):
        CacheKey("maps", 1, {"model": object()})  # only plain values can name content


def test_the_same_weights_loaded_as_another_architecture_get_their_own_artifacts(tiny):
    """deepnet-res and deepnet-conv have identical tensors; their forward passes differ, so do their caches."""
    path = SHIPPED_DIR / "deepnet-res.safetensors"
    res = load_checkpoint(path)
    conv = load_checkpoint(path, architecture="deepnet-conv")
    assert artifact_key(res, tiny, "test") != artifact_key(conv, tiny, "test")
    a, b = split_artifacts(res, tiny, "test"), split_artifacts(conv, tiny, "test")
    assert not np.allclose(a.logits, b.logits)  # conv was never served res's logits
    again = split_artifacts(conv, tiny, "test")
    np.testing.assert_array_equal(again.logits, b.logits)


def test_arguments_that_change_the_forward_pass_are_in_the_key(tiny):
    from cifarviz.core.checkpoint import Checkpoint
    from cifarviz.core.models import create_model

    two, four = create_model("s8net-gn", groups=2), create_model("s8net-gn", groups=4)
    four.load_state_dict(two.state_dict())  # identical tensors, other groups
    keys = {artifact_key(Checkpoint(m.eval()), tiny, "test") for m in (two, four)}
    assert len(keys) == 2


# ----------------------------------------------------------------------------- reading back


def test_a_file_that_fails_its_schema_is_rebuilt_and_the_reason_logged(tmp_path, caplog):
    store = Store(tmp_path, max_bytes=2**30)
    key = CacheKey("things", 1, {"x": 1})
    calls = []

    def compute():
        calls.append(1)
        return arrays()

    good = store.cached(key, compute, SCHEMA, dims={"classes": 3})
    for broken in ({**good, "values": np.full((10, 2), np.nan)},  # not finite
                   {**good, "labels": good["labels"] + 50},  # out of range
                   {**good, "labels": good["labels"][:5]},  # rows that disagree
                   {"values": good["values"]},  # a missing array
                   {**good, "values": good["values"].astype(np.int64)}):  # another dtype
        np.savez(store.path(key), **broken, __key__=np.array(key.digest))  # its own key: the schema must catch it
        store.forget()
        with caplog.at_level(logging.WARNING, logger="cifarviz.store"):
            again = store.cached(key, compute, SCHEMA, dims={"classes": 3})
        assert "failed its check" in caplog.text
        caplog.clear()
        np.testing.assert_array_equal(again["labels"], good["labels"])
    assert len(calls) == 6  # the first computation, then one rebuild per broken file
    store.path(key).write_bytes(b"PK\x03\x04 not really a zip")  # unreadable: rebuilt too
    store.forget()
    store.cached(key, compute, SCHEMA, dims={"classes": 3})
    assert len(calls) == 7


def test_a_shipped_result_is_read_when_its_key_matches_and_never_removed(tmp_path, caplog):
    """checkpoints/store/: what a maintainer shipped (Store.ship) is read on a fresh cache with the same key, a
    damaged one is passed over (computed into the cache instead) and left in place, and nothing is written there."""
    maker = Store(tmp_path / "maker", max_bytes=2**30, shipped=tmp_path / "shipped")
    # the maker's data files have other modification times than a fresh clone's copy: only the portable parts agree
    key = CacheKey("things", 1, {"x": 3, "data": "names-sizes-times-A"}, portable={"x": 3, "data": "names-sizes"})
    made = maker.cached(key, lambda: arrays(n=50), SCHEMA, dims={"classes": 3})
    shipped = maker.ship(key, SCHEMA, dims={"classes": 3})
    assert shipped.parent.parent == tmp_path / "shipped" and shipped.name == key.shipped_filename != key.filename

    fresh = Store(tmp_path / "fresh", max_bytes=2**30, shipped=tmp_path / "shipped")
    key = CacheKey("things", 1, {"x": 3, "data": "names-sizes-times-B"}, portable={"x": 3, "data": "names-sizes"})
    assert fresh.has(key) and not fresh.has(CacheKey("things", 1, {"x": 4}, portable={"x": 4}))  # another content
    calls = []
    got = fresh.cached(key, lambda: calls.append(1) or arrays(n=50, seed=1), SCHEMA, dims={"classes": 3})
    assert not calls and not fresh.path(key).exists()  # read, not computed, and nothing copied into the cache
    np.testing.assert_array_equal(got["values"], made["values"])

    shipped.write_bytes(shipped.read_bytes()[:200])  # damaged
    fresh.forget()
    with caplog.at_level(logging.WARNING, logger="cifarviz.store"):
        again = fresh.cached(key, lambda: calls.append(1) or arrays(n=50, seed=1), SCHEMA, dims={"classes": 3})
    assert calls == [1] and shipped.exists() and "shipped" in caplog.text  # computed; the shipped file stays
    np.testing.assert_array_equal(again["values"], arrays(n=50, seed=1)["values"])
    assert fresh.path(key).exists()


def test_another_keys_file_copied_or_linked_into_place_is_refused(tmp_path, caplog):
    """A valid-looking file under a key's name is not enough: it must carry that key. Another result copied over
    it, a link to one, and a file from before keys were recorded are each refused, said why, and computed again."""
    store = Store(tmp_path / "cache", max_bytes=2**30)
    mine, theirs = CacheKey("things", 1, {"model": "mine"}), CacheKey("things", 1, {"model": "theirs"})
    store.cached(theirs, lambda: arrays(n=10, seed=7), SCHEMA)
    honest = arrays(n=10, seed=1)
    for forge, reason in ((lambda: store.path(mine).write_bytes(store.path(theirs).read_bytes()), "another key"),
                          (lambda: store.path(mine).symlink_to(store.path(theirs)), "symbolic link"),
                          (lambda: np.savez(store.path(mine), **arrays(n=10, seed=7)), "records no key"),
                          (lambda: np.savez(store.path(mine), **arrays(n=10, seed=7), __key__=np.array([b"x"])),
                           "records no key")):
        store.path(mine).parent.mkdir(parents=True, exist_ok=True)
        store.path(mine).unlink(missing_ok=True)
        forge()
        store.forget()
        with caplog.at_level(logging.WARNING, logger="cifarviz.store"):
            got = store.cached(mine, lambda: honest, SCHEMA)
        assert reason in caplog.text, reason
        caplog.clear()
        np.testing.assert_array_equal(got["values"], honest["values"])  # computed, never the other file's
        assert not store.path(mine).is_symlink() and store.path(theirs).is_file()  # the link went, not its target
    store.forget()
    np.testing.assert_array_equal(store.read(mine, SCHEMA)["values"], honest["values"])  # what it wrote, read back


def test_the_expected_row_count_is_checked(tmp_path):
    store = Store(tmp_path, max_bytes=2**30)
    key = CacheKey("things", 1, {"x": 2})
    store.cached(key, lambda: arrays(n=100), SCHEMA, dims={"classes": 3, "n": 100})
    store.forget()
    assert store.read(key, SCHEMA, dims={"classes": 3, "n": 45_000}) is None  # a 100-row file is not 45,000 rows
    assert not store.path(key).exists()


def test_a_bug_in_the_computation_is_raised_not_swallowed(tmp_path):
    store = Store(tmp_path, max_bytes=2**30)

    def buggy():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        store.cached(CacheKey("things", 1, {"x": 3}), buggy, SCHEMA)
    with pytest.raises(SchemaError, match="values"):  # a result that breaks its own schema is never saved
        store.cached(CacheKey("things", 1, {"x": 4}), lambda: {**arrays(), "values": np.zeros((10, 3))}, SCHEMA)
    assert store.files() == []


def test_a_damaged_map_is_rebuilt_never_shown(tiny):
    lenet = load_checkpoint(SHIPPED_DIR / "lenet.safetensors")
    first = embedding(lenet, tiny, "test", "pca")
    path = embedding_path(lenet, tiny, "test", "pca")
    for damage in ({"coords": np.full_like(first.coords, np.nan)}, {"indices": first.indices + 10**9},
                   {"labels": first.labels + 50}):
        with np.load(path) as z:
            stored = {name: z[name] for name in z.files}
        np.savez(path, **{**stored, **damage})
        default_store().forget()
        again = embedding(lenet, tiny, "test", "pca")
        assert np.isfinite(again.coords).all()
        np.testing.assert_array_equal(again.indices, first.indices)
        np.testing.assert_array_equal(again.labels, first.labels)
    with np.load(path) as z:  # a map cut to 5 points
        stored = {name: z[name][:5] if z[name].ndim else z[name] for name in z.files}
    np.savez(path, **stored)
    default_store().forget()
    assert len(embedding(lenet, tiny, "test", "pca")) == len(first)


def test_a_truncated_influence_index_is_rebuilt_and_an_index_answers_only_for_its_checkpoint(tiny):
    lenet = load_checkpoint(SHIPPED_DIR / "lenet.safetensors")
    index = load_or_fit("similarity", lenet, tiny)
    path = index_path("similarity", lenet, tiny)
    with np.load(path) as z:
        np.savez(path, **{name: z[name][:10] if z[name].ndim else z[name] for name in z.files})  # 10 rows for 81
    again = load_or_fit("similarity", lenet, tiny)
    assert again.n_train == len(tiny.train) == index.n_train
    other = load_checkpoint(SHIPPED_DIR / "s8net-bn.safetensors")
    with pytest.raises(InfluenceError, match="another checkpoint"):
        lookup(again, other, tiny, test_index=0)
    assert len(lookup(again, lenet, tiny, test_index=0, k=3).helpful) == 3


# ----------------------------------------------------------------------------- bounded, and without a disk


def test_the_least_recently_used_files_go_first(tmp_path):
    one = np.zeros((1000, 2))
    size = len(_saved(tmp_path / "probe.npz", {"values": one, "labels": np.zeros(1000, np.int64)}))
    store = Store(tmp_path / "cache", max_bytes=int(3.5 * size))
    keys = [CacheKey("things", 1, {"i": i}) for i in range(4)]
    compute = lambda: {"values": one, "labels": np.zeros(1000, np.int64)}  # noqa: E731
    for key in keys[:3]:
        store.cached(key, compute, SCHEMA, memo=False)
    store.read(keys[0], SCHEMA, memo=False)  # used again: now the most recent
    store.cached(keys[3], compute, SCHEMA, memo=False)
    kept = {key for key in keys if store.path(key).exists()}
    assert kept == {keys[0], keys[2], keys[3]}  # keys[1] was the least recently used
    assert store.size() <= store.max_bytes


def test_a_cap_smaller_than_one_commands_files_is_said_once_with_the_fix(tmp_path, caplog):
    big = np.zeros((20_000, 2))
    store = Store(tmp_path / "cache", max_bytes=300_000)  # one such file is about 480 KB
    with caplog.at_level(logging.WARNING, logger="cifarviz.store"):
        for i in range(2):
            store.cached(CacheKey("things", 1, {"i": i}), lambda: {"values": big, "labels": np.zeros(20_000, int)},
                         SCHEMA, memo=False)
    assert len(store.warnings) == 1 and "CIFARVIZ_CACHE_MAX_GB" in store.warnings[0]
    assert "computes it again" in caplog.text
    roomy = Store(tmp_path / "roomy", max_bytes=2**30)
    roomy.cached(CacheKey("things", 1, {"i": 0}), lambda: {"values": big, "labels": np.zeros(20_000, int)}, SCHEMA)
    assert roomy.warnings == []


def _saved(path: Path, data: dict) -> bytes:
    np.savez(path, **data)
    return path.read_bytes()


def test_a_cache_folder_that_is_a_file_computes_in_memory_with_one_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("in the way")
    monkeypatch.setenv("CIFARVIZ_CACHE", str(blocker))
    store = default_store()
    calls = []

    def compute():
        calls.append(1)
        return arrays()

    first = store.cached(CacheKey("things", 1, {"x": 5}), compute, SCHEMA)
    again = store.cached(CacheKey("things", 1, {"x": 5}), compute, SCHEMA)
    store.cached(CacheKey("things", 1, {"x": 6}), compute, SCHEMA)
    assert again is first and len(calls) == 2  # kept in memory: computed once per key
    assert store.has(CacheKey("things", 1, {"x": 5})) and not store.has(CacheKey("things", 1, {"x": 7}))
    assert len(store.warnings) == 1 and "CIFARVIZ_CACHE" in store.warnings[0]
    root = write_image_folder(tmp_path / "data", per_class=(30, 10))
    dataset = load_cifar10(root, download=False, progress=False, val_size=9)  # the data loads too
    lenet = load_checkpoint(SHIPPED_DIR / "lenet.safetensors")
    from cifarviz.analysis.embed import embedding_ready
    from cifarviz.analysis.influence import index_ready

    assert not embedding_ready(lenet, dataset, "test", "pca") and not index_ready("similarity", lenet, dataset)
    embedding(lenet, dataset, "test", "pca")
    load_or_fit("similarity", lenet, dataset)
    # what the app asks before it starts a background job: ready, so no job is started again on every rerun
    assert embedding_ready(lenet, dataset, "test", "pca") and index_ready("similarity", lenet, dataset)


FULL_DISK = """
import resource, signal, sys
import numpy as np
from cifarviz.store import Array, CacheKey, Schema, Store
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # no file over 4 KB: a disk that is all but full
store = Store(sys.argv[1], max_bytes=2**30)
schema = Schema({"values": Array("f", ("n",))})
calls = []
def compute():
    calls.append(1)
    return {"values": np.arange(10_000, dtype=np.float64)}
first = store.cached(CacheKey("things", 1, {}), compute, schema, memo=False)  # as influence indexes are cached
second = store.cached(CacheKey("things", 1, {}), compute, schema, memo=False)
assert second is first and calls == [1], calls
print(len(store.warnings), store.warnings[0])
"""


@pytest.mark.slow
def test_a_full_disk_keeps_the_finished_result_in_memory(tmp_path):
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path / "cache")], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    count, _, message = proc.stdout.strip().partition(" ")
    assert count == "1" and "cannot keep files" in message and "Traceback" not in proc.stderr
    assert list((tmp_path / "cache").rglob("*.npz")) == []  # nothing half-written was left to be served


def test_two_copies_of_one_dataset_keep_their_own_decoded_pixels(tmp_path, monkeypatch):
    """Same names and sizes, other modification times: switching between them never decodes again."""
    monkeypatch.setenv("CIFARVIZ_CACHE", str(tmp_path / "cache"))
    a = write_image_folder(tmp_path / "a")
    b = write_image_folder(tmp_path / "b")
    for path in b.rglob("*.png"):
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_cifar10(a, download=False, progress=False, val_size=3)
    load_cifar10(b, download=False, progress=False, val_size=3)
    from cifarviz.core.data import Source

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(Source, "decode", no_decoding)
    for root in (a, b, a):
        assert len(load_cifar10(root, download=False, progress=False, val_size=3).train) == 15


# ----------------------------------------------------------------------------- the app on data that does not fit


def _app(root: Path, page: str, checkpoint_label: str | None = None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=300)
    at.session_state["_data_root"] = str(root)
    if checkpoint_label:
        at.session_state["_checkpoint_label"] = checkpoint_label
    at.run()
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_evaluate_says_when_the_checkpoint_does_not_fit_the_data(tmp_path, monkeypatch):
    """A 10-class lenet on a 2-class folder: one clear message, not accuracy 0.0000 or an IndexError."""
    monkeypatch.setenv("CIFARVIZ_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "two", classes=("cat", "dog"), per_class=(12, 6))
    for page in ("pages/evaluate.py", "pages/influence.py", "pages/embeddings.py"):
        at = _app(root, page, "lenet (shipped)")
        shown = visible(" ".join(e.value for e in at.error))
        assert "predicts 10 classes" in shown and "cat, dog" in shown, page
        assert not at.metric and not at.dataframe, page  # no numbers measured on data the model cannot predict


def test_a_data_folder_fixed_while_the_server_runs_is_read_again(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARVIZ_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "data")
    bad = sorted((root / "train" / "dog").iterdir())[0]
    good = bad.read_bytes()
    bad.write_bytes(b"not an image")
    at = _app(root, "pages/dataset.py")
    assert bad.name in " ".join(c.value for c in at.code)  # the broken file is named
    bad.write_bytes(good)  # fixed, server still running
    at.run()
    assert not at.exception and not at.main.code, [c.value for c in at.main.code]  # the sidebar holds the view's link
    assert not at.warning or all("No CIFAR-10" not in w.value for w in at.warning)


def test_a_runs_folder_that_is_a_file_gets_a_message(tmp_path, monkeypatch):
    from cifarviz.core.train import TrainConfig
    from cifarviz.services import runs

    blocker = tmp_path / "runs"
    blocker.write_text("in the way")
    monkeypatch.setenv("CIFARVIZ_RUNS", str(blocker))
    with pytest.raises(runs.RunError, match="CIFARVIZ_RUNS"):
        runs.submit_training(TrainConfig(model="lenet", epochs=1), tmp_path)
    assert runs.list_runs() == []


def test_loss_settings_that_cannot_be_right_are_said_on_the_influence_page(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARVIZ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CIFARVIZ_RUNS", str(tmp_path / "runs"))
    root = write_image_folder(tmp_path / "data", classes=tuple(f"c{i}" for i in range(10)), per_class=(4, 2))
    from cifarviz.core.checkpoint import read_metadata, save_checkpoint
    from cifarviz.core.models import create_model

    lenet = load_checkpoint(SHIPPED_DIR / "lenet.safetensors")
    meta = {**read_metadata(SHIPPED_DIR / "lenet.safetensors"), "classes": None}
    meta["train_config"] = {**meta["train_config"], "label_smoothing": 5}
    model = create_model("lenet")
    model.load_state_dict(lenet.model.state_dict())
    save_checkpoint(tmp_path / "runs" / "hostile.safetensors", model, meta)
    at = _app(root, "pages/influence.py", "hostile (your run)")
    assert any("label_smoothing 5" in visible(e.value) for e in at.error), [e.value for e in at.error]
