import itertools
import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from conftest import REPO, write_image_folder
from PIL import Image

from cifarviz.core.data import CIFAR10_CLASSES, PYTHON_DIR, _identify
from cifarviz.core.decode import _decode_images, load_image_file
from cifarviz.core.errors import DataError
from cifarviz.store.datasets import load_cifar10

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


@pytest.mark.slow
def test_split_is_seeded_and_stable(cifar):
    again = load_cifar10(cifar.root, download=False, progress=False)
    assert np.array_equal(again.val.source_index, cifar.val.source_index)
    assert np.array_equal(again.train.images[123], cifar.train.images[123])
    other = load_cifar10(cifar.root, download=False, progress=False, split_seed=1)
    assert not np.array_equal(other.val.source_index, cifar.val.source_index)


def test_second_load_comes_from_the_cache(cifar):
    from cifarviz.core.data import find_source
    from cifarviz.store import default_store
    from cifarviz.store.datasets import pixels_key

    fingerprint, key, _ = _identify(cifar.root, cifar.layout)
    source = find_source(cifar.root, download=False)
    caches = [default_store().path(pixels_key(source, part)) for part in ("train", "test")]
    assert fingerprint == cifar.fingerprint and key.startswith(f"image-folder-{fingerprint}-")
    inodes = [cache.stat().st_ino for cache in caches]
    again = load_cifar10(cifar.root, download=False, progress=False)
    assert [cache.stat().st_ino for cache in caches] == inodes  # read, not rewritten (a write renames a new file)
    assert np.array_equal(again.test.images, cifar.test.images)


def test_lazy_load_decodes_the_training_images_on_first_use(tmp_path, monkeypatch):
    """The app's first visit to Evaluate waits for the test images only."""
    monkeypatch.setenv("CIFARVIZ_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "data", size=32, ext=".png")
    eager = load_cifar10(root, download=False, progress=False, val_size=3, use_cache=False)
    lazy = load_cifar10(root, download=False, progress=False, val_size=3, lazy=True)
    assert lazy.test.decoded and not lazy.train.decoded and not lazy.val.decoded
    assert np.array_equal(lazy.test.images, eager.test.images)
    assert np.array_equal(lazy.train.labels, eager.train.labels) and len(lazy.val) == 3  # labels need no pixels
    cached = sorted(p.name.split("-", 1)[0] + ".npz" for p in (tmp_path / "cache" / "data").glob("*.npz"))
    assert cached == ["test.npz"]
    assert lazy.mean == eager.mean and lazy.std == eager.std  # decodes the training part, once
    assert lazy.train.decoded
    assert np.array_equal(lazy.train.images, eager.train.images) and np.array_equal(lazy.val.images, eager.val.images)
    cached = sorted(p.name.split("-", 1)[0] + ".npz" for p in (tmp_path / "cache" / "data").glob("*.npz"))
    assert cached == ["test.npz", "train.npz"]


def test_lazy_load_reports_a_bad_training_image_on_every_use(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARVIZ_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "data", size=32, ext=".png")
    bad = next((root / "train" / "cat").iterdir())
    bad.write_bytes(b"not an image at all")
    lazy = load_cifar10(root, download=False, progress=False, val_size=3, lazy=True)
    assert len(lazy.test) == 9
    for _ in range(2):
        with pytest.raises(DataError, match=bad.name):
            lazy.train.images  # noqa: B018
    with pytest.raises(DataError, match=bad.name):
        load_cifar10(root, download=False, progress=False, val_size=3)  # eager: at load time


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
    pixels = ds.train.images.reshape(-1, 3) / 255
    assert np.allclose(ds.mean, pixels.mean(0), atol=1e-12) and np.allclose(ds.std, pixels.std(0), atol=1e-12)


def _write_python_batches(root, malicious=False, relabel=0, class_names=CIFAR10_CLASSES, labels_of=None):
    """Six tiny batches (4 images each) and batches.meta; relabel shifts every label, labels_of overrides a batch's."""
    base = root / PYTHON_DIR
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = {}
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [n.encode() for n in class_names]}, fh, protocol=2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = [(int(x) + relabel) % 10 for x in rng.integers(0, 10, 4)]
        labels = (labels_of or {}).get(name, labels)
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


# ----------------------------------------------------------------------------- caches follow the content


def test_relabelled_python_copy_shares_no_cache_or_statistics(tmp_path):
    _write_python_batches(tmp_path / "a")
    original = load_cifar10(tmp_path / "a", download=False, progress=False, val_size=5)
    # Same file names, sizes and modification times; other labels and class names.
    renamed = tuple(name[::-1] for name in CIFAR10_CLASSES)
    expected = _write_python_batches(tmp_path / "b", relabel=3, class_names=renamed)
    for path in (tmp_path / "a" / PYTHON_DIR).iterdir():
        twin = tmp_path / "b" / PYTHON_DIR / path.name
        assert twin.stat().st_size == path.stat().st_size
        os.utime(twin, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    relabelled = load_cifar10(tmp_path / "b", download=False, progress=False, val_size=5)
    assert relabelled.fingerprint != original.fingerprint
    assert relabelled.classes == renamed
    assert relabelled.test.labels.tolist() == expected["test_batch"][1]
    assert np.array_equal(relabelled.test.labels, (original.test.labels + 3) % 10)


def test_image_replaced_by_one_of_the_same_size_is_decoded_again(tmp_path):
    root = write_image_folder(tmp_path / "bmp", ext=".bmp")  # BMP: every 32x32 image has the same size
    first = load_cifar10(root, download=False, progress=False, val_size=0)
    assert first.train.images[0].mean((0, 1)).argmax() == 0  # cat: red
    path = root / "train" / "cat" / "0000.bmp"
    before = path.stat()
    Image.new("RGB", (32, 32), (0, 0, 255)).save(path)
    assert path.stat().st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    again = load_cifar10(root, download=False, progress=False, val_size=0)
    assert again.fingerprint == first.fingerprint  # names and sizes: what checkpoints record
    assert again.train.images[0].tolist() == [[[0, 0, 255]] * 32] * 32
    assert again.mean != first.mean  # statistics follow the decoded images, not the fingerprint


# ----------------------------------------------------------------------------- hostile or unusual files


def _png(width, height, bit_depth, color_type, rows) -> bytes:
    """A PNG written by hand: Pillow cannot write 16-bit RGB, and a 400-megapixel one must not need 400 MB."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj()
    idat = b"".join(compressor.compress(b"\0" + row) for row in rows) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("where", ["file", "class folder", "two files"])
def test_symlink_loop_is_a_clear_error(image_folder, where):
    if where == "file":
        (image_folder / "train" / "cat" / "loop.png").symlink_to("loop.png")
    elif where == "class folder":
        (image_folder / "train" / "loop").symlink_to("loop")
    else:
        (image_folder / "test" / "dog" / "a.png").symlink_to("b.png")
        (image_folder / "test" / "dog" / "b.png").symlink_to("a.png")
    with pytest.raises(DataError, match=r"/(loop|loop\.png|a\.png) is a symbolic link loop"):
        load_cifar10(image_folder, download=False, progress=False)


@pytest.mark.parametrize("width, height", [(6000, 5000), (20000, 20000)])  # above ours / above Pillow's bomb limit
def test_huge_image_in_a_class_folder_is_refused_from_its_header(image_folder, width, height):
    rows = itertools.repeat(bytes((width + 7) // 8), height)  # 1-bit black: a few kB on disk
    (image_folder / "train" / "dog" / "huge.png").write_bytes(_png(width, height, 1, 0, rows))
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"huge\.png .*pixels") as err:
        load_cifar10(image_folder, download=False, progress=False, use_cache=False)
    assert time.perf_counter() - start < 3  # decoding 400 megapixels would take far longer (and 400 MB)
    assert "25,000,000" in str(err.value)


@pytest.mark.parametrize(
    "batch, labels, message",
    [
        ("data_batch_2", [0, 1, 50, 2], "label 50"),
        ("test_batch", [-1, 0, 0, 0], "label -1"),
        ("data_batch_4", [0, 1, 2, 3, 4], "5 labels for 4 images"),
    ],
)
def test_python_batch_with_bad_labels_names_the_file(tmp_path, batch, labels, message):
    _write_python_batches(tmp_path, labels_of={batch: labels})
    with pytest.raises(DataError, match=f"{batch} has {message}"):
        load_cifar10(tmp_path, download=False, progress=False, use_cache=False)


def _gray16(value):
    return _png(32, 32, 16, 0, itertools.repeat(struct.pack(">H", value) * 32, 32))


def _rgb16(red, green, blue):
    return _png(32, 32, 16, 2, itertools.repeat(struct.pack(">HHH", red, green, blue) * 32, 32))


def test_sixteen_bit_images_are_scaled_to_eight_bits(image_folder, tmp_path):
    Image.fromarray(np.full((32, 32), 30000, np.uint16)).save(tmp_path / "pil.png")  # Pillow mode "I;16"
    assert Image.open(tmp_path / "pil.png").mode == "I;16"
    (image_folder / "train" / "cat" / "0000.png").write_bytes((tmp_path / "pil.png").read_bytes())
    (image_folder / "train" / "cat" / "0001.png").write_bytes(_gray16(65535))
    (image_folder / "train" / "dog" / "0000.png").write_bytes(_rgb16(60000, 30000, 1000))
    ds = load_cifar10(image_folder, download=False, progress=False, val_size=0)
    assert ds.train.images[0].reshape(-1, 3).tolist() == [[117, 117, 117]] * 1024  # 30000 / 257
    assert ds.train.images[1].min() == 255
    assert np.abs(ds.train.images[6].reshape(-1, 3) - np.array([60000, 30000, 1000]) / 257).max() <= 1
    assert load_image_file(_gray16(30000)).reshape(-1, 3).tolist() == [[117, 117, 117]] * 1024


def _rotated_phone_photo(path):
    """Stored 48 wide x 32 high, top half red, bottom half blue, with EXIF "rotate 90 degrees clockwise"."""
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:16, :, 0] = 255
    pixels[16:, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


def _upright(pixels):
    """Shown upright, the stored top is on the right: red right half, blue left half."""
    return pixels[:, 20:, 0].mean() > 200 > pixels[:, 20:, 2].mean() and pixels[:, :12, 2].mean() > 200


def test_exif_orientation_is_applied(image_folder, tmp_path):
    _rotated_phone_photo(tmp_path / "photo.jpg")
    assert _upright(load_image_file((tmp_path / "photo.jpg").read_bytes()))
    assert _upright(load_image_file(tmp_path / "photo.jpg"))
    shutil.copy(tmp_path / "photo.jpg", image_folder / "train" / "cat" / "zz-photo.jpg")
    ds = load_cifar10(image_folder, download=False, progress=False, val_size=0)
    assert _upright(ds.train.images[6])


def test_not_an_image_message_has_no_object_repr(tmp_path):
    with pytest.raises(DataError) as err:
        load_image_file(b"%PDF-1.4 definitely not an image")
    assert "not an image" in str(err.value) and "<" not in str(err.value) and "0x" not in str(err.value)
    (tmp_path / "notes.png").write_bytes(b"hello")
    with pytest.raises(DataError, match="notes.png is not an image"):
        load_image_file(tmp_path / "notes.png")


# ----------------------------------------------------------------------------- validation split size


def test_val_size_beyond_the_training_set_is_refused(image_folder):
    with pytest.raises(DataError, match="must be below 18"):
        load_cifar10(image_folder, download=False, progress=False, val_size=100)
    # The default on a dataset smaller than itself keeps a tenth for validation (a small custom dataset).
    small = load_cifar10(image_folder, download=False, progress=False)
    assert (len(small.train), len(small.val)) == (17, 1)


def test_val_size_beyond_the_real_training_set_is_refused(cifar):
    with pytest.raises(DataError, match="must be below 50,000"):
        load_cifar10(cifar.root, download=False, progress=False, val_size=100000)


# ----------------------------------------------------------------------------- decoding in worker processes


def _paths(root):
    return sorted(str(p) for p in root.rglob("*.png"))


def test_worker_processes_decode_the_same_pixels_from_any_thread(tmp_path):
    root = write_image_folder(tmp_path / "w", per_class=(40, 10), size=40)
    paths = _paths(root)
    here = _decode_images(paths, workers=0)
    result = {}
    thread = threading.Thread(target=lambda: result.update(images=_decode_images(paths, workers=2)))  # like Streamlit
    thread.start()
    thread.join(60)
    assert np.array_equal(result["images"], here)
    assert here.shape == (150, 32, 32, 3) and here.any()


def test_bad_image_in_a_worker_process_names_the_file(image_folder):
    (image_folder / "test" / "frog" / "0002.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"frog/0002\.png is not an image"):
        _decode_images(_paths(image_folder), workers=2)


def test_worker_processes_run_from_an_unguarded_script_without_torch(image_folder, tmp_path):
    """No `if __name__ == "__main__"` guard, as in a notebook-style script: multiprocessing's spawn would re-run it."""
    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from cifarviz.core.decode import _decode_images\n"
        f"images = _decode_images({_paths(image_folder)!r}, workers=2)\n"
        "print('decoded', len(images), 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["decoded 27 False"]
