"""Home's lesson path: the order a class walks through the explorer, each step a link into its page with a
sensible selection already made (the checkpoint's most confused cell, one of its confident mistakes)."""

from __future__ import annotations

import numpy as np
import streamlit as st

from cifarviz.ui.loaders import artifacts_ready, get_artifacts
from cifarviz.ui.text import md


def lesson_steps(checkpoint, dataset) -> list[dict]:
    """(title, page, what to look at, query parameters) per step. Selections come from the checkpoint's test
    predictions when they are already computed (Home never starts that work); otherwise plain defaults."""
    cell, mistake = None, None  # a fact is said only once it is computed: never a guessed "cat taken for dog"
    if checkpoint is not None and dataset is not None and artifacts_ready(checkpoint, dataset, "test"):
        arts = get_artifacts(checkpoint, dataset, "test")
        classes = list(dataset.classes)
        confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
        np.add.at(confusion, (arts.labels, arts.predicted), 1)
        np.fill_diagonal(confusion, 0)
        t, p = np.unravel_index(int(confusion.argmax()), confusion.shape)
        cell = (classes[t], classes[p])
        wrong = np.flatnonzero(arts.predicted != arts.labels)
        if len(wrong):
            mistake = int(wrong[np.argmax(arts.probs[wrong].max(1))])  # its most confident mistake
    name = st.session_state.get("_checkpoint_link")
    keep = {"checkpoint": name} if name else {}
    return [
        {"title": "1. The data", "page": "pages/dataset.py", "params": {"tab": "samples"},
         "text": "Ten classes of 32x32 photos: what they look like, and what augmentation does to one."},
        {"title": "2. Train", "page": "pages/train.py", "params": {"tab": "train"},
         "text": "Pick the LeNet recipe and press Start: loss and accuracy curves, live (about a minute)."},
        {"title": "3. Where it is wrong", "page": "pages/evaluate.py",
         "params": {**keep, "split": "test", **({"cell": f"{cell[0]},{cell[1]}"} if cell else {})},
         "text": f"The confusion matrix, open on its most confused cell: {md(cell[0])} taken for {md(cell[1])}."
                 if cell else "The confusion matrix: which classes it takes for which (its predictions are "
                              "computed when the page opens)."},
        {"title": "4. What it learned", "page": "pages/embeddings.py",
         "params": {**keep, "split": "test", "method": "tsne"},
         "text": "Its feature space as a map: images it finds alike land together."},
        {"title": "5. Why it decided", "page": "pages/influence.py",
         "params": {**keep, "tab": "one-test-image", **({"test": str(mistake)} if mistake is not None else {})},
         "text": "The training images that helped and hurt one test image"
                 + (f": #{mistake}, its most confident mistake." if mistake is not None else ".")},
    ]


def lesson_path(checkpoint, dataset) -> None:
    with st.container(horizontal=True, wrap=True, gap="small", key="lesson"):
        for step in lesson_steps(checkpoint, dataset):
            with st.container(border=True, width=230, height=170):
                st.page_link(step["page"], label=step["title"], query_params=step["params"],
                             icon=":material/arrow_forward:")
                st.caption(step["text"])
