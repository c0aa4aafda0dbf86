"""Test metrics from predicted probabilities: loss, accuracy, per-class precision/recall/F1, confusion, calibration."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def metrics_from_probabilities(
    probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None, *,
    loss: str = "cross-entropy", label_smoothing: float = 0.0, temperature: float = 1.0,
    top_label: tuple[float, float] | None = None,
) -> dict:
    """All test metrics as JSON-ready values.

    ``loss`` is the loss the model was trained with (what Keras's ``evaluate`` reports: the compiled loss),
    by name from ``losses.LOSSES``; ``confusion_matrix[i][j]`` counts images of class i predicted as class j.
    ``probabilities`` are the model's answers, calibrated by ``temperature`` and ``top_label`` (see
    ``calibrate.calibrated_logits``); ``calibration`` holds their ECE
    (15 bins), NLL and Brier score, and the same before calibration (``*_uncalibrated``, T = 1). ``loss`` is
    of the network's own probabilities (T = 1), as in its training history, so it compares with ``val_loss``.
    """
    from .calibrate import calibration_metrics, uncalibrated_probabilities
    from .losses import loss_of_probabilities

    probabilities = np.asarray(probabilities, dtype=np.float64)
    uncalibrated = probabilities if temperature == 1.0 and top_label is None else uncalibrated_probabilities(
        probabilities, temperature, top_label)
    labels = np.asarray(labels).astype(np.int64)
    n_classes = probabilities.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    predicted = probabilities.argmax(axis=1)
    classes = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0
    )
    return {
        "n": len(labels),
        "loss": loss_of_probabilities(uncalibrated, labels, loss, label_smoothing),
        "accuracy": float((predicted == labels).mean()),
        "per_class": [
            {
                "class": i,
                "name": names[i],
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in classes
        ],
        "confusion_matrix": confusion_matrix(labels, predicted, labels=classes).tolist(),
        "calibration": calibration_metrics(probabilities, labels, temperature, top_label),
    }


def format_headline(metrics: dict) -> str:
    """Test loss and accuracy, two lines."""
    return (f"Test loss:     {metrics['loss']:.4f}\n"
            f"Test accuracy: {metrics['accuracy']:.4f}  ({metrics['accuracy'] * 100:.2f}% of {metrics['n']:,})")


def format_metrics(metrics: dict) -> str:
    """A readable report: headline numbers, the per-class table and the confusion matrix."""
    lines = [
        format_headline(metrics),
        "",
        f"{'class':<14}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
    ]
    for row in metrics["per_class"]:
        lines.append(
            f"{row['name'][:13]:<14}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}"
            f"{row['support']:>10}"
        )
    matrix = metrics["confusion_matrix"]
    width = max(5, max(len(str(v)) for r in matrix for v in r) + 1)
    lines += ["", "Confusion matrix (rows: true class, columns: predicted):"]
    lines.append(" " * 6 + "".join(f"{j:>{width}}" for j in range(len(matrix))))
    for i, row in enumerate(matrix):
        lines.append(f"{i:>5} " + "".join(f"{v:>{width}}" for v in row))
    if metrics.get("calibration"):
        from .calibrate import format_calibration

        lines += ["", "Calibration of the probabilities (lower is better):", format_calibration(metrics["calibration"])]
    return "\n".join(lines)
