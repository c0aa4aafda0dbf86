"""Figures with matplotlib: image grids, training curves, confusion matrices, reliability; each returns a Figure.

Figures are made with ``matplotlib.figure.Figure``, not pyplot: drawing or saving never switches the
user's matplotlib backend, and matplotlib is imported only when a figure is first drawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .atomic import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _new_figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``figure`` as a PNG atomically (temp file + rename)."""
    return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight"))


def image_grid(
    images: np.ndarray,
    titles: Sequence[str] | None = None,
    *,
    columns: int | None = None,
    title: str | None = None,
    mistakes: Sequence[bool] | None = None,
) -> Figure:
    """A grid of 28x28 images in grey, each with an optional title; mistakes get a red title and frame."""
    n = len(images)
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    figure = _new_figure((1.6 * columns, 1.8 * rows + (0.4 if title else 0)))
    axes = figure.subplots(rows, columns, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255 if images[i].dtype == np.uint8 else 1)
        wrong = bool(mistakes[i]) if mistakes is not None else False
        if titles is not None:
            ax.set_title(titles[i], fontsize=8, color="red" if wrong else "black")
        if wrong:
            for spine in ax.spines.values():
                spine.set_edgecolor("red")
                spine.set_linewidth(2)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def sample_grid(dataset, split: str = "train", count: int = 9, seed: int | None = None) -> Figure:
    """A labelled grid of ``count`` images of a dataset's split: the first ones, or a seeded random pick."""
    from .errors import DeepDigitsError

    images, labels = dataset.split(split)
    if not 1 <= count <= min(400, len(images)):
        raise DeepDigitsError(f"--count: expected 1-{min(400, len(images))}, got {count}")
    picked = np.arange(count) if seed is None else np.random.default_rng(seed).choice(len(images), count,
                                                                                      replace=False)
    titles = [f"#{i}: {dataset.class_names[labels[i]]}" for i in picked]
    return image_grid(images[picked], titles, title=f"{dataset.name} {split}: {count} images")


def figure_png_bytes(figure: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (for bundles and self-contained HTML)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=dpi, format="png", bbox_inches="tight")
    return buffer.getvalue()


def training_curves(history: Sequence[dict], title: str = "Training curves") -> Figure:
    """Accuracy and loss per epoch, training beside validation (as tutorials 000 and 004 drew them)."""
    if not history:
        raise ValueError("no training history to plot")
    epochs = [e["epoch"] for e in history]
    figure = _new_figure((11, 4))
    acc_ax, loss_ax = figure.subplots(1, 2)
    for ax, key, label in ((acc_ax, "accuracy", "Accuracy"), (loss_ax, "loss", "Loss")):
        ax.plot(epochs, [e[key] for e in history], "o-", label="training", color="tab:blue")
        if all(f"val_{key}" in e for e in history):
            ax.plot(epochs, [e[f"val_{key}"] for e in history], "o-", label="validation", color="tab:orange")
        ax.set_title(f"Model {label.lower()}")
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        ax.xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def predictions_grid(
    images: np.ndarray, predicted: Sequence[int], labels: Sequence[int], class_names: Sequence[str],
    columns: int | None = None,
) -> Figure:
    """Images titled "Predicted: X  Label: Y"; mistakes in red (tutorial 000's 3x3 grid)."""
    titles = [f"Predicted: {class_names[p]}\nLabel: {class_names[y]}" for p, y in zip(predicted, labels, strict=True)]
    mistakes = [p != y for p, y in zip(predicted, labels, strict=True)]
    wrong = sum(mistakes)
    return image_grid(images, titles, columns=columns, mistakes=mistakes,
                      title=f"Predictions: {len(images) - wrong} of {len(images)} right")


def confusion_matrix_figure(matrix: Sequence[Sequence[int]], class_names: Sequence[str]) -> Figure:
    """Heat-map of the confusion matrix with counts, beside each class's accuracy (recall)."""
    matrix = np.asarray(matrix)
    n = len(class_names)
    figure = _new_figure((13, 5.5))
    heat_ax, bar_ax = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    shown = np.log1p(matrix)  # log colour scale: the diagonal would otherwise hide every mistake
    heat_ax.imshow(shown, cmap="Blues")
    threshold = shown.max() / 2
    for i in range(n):
        for j in range(n):
            heat_ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                         color="white" if shown[i, j] > threshold else "black")
    heat_ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    heat_ax.set_yticks(range(n), class_names)
    heat_ax.set_xlabel("Predicted class")
    heat_ax.set_ylabel("True class")
    heat_ax.set_title(f"Confusion matrix ({matrix.sum():,} test images)")
    per_class = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
    bar_ax.barh(range(n), per_class * 100, color="tab:blue")
    bar_ax.set_yticks(range(n), class_names)
    bar_ax.invert_yaxis()
    low = max(0.0, float(per_class.min()) * 100 - 5)
    bar_ax.set_xlim(low, 100)
    for i, value in enumerate(per_class):
        bar_ax.text(value * 100, i, f" {value * 100:.1f}%", va="center", fontsize=8)
    bar_ax.set_xlabel("Accuracy on the class (%)")
    bar_ax.set_title("Per-class accuracy")
    figure.tight_layout()
    return figure


def most_confident_mistakes(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str], count: int = 16
) -> Figure:
    """The test images the model got wrong with the highest confidence, with label, prediction, probability."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    order = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:count]
    if len(order) == 0:
        figure = _new_figure((5, 1.5))
        ax = figure.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "No mistakes on these images", ha="center", va="center")
        return figure
    titles = [
        f"#{i} label {class_names[labels[i]]}\npred {class_names[predicted[i]]} ({probabilities[i, predicted[i]]:.0%})"
        for i in order
    ]
    return image_grid(images[order], titles, mistakes=[True] * len(order),
                      title=f"Most confident mistakes ({len(order)} of {len(wrong)} mistakes)")


def evidence_maps(maps: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """One 28x28 map per class in a diverging colour map: red for evidence for, blue against."""
    columns = 5
    rows = math.ceil(len(maps) / columns)
    figure = _new_figure((2.2 * columns, 2.4 * rows + 0.6))
    axes = figure.subplots(rows, columns, squeeze=False)
    limit = float(np.abs(maps).max()) or 1.0
    image = None
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(maps):
            ax.axis("off")
            continue
        image = ax.imshow(maps[i].reshape(28, 28), cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(class_names[i], fontsize=9)
    if image is not None:
        colorbar = figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
        colorbar.set_label("evidence: against (blue) / for (red)")
    figure.suptitle(title)
    return figure


def saliency_figure(image: np.ndarray, saliency: np.ndarray, label: str, predicted: str, probability: float) -> Figure:
    """The input beside the gradient of the predicted class's score with respect to each pixel."""
    figure = _new_figure((7, 3.6))
    img_ax, sal_ax = figure.subplots(1, 2)
    img_ax.imshow(image, cmap="gray")
    img_ax.set_title(f"Input (label {label})")
    limit = float(np.abs(saliency).max()) or 1.0
    shown = sal_ax.imshow(saliency, cmap="RdBu_r", vmin=-limit, vmax=limit)
    sal_ax.set_title(f"Saliency for '{predicted}' ({probability:.1%})")
    for ax in (img_ax, sal_ax):
        ax.set_xticks([])
        ax.set_yticks([])
    figure.colorbar(shown, ax=sal_ax, shrink=0.8).set_label("d score / d pixel")
    figure.tight_layout()
    return figure


def probability_bars(image: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str],
                     label: str | None = None) -> Figure:
    """One image beside the model's 10 class probabilities."""
    figure = _new_figure((9, 3.6))
    img_ax, bar_ax = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2]})
    img_ax.imshow(image, cmap="gray")
    img_ax.set_xticks([])
    img_ax.set_yticks([])
    img_ax.set_title("Input" + (f" (label {label})" if label is not None else ""))
    best = int(np.argmax(probabilities))
    colours = ["tab:orange" if i == best else "tab:blue" for i in range(len(probabilities))]
    bar_ax.bar(range(len(probabilities)), probabilities, color=colours)
    bar_ax.set_xticks(range(len(probabilities)), class_names, rotation=45 if max(map(len, class_names)) > 2 else 0,
                      ha="right" if max(map(len, class_names)) > 2 else "center")
    bar_ax.set_ylim(0, 1)
    bar_ax.set_xlabel("Class")
    bar_ax.set_ylabel("Probability")
    bar_ax.set_title(f"Predicted: {class_names[best]} ({probabilities[best]:.1%})")
    figure.tight_layout()
    return figure


def crossval_curves(folds: Sequence[dict]) -> Figure:
    """Every fold's training and validation loss and accuracy in one figure (tutorial 004's plot)."""
    figure = _new_figure((8, 7))
    loss_ax, acc_ax = figure.subplots(2, 1, sharex=True)
    for i, fold in enumerate(folds):
        history = fold["history"]
        epochs = [e["epoch"] for e in history]
        for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            ax.plot(epochs, [e[key] for e in history], color="tab:blue", alpha=0.8,
                    label="training" if i == 0 else None)
            ax.plot(epochs, [e[f"val_{key}"] for e in history], color="tab:orange", alpha=0.8,
                    label="validation (held-out fold)" if i == 0 else None)
    loss_ax.set_title(f"Cross-entropy loss, {len(folds)} folds")
    loss_ax.set_ylabel("Loss")
    acc_ax.set_title(f"Classification accuracy, {len(folds)} folds")
    acc_ax.set_ylabel("Accuracy")
    acc_ax.set_xlabel("Epoch")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    acc_ax.xaxis.get_major_locator().set_params(integer=True)
    figure.tight_layout()
    return figure


def crossval_scores(scores: Sequence[float]) -> Figure:
    """A box plot of the fold accuracies, each fold marked."""
    scores_pct = np.asarray(scores) * 100
    figure = _new_figure((5, 4.5))
    ax = figure.subplots()
    ax.boxplot(scores_pct)
    ax.scatter(np.ones(len(scores_pct)), scores_pct, color="tab:orange", zorder=3, label="folds")
    ax.set_xticks([1], [f"{len(scores_pct)} folds"])
    ax.set_ylabel("Validation accuracy (%)")
    ax.set_title(f"k-fold accuracy: mean {scores_pct.mean():.2f}%, std {scores_pct.std():.2f}")
    ax.legend(loc="best")
    ax.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return figure


def reliability_diagram(probabilities: np.ndarray, labels: np.ndarray, temperature: float = 1.0,
                        title: str = "Reliability", top_label: tuple[float, float] | None = None) -> Figure:
    """Accuracy against confidence in 15 equal-width bins, before calibration (T = 1) and after (T).

    ``probabilities`` are the calibrated ones (``predict_proba``). A black line marks each bin's accuracy,
    the shaded part is the gap to its mean confidence (red: over-confident, orange: under-confident); the
    panels below count the images in each bin (log scale).
    """
    from .calibrate import N_BINS, calibration_metrics, calibration_name, reliability_bins, uncalibrated_probabilities

    probabilities = np.asarray(probabilities, dtype=np.float64)
    scores = calibration_metrics(probabilities, labels, temperature, top_label)
    before = probabilities if temperature == 1.0 and top_label is None else uncalibrated_probabilities(
        probabilities, temperature, top_label)
    figure = _new_figure((11, 6.6))
    axes = figure.subplots(2, 2, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    panels = ((before, "Before calibration (T = 1)", "_uncalibrated"),
              (probabilities, f"After: {calibration_name(scores)}", ""))
    width = 1.0 / N_BINS
    for column, (p, heading, suffix) in enumerate(panels):
        bins = reliability_bins(p, labels)
        left = bins["edges"][:-1]
        filled = bins["counts"] > 0
        accuracy = np.where(filled, bins["accuracy"], 0.0)
        confidence = np.where(filled, bins["confidence"], 0.0)
        low = np.minimum(accuracy, confidence)
        ax, count_ax = axes[0, column], axes[1, column]
        ax.bar(left, low, width=width, align="edge", color="tab:blue", alpha=0.8, edgecolor="white")
        for mask, colour in ((confidence > accuracy, "tab:red"), (confidence < accuracy, "tab:orange")):
            mask = mask & filled
            ax.bar(left[mask], np.abs(confidence - accuracy)[mask], bottom=low[mask], width=width, align="edge",
                   color=colour, alpha=0.35, hatch="//", edgecolor=colour)
        ax.hlines(accuracy[filled], left[filled], left[filled] + width, color="black", linewidth=1.5)
        ax.plot([0, 1], [0, 1], "--", color="grey")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("Accuracy")
        ax.set_title(f"{heading}\nECE {scores['ece' + suffix] * 100:.2f}%, NLL {scores['nll' + suffix]:.4f}, "
                     f"Brier {scores['brier' + suffix]:.4f}", fontsize=10)
        ax.grid(alpha=0.3)
        count_ax.bar(left, bins["counts"], width=width, align="edge", color="tab:grey", edgecolor="white")
        count_ax.set_yscale("symlog", linthresh=1)
        count_ax.set_ylim(0, max(10.0, float(bins["counts"].max()) * 8))
        for x, n in zip(left[filled], bins["counts"][filled], strict=True):
            count_ax.text(x + width / 2, n, f"{n:,}", ha="center", va="bottom", fontsize=6.5)
        count_ax.set_xlabel("Confidence (probability of the predicted class)")
        count_ax.set_ylabel("Images")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color="black", linewidth=1.5, label="accuracy of the bin"),
               Line2D([], [], color="grey", linestyle="--", label="perfect calibration"),
               Patch(facecolor="tab:red", alpha=0.35, hatch="//", edgecolor="tab:red",
                     label="gap: over-confident (confidence above accuracy)"),
               Patch(facecolor="tab:orange", alpha=0.35, hatch="//", edgecolor="tab:orange",
                     label="gap: under-confident")]
    figure.suptitle(f"{title}: {len(probabilities):,} images, {N_BINS} bins")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8.5, frameon=False)
    return figure


FIGURE_KINDS = {
    "curves": "training and validation accuracy and loss per epoch (from the bundle's history)",
    "predictions": "a grid of test images titled 'Predicted: X  Label: Y', mistakes in red",
    "confusion": "confusion matrix heat-map with counts, and per-class accuracy",
    "mistakes": "the test images the model got wrong with the highest confidence",
    "evidence": "per-class 28x28 evidence maps (networks whose first layer is dense)",
    "saliency": "gradient of the predicted class's score with respect to one test image",
    "probabilities": "one test image beside its 10 class probabilities",
    "calibration": "reliability diagram: accuracy against confidence per bin, before and after the temperature",
}


def make_figure(kind: str, classifier, dataset=None, index: int = 0, count: int = 16,
                probabilities: np.ndarray | None = None) -> Figure:
    """Draw figure ``kind`` (see ``FIGURE_KINDS``) for a classifier and its test set."""
    from .errors import DeepDigitsError
    from .explain import dense_evidence_maps, saliency_map

    names = classifier.class_names
    if kind not in FIGURE_KINDS:
        raise DeepDigitsError(f"unknown figure {kind!r}; expected one of: {', '.join(FIGURE_KINDS)}")
    if kind == "curves":
        if not classifier.history:
            raise DeepDigitsError("this model has no training history to plot")
        return training_curves(classifier.history, f"{classifier.architecture}: training curves")
    if kind == "evidence":
        maps = dense_evidence_maps(classifier.network)
        return evidence_maps(maps, names, f"{classifier.architecture}: what each pixel says for each class")
    images, labels = dataset.x_test, dataset.y_test
    if kind in ("saliency", "probabilities") and not 0 <= index < len(images):
        raise DeepDigitsError(f"--index: expected 0-{len(images) - 1}, got {index}")
    if kind == "saliency":
        gradient, cls, _ = saliency_map(classifier.network, classifier._tensor(images[index]))
        probability = float(classifier.predict_proba(images[index : index + 1])[0, cls])  # calibrated, as answered
        return saliency_figure(images[index], gradient, names[labels[index]], names[cls], probability)
    if probabilities is None:
        probabilities = classifier.predict_proba(images)
    predicted = probabilities.argmax(axis=1)
    if kind == "probabilities":
        return probability_bars(images[index], probabilities[index], names, names[labels[index]])
    if kind == "calibration":
        return reliability_diagram(probabilities, labels, getattr(classifier, "temperature", 1.0),
                                   f"{classifier.architecture} on the {getattr(dataset, 'name', '')} test set",
                                   getattr(classifier, "top_label", None))
    if kind == "predictions":
        chosen = slice(index, index + count)
        return predictions_grid(images[chosen], predicted[chosen], labels[chosen], names)
    if kind == "mistakes":
        return most_confident_mistakes(images, labels, probabilities, names, count)
    from sklearn.metrics import confusion_matrix

    return confusion_matrix_figure(confusion_matrix(labels, predicted, labels=range(len(names))), names)


def bundle_figures(classifier) -> dict[str, bytes]:
    """The PNGs a trained bundle carries beside its weights: training curves and the test confusion matrix."""
    figures: dict[str, bytes] = {}
    if classifier.history:
        figures["curves.png"] = figure_png_bytes(training_curves(classifier.history, classifier.architecture))
    if classifier.metrics:
        matrix = classifier.metrics["confusion_matrix"]
        figures["confusion.png"] = figure_png_bytes(confusion_matrix_figure(matrix, classifier.class_names))
    return figures
