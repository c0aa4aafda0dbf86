"""Test metrics from predicted probabilities: loss, accuracy, per-class precision/recall/F1, confusion."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def metrics_from_probabilities(
    probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None
) -> dict:
    """All test metrics as JSON-ready values.

    ``loss`` is the mean categorical cross-entropy (what Keras's ``evaluate`` reports);
    ``confusion_matrix[i][j]`` counts images of class i predicted as class j.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    n_classes = probabilities.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    predicted = probabilities.argmax(axis=1)
    picked = probabilities[np.arange(len(labels)), labels]
    loss = float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())
    classes = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0
    )
    return {
        "n": len(labels),
        "loss": loss,
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
    }


def format_metrics(metrics: dict) -> str:
    """A readable report: headline numbers, the per-class table and the confusion matrix."""
    lines = [
        f"Test loss:     {metrics['loss']:.4f}",
        f"Test accuracy: {metrics['accuracy']:.4f}  ({metrics['accuracy'] * 100:.2f}% of {metrics['n']:,})",
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
    return "\n".join(lines)


def dense_evidence_maps(network) -> np.ndarray:
    """Per-class 28x28 evidence maps of a network whose first layer is dense: (10, 784).

    The product of the dense layers' weight matrices, W_last ... W_1, i.e. the network with its
    activations taken as linear. For a one-layer softmax model it is exactly that layer's weights;
    for tutorial 002's sigmoid network it is the linear part of how each pixel pushes each class.
    """
    import torch
    from torch import nn

    from .errors import DeepDigitsError

    layers = [m for m in network.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not layers or not isinstance(layers[0], nn.Linear) or layers[0].in_features != 784:
        raise DeepDigitsError("evidence maps need a network whose first layer is dense (784 inputs); "
                              "use a saliency map for convolutional networks")
    with torch.no_grad():
        product = layers[0].weight.detach().clone()
        for layer in layers[1:]:
            product = layer.weight.detach() @ product
    return product.numpy()


def saliency_map(network, image_tensor, target: int | None = None) -> tuple[np.ndarray, int, float]:
    """Gradient of a class score (the predicted one by default) with respect to the input pixels.

    Returns the 28x28 gradient, the class and its probability. ``image_tensor`` is (1, 1, 28, 28).
    """
    import torch

    network.eval()
    x = image_tensor.detach().clone().requires_grad_(True)
    logits = network(x)
    probabilities = torch.softmax(logits, dim=1)[0]
    cls = int(probabilities.argmax()) if target is None else int(target)
    logits[0, cls].backward()
    return x.grad[0, 0].numpy(), cls, float(probabilities[cls].detach())
