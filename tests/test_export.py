"""cifarviz.analysis.export: the rows the app's downloads and `python -m cifarviz export` write, on the real data."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from cifarviz.analysis.explore import misclassified_by_confidence
from cifarviz.analysis.export import COLUMNS, rows_to_csv, rows_to_json, selection_rows
from cifarviz.core.checkpoint import load_checkpoint
from cifarviz.core.errors import CifarvizError
from cifarviz.store.artifacts import split_artifacts


@pytest.fixture(scope="module")
def lenet_probs(cifar):
    checkpoint = load_checkpoint("lenet")  # a shipped name, as the CLI takes it
    return {split: split_artifacts(checkpoint, cifar, split).probs for split in ("test", "val")}


def source_image(dataset, source_index: int) -> tuple[np.ndarray, str]:
    """The training part's image number `source_index` read straight from the source files, with its class, as the
    module docstring says: the file order of an image folder (class folder, then file name), or the python
    archive's rows (data_batch_1 to _5)."""
    root = dataset.root
    if dataset.layout == "image-folder":
        files = [path for folder in sorted(p for p in (root / "train").iterdir() if p.is_dir())
                 for path in sorted(folder.iterdir())]  # fmt: skip
        path = files[source_index]
        return np.asarray(Image.open(path).convert("RGB")), path.parent.name
    from cifarviz.core.data import PYTHON_DIR
    from cifarviz.core.decode import _read_python_batch

    images, labels = _read_python_batch(root / PYTHON_DIR / f"data_batch_{source_index // 10000 + 1}", 10)
    return images[source_index % 10000], dataset.classes[int(labels[source_index % 10000])]


def test_rows_are_the_dataset_s_images_in_the_given_order(cifar, lenet_probs):
    probs = lenet_probs["test"]
    picked = [*misclassified_by_confidence(probs, cifar.test.labels)[:20].tolist(), 0, 9999, 42]
    scores = np.linspace(-1, 1, len(picked))
    rows = selection_rows(cifar, "test", picked, probs, score=scores, score_name="influence")
    assert [row["index"] for row in rows] == picked
    for row, i, s in zip(rows, picked, scores):
        assert list(row) == [*COLUMNS, "influence"]
        assert row["split"] == "test" and row["source_index"] == int(cifar.test.source_index[i])
        assert row["label"] == cifar.classes[cifar.test.labels[i]]
        assert row["prediction"] == cifar.classes[probs[i].argmax()] and row["confidence"] == float(probs[i].max())
        assert row["influence"] == float(s)
    assert all(row["label"] != row["prediction"] for row in rows[:20])  # the mistakes
    assert "score" not in selection_rows(cifar, "test", [1], probs)[0]


def test_source_index_is_the_image_s_place_in_the_source(cifar, lenet_probs):
    picked = [0, 1, 2500, len(cifar.val) - 1]
    rows = selection_rows(cifar, "val", picked, lenet_probs["val"])
    # The validation images are drawn from the source's training part: their place there is not their index.
    assert any(row["source_index"] != row["index"] for row in rows)
    for row in rows:
        pixels, label = source_image(cifar, row["source_index"])
        assert np.array_equal(pixels, cifar.val.images[row["index"]]) and label == row["label"]


def test_csv_reads_back_to_the_same_values(cifar, lenet_probs):
    probs = lenet_probs["test"]
    picked = misclassified_by_confidence(probs, cifar.test.labels)[:50]
    rows = selection_rows(cifar, "test", picked, probs, score=probs[picked, 0] / 3, score_name="third")
    text = rows_to_csv(rows)
    assert text.splitlines()[0] == ",".join([*COLUMNS, "third"])
    back = list(csv.DictReader(io.StringIO(text)))
    assert len(back) == len(rows)
    for row, read in zip(rows, back):
        assert {k: type(v)(read[k]) for k, v in row.items()} == row  # floats to the last digit
    empty = rows_to_csv([])  # an empty confusion cell: still a header a spreadsheet can read
    assert list(csv.reader(io.StringIO(empty))) == [list(COLUMNS)]


def test_json_is_strict_and_holds_the_rows(cifar, lenet_probs):
    probs = lenet_probs["test"]
    rows = selection_rows(cifar, "test", [3, 1, 2], probs, score=[0.5, -2.0, 1e-9])
    about = {"what": "mistakes", "checkpoint": "lenet"}

    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    parsed = json.loads(rows_to_json(rows, about), parse_constant=refuse)
    assert parsed == {"about": about, "images": rows}
    rows[1]["score"] = float("nan")
    with pytest.raises(CifarvizError, match="score of image 1 is not a finite number"):
        rows_to_json(rows, about)


def test_bad_selections_say_what_is_wrong(cifar, lenet_probs):
    probs = lenet_probs["test"]
    with pytest.raises(ValueError, match="10,000 images"):
        selection_rows(cifar, "test", [10_000], probs)
    with pytest.raises(ValueError, match=r"needs \(5000, 10\)"):
        selection_rows(cifar, "val", [0], probs)  # the test split's probabilities for the val split
    with pytest.raises(ValueError, match="one per index"):
        selection_rows(cifar, "test", [0, 1], probs, score=[1.0])


@pytest.mark.parametrize("hostile", ['=HYPERLINK("http://x","y")', "=cmd|' /C calc'!A0", "+SUM(1+1)", "-2+3",
                                     "@SUM(A1)", "\tTAB", "\rCR", "\uff1dFULLWIDTH()"])
def test_csv_never_hands_a_spreadsheet_a_formula_and_json_stays_exact(hostile):
    """A class folder or checkpoint name that a spreadsheet would run (OWASP's CSV injection) is written as text
    with a leading apostrophe, in every cell and the header; numbers (negative ones too) stay numbers; JSON keeps
    the name exactly."""
    rows = [{"index": 3, "label": hostile, "score": -0.25, "effect": "helpful"}, {"index": -1, "label": "cat"}]
    text = rows_to_csv(rows, columns=["index", "label", "score", "effect", hostile])
    back = list(csv.reader(io.StringIO(text, newline="")))
    written = "'" + hostile.replace("\r", "\n")  # a carriage return is written as a line break, quoted
    assert back[0][-1] == written  # a column name read from a file
    assert back[1] == ["3", written, "-0.25", "helpful", ""] and back[2][:2] == ["-1", "cat"]
    assert all(not cell.startswith(("=", "+", "@", "\t", "\r")) for line in back for cell in line)
    assert json.loads(rows_to_json(rows, {"checkpoint": hostile}))["images"][0]["label"] == hostile
