"""Any selection of images (a confusion cell, the most confident mistakes, suspicious training images, a test
image's helpful and harmful training images) as CSV or JSON: the app's download buttons and `python -m cifarviz
export` write the same rows.

One row per image, in the selection's order:

* ``index``: the image's position in ``dataset.split(split)``, the number the app shows (``#42``) and the
  inspector opens; it depends on the split seed and validation size for ``train`` and ``val``.
* ``source_index``: the image's position in the source's own train or test part, which no split setting changes:
  the row of the CIFAR-10 python archive (``data_batch_1`` to ``_5`` in order for train and val, ``test_batch`` for
  test), or for an image-folder tree the file's place in its part sorted by class folder, then file name (its
  JPEG/PNG file order).
* ``split``: train, val or test.
* ``label``: the image's class name in the data (its true label).
* ``prediction``: the class the model predicts (the highest probability).
* ``confidence``: that probability, in [0, 1].
* ``SCORE_NAME`` (only when a score is given): the selection's own number, e.g. the influence score or the
  training loss a ranking sorts by.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence

import numpy as np

from cifarviz.core.errors import CifarvizError

COLUMNS = ("index", "source_index", "split", "label", "prediction", "confidence")  # every row's, in this order


def selection_rows(dataset, split: str, indices, probs, *, score=None, score_name: str = "score") -> list[dict]:
    """One dict per image of `indices` (positions in `dataset.split(split)`), in the given order, with the columns
    of the module docstring. `probs`: the split's predicted probabilities, (images in the split, classes);
    `score`: one number per index (the column `score_name`), or None."""
    part = dataset.split(split)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs)
    if probs.shape != (len(part), len(dataset.classes)):
        raise ValueError(f"probs has shape {probs.shape}; the {split} split needs ({len(part)}, "
                         f"{len(dataset.classes)}): one row of class probabilities per image.")
    if len(indices) and not (0 <= indices.min() and indices.max() < len(part)):
        bad = int(indices[(indices < 0) | (indices >= len(part))][0])
        raise ValueError(f"index {bad} is not in the {split} split, which has {len(part):,} images "
                         f"(0-{len(part) - 1}).")
    if score is not None:
        score = np.asarray(score, dtype=np.float64).reshape(-1)
        if len(score) != len(indices):
            raise ValueError(f"score has {len(score)} values for {len(indices)} images: give one per index.")
        if score_name in COLUMNS:
            raise ValueError(f"score_name {score_name!r} is a column already; choose another name.")
    rows = []
    for k, i in enumerate(indices.tolist()):
        p = probs[i]
        row = {"index": i, "source_index": int(part.source_index[i]), "split": split,
               "label": dataset.classes[int(part.labels[i])], "prediction": dataset.classes[int(p.argmax())],
               "confidence": float(p.max())}
        if score is not None:
            row[score_name] = float(score[k])
        rows.append(row)
    return rows


FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def _cell(value) -> str:
    """A CSV cell. repr is the shortest text that reads back as the same float (csv's str() of a numpy float may
    not be). Text that a spreadsheet would run as a formula (a class folder or checkpoint named "=HYPERLINK(...)",
    "+1", "-2+3", "@SUM", a leading tab or line break, or their full-width forms) gets a leading apostrophe, as
    OWASP's CSV-injection guidance says: shown as text, never evaluated. Numbers stay numbers; JSON stays exact."""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, str):
        # a carriage return is a line break in a cell: written as one, so the csv module quotes the cell (it quotes
        # only the characters of its own line ending, "\n"); a bare "\r" would end the row in some readers
        value = value.replace("\r\n", "\n").replace("\r", "\n")
        if value.startswith(FORMULA_START):
            return "'" + value
    return value


def rows_to_csv(rows: list[dict], *, columns: Sequence[str] | None = None) -> str:
    """A header row, then one line per row. The columns are `columns`, else every key of the rows in the order
    they first appear; an empty selection still gets its header (COLUMNS unless `columns` names others)."""
    header = list(columns) if columns is not None else list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header or list(COLUMNS), lineterminator="\n")
    writer.writerow({name: _cell(name) for name in writer.fieldnames})  # the header too: column names are text
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return out.getvalue()


def rows_to_json(rows: list[dict], about: dict) -> str:
    """``{"about": about, "images": rows}`` as strict JSON (no NaN or Infinity, which many readers reject)."""
    try:
        return json.dumps({"about": about, "images": rows}, indent=2, allow_nan=False)
    except ValueError:
        bad = next((f"{k} of image {row.get('index')}" for row in rows for k, v in row.items()
                    if isinstance(v, float) and not math.isfinite(v)), "a value of `about`")
        raise CifarvizError(f"The selection cannot be written as JSON: {bad} is not a finite number (NaN or "
                            "infinite). Write it as CSV, or recompute the model's outputs.") from None


def influence_rows(result, dataset, train_probs) -> list[dict]:
    """An influence lookup's training images (an `InfluenceResult`): the most helpful first, then the most
    harmful, each row with its `score` (the method's score, see its `score_meaning`) and `effect` (helpful or
    harmful). `train_probs`: the training split's predicted probabilities."""
    listed = [("helpful", e) for e in result.helpful] + [("harmful", e) for e in result.harmful]
    rows = selection_rows(dataset, "train", [e.train_index for _, e in listed], train_probs,
                          score=[e.score for _, e in listed], score_name="score")
    for row, (effect, _) in zip(rows, listed):
        row["effect"] = effect
    return rows
