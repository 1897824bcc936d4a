import numpy as np
import pytest

from cifarviz.analysis.metrics import classification_report, most_confused_pairs, reliability


def test_report_on_a_hand_checked_example():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2])
    report = classification_report(labels, predicted, ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(4 / 6)
    a, b, c = report["per_class"]
    assert (a["precision"], a["recall"], a["support"]) == (1.0, pytest.approx(2 / 3), 3)
    assert (b["precision"], b["recall"]) == (0.5, 0.5)
    assert (c["precision"], c["recall"], c["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_most_confused_pairs_add_both_directions():
    confusion = np.array([[50, 3, 0], [9, 40, 1], [2, 2, 30]])
    top = most_confused_pairs(confusion, ["cat", "dog", "frog"], top=2)
    assert top[0]["pair"] == "cat / dog" and top[0]["count"] == 12 and top[0]["dog->cat"] == 9
    assert top[1]["count"] == 3


def test_reliability_and_ece():
    probs = np.array([[0.9, 0.1]] * 10)
    labels = np.array([0] * 9 + [1])  # 90% confident and 90% right: calibrated
    _, ece = reliability(probs, labels)
    assert ece == pytest.approx(0.0, abs=1e-9)
    _, ece_bad = reliability(probs, np.array([0] * 5 + [1] * 5))
    assert ece_bad == pytest.approx(0.4)
