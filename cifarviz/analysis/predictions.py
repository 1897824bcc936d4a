"""Every prediction of a split as one table (the Predictions page, W&B-table style), and the filters the page
offers. Definitions (test side: whatever the model was trained with, label smoothing included, plays no part):

* confidence: the predicted class's probability, as every page shows it (flip-averaged when the checkpoint's
  predictions use test-time augmentation);
* loss: the plain cross-entropy of the true class, -log p(true), in nats;
* margin: logit(true) - the largest other logit (negative exactly when the image is misclassified; the quantity
  TRAK and datamodels measure);
* calibrated: the predicted class's probability after temperature scaling (T fitted on the validation split),
  present once the calibration is ready.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cifarviz.analysis.calibration import scaled_probabilities

OUTCOMES = ("all", "right", "wrong")
SORTS = {"loss": "loss", "confidence": "confidence", "margin": "margin", "index": "index"}


def prediction_table(logits: np.ndarray, probs: np.ndarray, labels: np.ndarray, classes,
                     temperature: float | None = None) -> pd.DataFrame:
    """One row per image of the split, in index order."""
    logits, probs = np.asarray(logits, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.arange(len(labels))
    predicted = probs.argmax(1)
    others = logits.copy()
    others[rows, labels] = -np.inf
    frame = pd.DataFrame({
        "index": rows,
        "label": pd.Categorical.from_codes(labels, categories=list(classes)),
        "prediction": pd.Categorical.from_codes(predicted, categories=list(classes)),
        "correct": predicted == labels,
        "confidence": probs[rows, predicted],
        "loss": -np.log(np.clip(probs[rows, labels], 1e-12, None)),
        "margin": logits[rows, labels] - others.max(1),
    })
    if temperature is not None:
        frame["calibrated"] = scaled_probabilities(probs, temperature)[rows, predicted]
    return frame


def select(frame: pd.DataFrame, *, labels=None, predictions=None, outcome: str = "all",
           confidence: tuple[float, float] = (0.0, 1.0), loss: tuple[float, float] | None = None,
           indices=None, sort: str = "loss", descending: bool = True) -> pd.DataFrame:
    """The rows that pass every filter, sorted (ties by index). Empty `labels` / `predictions`: every class.
    `indices`: keep only these images (a tag's images, say)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome {outcome!r}: use one of {OUTCOMES}.")
    if sort not in SORTS:
        raise ValueError(f"sort {sort!r}: use one of {sorted(SORTS)}.")
    keep = np.ones(len(frame), dtype=bool)
    if labels:
        keep &= frame["label"].isin(list(labels)).to_numpy()
    if predictions:
        keep &= frame["prediction"].isin(list(predictions)).to_numpy()
    if outcome != "all":
        keep &= frame["correct"].to_numpy() == (outcome == "right")
    keep &= frame["confidence"].between(*confidence).to_numpy()
    if loss is not None:
        keep &= frame["loss"].between(*loss).to_numpy()
    if indices is not None:
        keep &= frame["index"].isin(np.asarray(list(indices), dtype=np.int64)).to_numpy()
    chosen = frame[keep]
    return chosen.sort_values([SORTS[sort], "index"], ascending=[not descending, True], kind="stable")


def by_class(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows grouped by true class: how many, how many right, mean confidence and loss."""
    grouped = frame.groupby("label", observed=False)
    return pd.DataFrame({
        "images": grouped.size(),
        "accuracy": grouped["correct"].mean() * 100,
        "mean confidence": grouped["confidence"].mean() * 100,
        "mean loss": grouped["loss"].mean(),
    }).reset_index().rename(columns={"label": "true class"}).dropna(subset=["accuracy"])


def prediction_rows(rows: pd.DataFrame, dataset, split: str) -> list[dict]:
    """The rows as the exports write them (the page's CSV/JSON and `python -m cifarviz export --what
    predictions`): image number and its place in the source, labels, right or wrong, and the figures above."""
    part = dataset.split(split)
    out = []
    for row in rows.itertuples(index=False):
        record = {"index": int(row.index), "source_index": int(part.source_index[row.index]), "split": split,
                  "label": str(row.label), "prediction": str(row.prediction), "correct": bool(row.correct),
                  "confidence": float(row.confidence), "loss": float(row.loss), "margin": float(row.margin)}
        if hasattr(row, "calibrated"):
            record["calibrated"] = float(row.calibrated)
        out.append(record)
    return out
