"""The Predictions page (every prediction in one table) and tags, on the real development data and the shipped
fastnet (trained with label smoothing 0.2: its training loss is not the loss the table shows)."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import visible
from streamlit.testing.v1 import AppTest
from test_app import REPO, SHIPPED, run_until, texts

from cifarviz.analysis.explore import ImageRef, confusion_cell_indices
from cifarviz.analysis.predictions import by_class, prediction_table, select
from cifarviz.core.checkpoint import load_checkpoint
from cifarviz.services.tags import MISLABELLED, TagBook, TagError, relabel_rows
from cifarviz.store.artifacts import split_artifacts

ME, YOU = "a" * 20, "b" * 20  # viewer ids as identity.owner_id makes them


@pytest.fixture(scope="module")
def fastnet_test(cifar):
    return split_artifacts(load_checkpoint(SHIPPED / "fastnet.safetensors"), cifar, "test")


def test_the_table_shows_the_plain_loss_and_margin_not_the_training_loss(cifar, fastnet_test):
    a = fastnet_test
    frame = prediction_table(a.logits, a.probs, a.labels, cifar.classes)
    assert len(frame) == len(a.labels) and (frame["index"] == np.arange(len(a.labels))).all()
    plain = -np.log(a.probs[np.arange(len(a.labels)), a.labels])
    np.testing.assert_allclose(frame["loss"], plain, rtol=1e-5)
    smoothed = F.cross_entropy(torch.from_numpy(np.log(a.probs)), torch.from_numpy(a.labels), label_smoothing=0.2,
                               reduction="none").numpy()
    assert np.abs(smoothed - plain).mean() > 0.1  # what fastnet trained on is another number: not shown
    # the margin is negative exactly on the mistakes (flip-averaged logits and probabilities agree on the argmax)
    assert ((frame["margin"] < 0) == ~frame["correct"]).mean() > 0.999
    assert (frame["correct"] == (a.predicted == a.labels)).all()
    np.testing.assert_allclose(frame["confidence"], a.probs.max(1), rtol=1e-6)


def test_filters_sorts_and_groups(cifar, fastnet_test):
    a = fastnet_test
    frame = prediction_table(a.logits, a.probs, a.labels, cifar.classes)
    cell = select(frame, labels=["cat"], predictions=["dog"], outcome="wrong")
    assert set(cell["index"]) == set(confusion_cell_indices(a.labels, a.predicted, 3, 5).tolist())
    assert (np.diff(cell["loss"].to_numpy()) <= 0).all()  # loss, highest first
    sure_and_wrong = select(frame, outcome="wrong", confidence=(0.9, 1.0), sort="confidence")
    assert (sure_and_wrong["confidence"] >= 0.9).all() and not sure_and_wrong["correct"].any()
    assert (np.diff(sure_and_wrong["confidence"].to_numpy()) <= 0).all()
    right = select(frame, outcome="right")
    assert len(right) + len(select(frame, outcome="wrong")) == len(frame)
    groups = by_class(frame).set_index("true class")
    assert groups.loc["cat", "images"] == (a.labels == 3).sum()
    assert groups.loc["cat", "accuracy"] == pytest.approx(100 * (a.predicted[a.labels == 3] == 3).mean())
    with pytest.raises(ValueError, match="outcome"):
        select(frame, outcome="maybe")


def predictions_page(cifar, **params) -> AppTest:
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = str(cifar.root)
    at.run()
    at.switch_page("pages/predictions.py").run()
    if params:  # then the address changes, as when a link is opened on this page
        at.query_params.clear()
        at.query_params.update(params)
        at.run()
    run_until(at, lambda at: len(at.progress) == 0 and len(at.dataframe) > 0, "the predictions table")
    return at


@pytest.mark.slow
def test_the_page_opens_a_linked_filter_and_a_row_opens_the_inspector(cifar, fastnet_test):
    """A link with the filters (cat taken for dog, most confident first) opens that table; the first row is the
    cell's most confident image; choosing a row opens it in the inspector; the link keeps the filters."""
    a = fastnet_test
    at = predictions_page(cifar, checkpoint="fastnet", true="cat", predicted="dog", sort="confidence")
    cell = confusion_cell_indices(a.labels, a.predicted, 3, 5)
    assert f"**{len(cell):,}** of 10,000 images match: 0 right, {len(cell):,} wrong." in texts(at)
    table = at.dataframe[0].value
    assert set(table["index"]) <= set(cell.tolist()) and len(table) == min(len(cell), 100)
    assert int(table["index"].iloc[0]) == int(cell[np.argmax(a.probs[cell].max(1))])
    assert str(table["image"].iloc[0]).startswith("data:image/png;base64,")  # a thumbnail in every row
    first = int(table["index"].iloc[0])
    key = at.dataframe[0].key
    at.session_state[key] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert f"Test image #{first}" in texts(at) and "**True label:** cat" in texts(at)
    link = dict(at.query_params)
    assert link["true"] == "cat" and link["predicted"] == "dog" and link["sort"] == "confidence"
    at.toggle(key="pred_group").set_value(True).run()
    assert at.dataframe[0].value.set_index("true class").loc["cat", "images"] == len(cell)


def test_tags_persist_per_viewer_and_the_teacher_sees_everyones(tmp_path, cifar):
    book = TagBook(tmp_path)
    data = cifar.fingerprint
    assert book.set_tags(data, ME, ImageRef("train", 7), [" mislabelled? ", "odd  one"]) == ["mislabelled?", "odd one"]
    book.add(data, YOU, [ImageRef("train", 7), ImageRef("test", 3)], MISLABELLED)
    assert TagBook(tmp_path).of_viewer(data, ME) == {ImageRef("train", 7): ["mislabelled?", "odd one"]}  # persisted
    assert TagBook(tmp_path).of_viewer(data, YOU).keys() == {ImageRef("train", 7), ImageRef("test", 3)}
    everyone = book.everyone(data)
    assert everyone[ImageRef("train", 7)] == Counter({MISLABELLED: 2, "odd one": 1})
    assert book.of_viewer("another dataset", ME) == {}  # tags belong to the data they were given on
    rows = relabel_rows(cifar, everyone)
    assert rows[0]["index"] == 7 and rows[0]["split"] == "train" and rows[0]["mislabelled_votes"] == 2
    assert rows[0]["label"] == cifar.classes[cifar.train.labels[7]] and "mislabelled? (2)" in rows[0]["tags"]
    book.set_tags(data, ME, ImageRef("train", 7), [])
    assert book.of_viewer(data, ME) == {}

    for bad in ("", "   ", "<script>", "x" * 33, "_hidden", "a/b"):
        with pytest.raises(TagError):
            book.set_tags(data, ME, ImageRef("test", 1), [bad])
    with pytest.raises(TagError, match="Only dataset images"):
        book.set_tags(data, ME, ImageRef("upload", 0), ["x"])
    with pytest.raises(TagError, match="viewer"):
        book.set_tags(data, "../../etc", ImageRef("test", 1), ["x"])
    assert book.of_viewer(data, ME) == {}  # nothing half-written


def test_a_damaged_tag_file_loses_its_bad_entries_not_the_server(tmp_path, cifar):
    (tmp_path / "tags.json").write_text(json.dumps({"schema": 1, "datasets": {cifar.fingerprint: {
        ME: {"train-1": ["fine", "<b>bad</b>", 3], "train-x": ["no"], "test-2": "not a list"},
        "not a viewer": {"train-3": ["ok"]}}}}))
    book = TagBook(tmp_path)
    assert book.of_viewer(cifar.fingerprint, ME) == {ImageRef("train", 1): ["fine"]}
    (tmp_path / "tags.json").write_text("{" * 100_000)
    assert TagBook(tmp_path).of_viewer(cifar.fingerprint, ME) == {}
    TagBook(tmp_path).set_tags(cifar.fingerprint, ME, ImageRef("test", 4), ["kept"])  # and tagging still works
    assert TagBook(tmp_path).of_viewer(cifar.fingerprint, ME) == {ImageRef("test", 4): ["kept"]}


@pytest.mark.slow
def test_a_tag_from_the_inspector_is_a_badge_on_every_grid_and_in_the_relabel_list(cifar, fastnet_test, runs_root,
                                                                                  monkeypatch):
    """A viewer tags a test image in the inspector; the tile shows the badge on the Evaluate page (another page),
    in the viewer's next session, and the Predictions page's "Tagged only" lists it; another viewer sees no badge,
    the teacher sees it with a count."""
    monkeypatch.setenv("CIFARVIZ_TEACHER_KEY", "correct horse battery")
    a = fastnet_test
    wrong = int(np.argsort(-a.probs.max(1) * (a.predicted != a.labels))[0])  # Evaluate's first mistake tile
    at = predictions_page(cifar, checkpoint="fastnet")
    token = at.session_state["_viewer_token"]
    at.session_state["inspect"] = ImageRef("test", wrong)
    at.run()
    at.multiselect(key=f"tags-test-{wrong}").set_value([MISLABELLED, "blurry"]).run()
    assert not at.exception

    def tile(at) -> str:
        return visible(next(b.label for b in at.button if b.key == f"mistakes-test-{wrong}"))

    again = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    again.session_state["_data_root"] = str(cifar.root)
    again.session_state["_viewer_token"] = token  # the same browser (its cookie), a new session
    again.run()
    again.switch_page("pages/evaluate.py").run()
    run_until(again, lambda at: len(at.progress) == 0 and len(at.metric) > 0, "Evaluate")
    assert tile(again).endswith(f"🏷 {MISLABELLED} +1")
    again.switch_page("pages/predictions.py").run()
    again.toggle(key="pred_tagged").set_value(True).run()
    assert again.dataframe[0].value["index"].tolist() == [wrong]
    assert again.dataframe[0].value["tags"].tolist() == ["blurry, mislabelled?"]

    other = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    other.session_state["_data_root"] = str(cifar.root)
    other.run()
    other.switch_page("pages/evaluate.py").run()
    run_until(other, lambda at: len(at.progress) == 0 and len(at.metric) > 0, "Evaluate")
    assert "🏷" not in tile(other)  # another viewer's tags are theirs
    other.session_state["_teacher_key_ok"] = "correct horse battery"
    other.run()
    assert tile(other).endswith(f"🏷 {MISLABELLED} +1")
    assert Path(runs_root / "tags.json").exists()


@pytest.mark.slow
def test_the_cli_exports_the_predictions_table_and_the_relabel_list(cifar, fastnet_test, runs_root, capsys):
    """`python -m cifarviz export --what predictions` writes the page's table (filtered and sorted as there);
    `--what relabel` every viewer's tagged images, most "mislabelled?" votes first."""
    from cifarviz.cli import main

    a = fastnet_test
    argv = ["export", "-c", "fastnet", "--data", str(cifar.root), "--what", "predictions", "--true", "cat",
            "--pred", "dog", "--sort", "confidence", "--format", "json"]
    assert main(argv) == 0
    written = json.loads(capsys.readouterr().out)
    rows, about = written["images"], written["about"]
    cell = confusion_cell_indices(a.labels, a.predicted, 3, 5)
    assert [r["index"] for r in rows] == sorted(cell.tolist(), key=lambda i: (-a.probs[i].max(), i))
    assert all(r["label"] == "cat" and r["prediction"] == "dog" and not r["correct"] for r in rows)
    assert rows[0]["loss"] == pytest.approx(-np.log(a.probs[rows[0]["index"], 3]), rel=1e-5)
    assert "calibrated" in rows[0] and about["temperature"] == pytest.approx(0.5, abs=0.02)
    assert main(["export", "-c", "fastnet", "--data", str(cifar.root), "--what", "predictions", "--test-index",
                 "3"]) == 2 and "--test-index is for --what influence" in capsys.readouterr().err

    book = TagBook(runs_root)
    book.add(cifar.fingerprint, ME, [ImageRef("train", 11), ImageRef("test", 5)], MISLABELLED)
    book.add(cifar.fingerprint, YOU, [ImageRef("train", 11)], MISLABELLED)
    assert main(["export", "-c", "fastnet", "--data", str(cifar.root), "--what", "relabel"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "split,index,source_index,label,prediction,tags,mislabelled_votes"
    assert lines[1].startswith("train,11,") and lines[1].endswith(",mislabelled? (2),2") and len(lines) == 3
