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


@pytest.mark.parametrize("seed", range(5))
def test_report_matches_scikit_learn_including_a_class_never_predicted_or_never_present(seed):
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 9, 500)  # class 9 is never a label
    predicted = np.where(rng.random(500) < 0.6, labels, rng.integers(1, 10, 500))  # class 0 is predicted rarely
    predicted[predicted == 0] = 1 if seed % 2 else 0  # and, for odd seeds, never
    classes = [f"c{i}" for i in range(10)]
    report = classification_report(labels, predicted, classes)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=np.arange(10),
                                                                     zero_division=0)
    assert report["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    np.testing.assert_allclose([c["precision"] for c in report["per_class"]], precision)
    np.testing.assert_allclose([c["recall"] for c in report["per_class"]], recall)
    np.testing.assert_allclose([c["f1"] for c in report["per_class"]], f1)
    assert [c["support"] for c in report["per_class"]] == support.tolist()
    assert report["macro"]["f1"] == pytest.approx(f1.mean())
    assert report["confusion_matrix"] == confusion_matrix(labels, predicted, labels=np.arange(10)).tolist()


def test_a_samples_interval_is_wider_for_fewer_images_and_zero_for_the_whole_split():
    from cifarviz.analysis.metrics import sample_accuracy

    labels = np.zeros(10_000, int)
    predicted = (np.arange(10_000) % 10 == 0).astype(int)  # 90% right
    accuracy, half = sample_accuracy(predicted[:400], labels[:400], 10_000)
    assert accuracy == 0.9 and half == pytest.approx(1.96 * np.sqrt(0.09 / 400 * 9_600 / 9_999))
    assert sample_accuracy(predicted[:4000], labels[:4000], 10_000)[1] < half
    assert sample_accuracy(predicted, labels, 10_000) == (0.9, 0.0)


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
