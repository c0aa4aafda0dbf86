"""Test metrics from probabilities: exact counts, per-class scores, the recipe's loss, the printed report."""

import numpy as np
import pytest

from deepdigits.evaluate import format_headline, format_metrics, metrics_from_probabilities


def test_confusion_numbers(small_model, mnist):
    probabilities = small_model.predict_proba(mnist.x_test[:1000])
    metrics = metrics_from_probabilities(probabilities, mnist.y_test[:1000])
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.sum() == 1000
    assert matrix.trace() / 1000 == pytest.approx(metrics["accuracy"])
    for row in metrics["per_class"]:
        i = row["class"]
        assert row["recall"] == pytest.approx(matrix[i, i] / matrix[i].sum())
        assert row["precision"] == pytest.approx(matrix[i, i] / matrix[:, i].sum())
        assert row["support"] == matrix[i].sum()


def test_metrics_on_a_hand_made_case():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    labels = np.array([0, 1, 1, 2])
    metrics = metrics_from_probabilities(probabilities, labels, ["a", "b", "c"])
    assert metrics["n"] == 4 and metrics["accuracy"] == 0.75
    assert metrics["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert metrics["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.8, 0.3, 0.6])))
    b = metrics["per_class"][1]
    assert (b["name"], b["precision"], b["recall"], b["support"]) == ("b", 1.0, 0.5, 2)
    # the loss a recipe trains with: Keras 2's clipped loss caps a sure mistake at -log(1e-7)
    sure_mistake = np.array([[1.0, 0.0, 0.0]])
    clipped = metrics_from_probabilities(sure_mistake, np.array([1]), loss="keras2-clipped-cross-entropy")
    assert clipped["loss"] == pytest.approx(-np.log(1e-7), rel=1e-3)
    smoothed = metrics_from_probabilities(probabilities, labels, label_smoothing=0.1)["loss"]
    assert smoothed > metrics["loss"]  # label smoothing also charges the other classes


def test_report_text():
    metrics = metrics_from_probabilities(np.eye(3)[[0, 1, 2, 2]] * 0.9 + 0.1 / 3, np.array([0, 1, 2, 1]))
    assert format_headline(metrics).splitlines() == ["Test loss:     " + f"{metrics['loss']:.4f}",
                                                     "Test accuracy: 0.7500  (75.00% of 4)"]
    text = format_metrics(metrics)
    assert text.startswith(format_headline(metrics)) and "Confusion matrix (rows: true class" in text
