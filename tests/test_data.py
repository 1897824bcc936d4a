import pickle
import time

import numpy as np
import pytest
from PIL import Image

from cifarviz.data import PYTHON_DIR, load_cifar10, load_image_file
from cifarviz.errors import DataError
from conftest import write_image_folder


# ----------------------------------------------------------------------------- real data


def test_real_data_counts_and_splits(cifar):
    assert cifar.layout == "image-folder"
    assert cifar.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert (len(cifar.train), len(cifar.val), len(cifar.test)) == (45000, 5000, 10000)
    assert cifar.train.images.shape == (45000, 32, 32, 3) and cifar.train.images.dtype == np.uint8
    assert np.bincount(cifar.test.labels).tolist() == [1000] * 10
    assert np.bincount(np.concatenate([cifar.train.labels, cifar.val.labels])).tolist() == [5000] * 10
    # train and val partition the 50,000 source training images
    both = np.concatenate([cifar.train.source_index, cifar.val.source_index])
    assert np.array_equal(np.sort(both), np.arange(50000))


def test_real_data_statistics_match_the_data_readme(cifar):
    test_mean = cifar.test.images.reshape(-1, 3).mean(0) / 255
    assert np.allclose(test_mean, [0.494, 0.485, 0.450], atol=0.002)
    train_pixels = cifar.train.images.reshape(-1, 3)[::97] / 255
    assert np.allclose(cifar.mean, train_pixels.mean(0), atol=0.003)
    assert np.allclose(cifar.std, train_pixels.std(0), atol=0.003)


def test_split_is_seeded_and_stable(cifar):
    again = load_cifar10(cifar.root, download=False, progress=False)
    assert np.array_equal(again.val.source_index, cifar.val.source_index)
    assert np.array_equal(again.train.images[123], cifar.train.images[123])
    other = load_cifar10(cifar.root, download=False, progress=False, split_seed=1)
    assert not np.array_equal(other.val.source_index, cifar.val.source_index)


def test_second_load_comes_from_the_cache(cifar):
    from cifarviz.utils import cache_dir

    caches = list((cache_dir() / "data").glob(f"image-folder-{cifar.fingerprint}-*.npz"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    load_cifar10(cifar.root, download=False, progress=False)
    assert caches[0].stat().st_mtime_ns == stamp  # read, not rewritten


# ----------------------------------------------------------------------------- synthetic layouts


def test_image_folder_layout_resizes_and_labels(tmp_path):
    root = write_image_folder(tmp_path / "big", size=48, ext=".jpg")
    ds = load_cifar10(root, download=False, progress=False, val_size=3)
    assert ds.classes == ("cat", "dog", "frog")
    assert ds.train.images.shape == (15, 32, 32, 3) and len(ds.val) == 3 and len(ds.test) == 9
    # class colour survives decoding: cat images are red-dominant, dog green, frog blue
    for split in (ds.train, ds.test):
        dominant = split.images.reshape(len(split), -1, 3).mean(1).argmax(1)
        assert np.array_equal(dominant, split.labels)


def _write_python_batches(root, malicious=False):
    base = root / PYTHON_DIR
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, 4))
        expected[name] = (data, labels)
        payload = {b"data": data, b"labels": [int(x) for x in labels], b"batch_label": name.encode()}
        with open(base / name, "wb") as fh:
            pickle.dump(payload, fh, protocol=2)
    if malicious:
        class Evil:
            def __reduce__(self):
                return (exec, (f"open({str(root / 'pwned')!r}, 'w').write('x')",))

        with open(base / "data_batch_3", "wb") as fh:
            pickle.dump({b"data": Evil(), b"labels": []}, fh)
    return expected


def test_python_archive_layout(tmp_path):
    expected = _write_python_batches(tmp_path)
    ds = load_cifar10(tmp_path, download=False, progress=False, val_size=5)
    assert ds.layout == "python" and ds.classes[0] == "airplane"
    assert len(ds.train) + len(ds.val) == 20 and len(ds.test) == 4
    data, labels = expected["test_batch"]
    assert np.array_equal(ds.test.labels, labels)
    assert np.array_equal(ds.test.images[0], data[0].reshape(3, 32, 32).transpose(1, 2, 0))


def test_python_batches_are_unpickled_without_running_code(tmp_path):
    _write_python_batches(tmp_path, malicious=True)
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(tmp_path, download=False, progress=False, use_cache=False)
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- clear errors


def test_missing_data_says_where_and_how(tmp_path):
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path / "nowhere", download=False)
    message = str(err.value)
    assert "nowhere" in message and "CIFARVIZ_DATA" in message and "--data" in message


def test_missing_data_offline_fails_fast_instead_of_hanging(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DataError, match="cannot be downloaded"):
        load_cifar10(tmp_path / "empty", download=True)
    assert time.perf_counter() - start < 10


def test_wrong_layout_is_explained(tmp_path):
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "photos" / "a.png")
    with pytest.raises(DataError, match="does not look like CIFAR-10"):
        load_cifar10(tmp_path, download=False)


def test_mismatched_class_folders(image_folder):
    (image_folder / "test" / "frog").rename(image_folder / "test" / "toad")
    with pytest.raises(DataError, match="class folders differ"):
        load_cifar10(image_folder, download=False, progress=False)


def test_unreadable_image_names_the_file(image_folder):
    bad = image_folder / "train" / "dog" / "0001.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="0001.png"):
        load_cifar10(image_folder, download=False, progress=False)


def test_user_image_upload(tmp_path):
    Image.new("RGB", (640, 480), (200, 10, 10)).save(tmp_path / "red.jpg")
    pixels = load_image_file((tmp_path / "red.jpg").read_bytes())
    assert pixels.shape == (32, 32, 3) and pixels[..., 0].mean() > 150
    with pytest.raises(DataError, match="not an image"):
        load_image_file(b"%PDF-1.4 definitely not an image")
