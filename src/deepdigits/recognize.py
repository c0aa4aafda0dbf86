"""Recognise real handwriting: one digit per image, or a whole number, with the built-in model by default."""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .classifier import Classifier
from .errors import DeepDigitsError
from .preprocess import ImageError, ink_map, load_image, normalise_digit

BUILTIN_MODEL = Path(__file__).resolve().parent / "builtin"
DEFAULT_MIN_CONFIDENCE = 0.5


@functools.lru_cache(maxsize=1)
def builtin_model() -> Classifier:
    """The model shipped with the package (trained by ``deepdigits train --recipe best`` on MNIST)."""
    if not (BUILTIN_MODEL / "model.json").is_file():
        raise DeepDigitsError(f"the built-in model is missing from {BUILTIN_MODEL}; pass --model BUNDLE")
    return Classifier.load(BUILTIN_MODEL)


def resolve_model(model=None, runtime: str = "torch"):
    """A model to predict with: the built-in one (None), a loaded one, a bundle folder or an .onnx file.

    With ``runtime="onnx"`` the model runs in ONNX Runtime (a bundle is exported in memory first).
    """
    from .export import OnnxClassifier

    if runtime not in ("torch", "onnx"):
        raise DeepDigitsError(f"runtime: expected torch or onnx, got {runtime!r}")
    if model is not None and hasattr(model, "predict_proba"):
        clf = model
    elif model is not None and str(model).endswith(".onnx"):
        return OnnxClassifier(model)
    else:
        from .classifier import load

        clf = builtin_model() if model is None else load(model)
    if runtime == "onnx" and not isinstance(clf, OnnxClassifier):
        return OnnxClassifier.from_classifier(clf)
    return clf


@dataclass
class DigitPrediction:
    """One recognised digit: the answer, how sure, the top-k, and where it was (for numbers)."""

    digit: int
    confidence: float
    probabilities: list[float]
    top: list[tuple[int, float]]
    unsure: bool
    box: tuple[int, int, int, int] | None = None  # left, top, right, bottom in the input image's pixels
    class_name: str = ""

    def to_dict(self) -> dict:
        out = asdict(self)
        out["top"] = [{"digit": d, "probability": p} for d, p in self.top]
        if self.box is None:
            out.pop("box")
        return out


@dataclass
class NumberReading:
    """A handwritten number read left to right."""

    number: str
    digits: list[DigitPrediction] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)  # width, height of the input image

    @property
    def unsure(self) -> bool:
        return any(d.unsure for d in self.digits)

    def to_dict(self) -> dict:
        return {"number": self.number, "unsure": self.unsure, "digits": [d.to_dict() for d in self.digits]}


def _predictions(clf: Classifier, images: np.ndarray, top: int, min_confidence: float) -> list[DigitPrediction]:
    probabilities = clf.predict_proba(images)
    out = []
    for row in probabilities:
        order = np.argsort(-row)[: max(1, top)]
        best = int(order[0])
        out.append(DigitPrediction(
            digit=best,
            confidence=float(row[best]),
            probabilities=[round(float(p), 6) for p in row],
            top=[(int(k), round(float(row[k]), 6)) for k in order],
            unsure=bool(row[best] < min_confidence),
            class_name=clf.class_names[best],
        ))
    return out


def predict_digit(image, model=None, top: int = 3, min_confidence: float = DEFAULT_MIN_CONFIDENCE,
                  name: str | None = None) -> DigitPrediction:
    """Recognise the single digit in an image (a path, bytes, PIL image or array)."""
    from .preprocess import to_mnist

    clf = resolve_model(model)
    return _predictions(clf, to_mnist(image, name)[None], top, min_confidence)[0]


def predict_mnist_arrays(arrays: np.ndarray, model=None, top: int = 3,
                         min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> list[DigitPrediction]:
    """Recognise images that are already MNIST-style 28x28 (uint8 0-255, or floats in [0, 1]).

    ``model`` may be anything ``resolve_model`` takes, a loaded one included (then nothing is reloaded).
    """
    return _predictions(resolve_model(model), np.asarray(arrays), top, min_confidence)


# --------------------------------------------------------------------------- whole numbers


def segment_digits(ink: np.ndarray) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Split an ink map into single digits, left to right: ``[(box, ink_crop), ...]`` in ink-map pixels.

    Connected components; parts of one broken digit (overlapping columns) merged; components much wider
    than the digits' height split at the columns with least ink.
    """
    mask = ink > 0.25
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return []
    groups = [{i} for i in range(1, count + 1)]
    slices = ndimage.find_objects(labels)
    boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices]  # x0, y0, x1, y1

    merged = True
    while merged:  # merge parts whose columns overlap by half of the narrower one: one broken digit
        merged = False
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                overlap = min(boxes[a][2], boxes[b][2]) - max(boxes[a][0], boxes[b][0])
                narrower = min(boxes[a][2] - boxes[a][0], boxes[b][2] - boxes[b][0])
                if overlap > 0.5 * narrower:
                    boxes[a] = [min(boxes[a][0], boxes[b][0]), min(boxes[a][1], boxes[b][1]),
                                max(boxes[a][2], boxes[b][2]), max(boxes[a][3], boxes[b][3])]
                    groups[a] |= groups.pop(b)
                    boxes.pop(b)
                    merged = True
                    break
            if merged:
                break

    heights = [b[3] - b[1] for b in boxes]
    reference = float(np.median(heights)) if heights else 1.0
    pieces: list[tuple[tuple[int, int, int, int], np.ndarray]] = []
    for box, group in zip(boxes, groups, strict=True):
        x0, y0, x1, y1 = box
        own = np.isin(labels[y0:y1, x0:x1], list(group))
        crop = np.where(ndimage.binary_dilation(own, iterations=1), ink[y0:y1, x0:x1], 0.0)
        height = max(y1 - y0, reference)
        parts = max(1, int(np.floor((x1 - x0) / (0.7 * height) + 0.3)))
        cuts = [0]
        if parts > 1:  # touching digits: cut at the least-inked column near each expected boundary
            profile = crop.sum(axis=0)
            width = x1 - x0
            for k in range(1, parts):
                expected = int(k * width / parts)
                reach = max(1, int(0.3 * width / parts))
                lo, hi = max(cuts[-1] + 1, expected - reach), min(width - 1, expected + reach)
                if lo < hi:
                    cuts.append(lo + int(np.argmin(profile[lo:hi])))
        cuts.append(x1 - x0)
        for left, right in itertools.pairwise(cuts):
            part = crop[:, left:right]
            rows = np.nonzero(part.max(axis=1) > 0.05)[0]
            if part.size == 0 or len(rows) == 0:
                continue
            top, bottom = int(rows.min()), int(rows.max()) + 1
            pieces.append(((x0 + left, y0 + top, x0 + right, y0 + bottom), part[top:bottom]))
    pieces.sort(key=lambda p: (p[0][0] + p[0][2]) / 2)
    return pieces


@dataclass
class FoundDigits:
    """The digits cut out of one image of a number, ready for a model: no model is needed to find them."""

    crops: np.ndarray  # (n, 28, 28) MNIST-style digits, left to right
    boxes: list[tuple[int, int, int, int]]  # left, top, right, bottom in the input image's pixels
    size: tuple[int, int]  # width, height of the input image


def find_digits(image, name: str | None = None) -> FoundDigits:
    """Cut a handwritten number into MNIST-style digits, left to right; a blank image is an ImageError."""
    grey = load_image(image, name)
    ink = ink_map(grey)
    pieces = segment_digits(ink)
    label = name or (str(image) if isinstance(image, str | os.PathLike) else "image")
    if not pieces:
        raise ImageError(f"{label}: no ink found: the image looks blank")
    scale = max(grey.shape) / max(ink.shape)
    boxes = [tuple(round(v * scale) for v in box) for box, _ in pieces]
    return FoundDigits(np.stack([normalise_digit(crop) for _, crop in pieces]), boxes,  # type: ignore[arg-type]
                       (grey.shape[1], grey.shape[0]))


def read_digits(found: FoundDigits, model=None, min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> NumberReading:
    """Recognise the digits :func:`find_digits` cut out, as one number."""
    clf = resolve_model(model)
    digits = _predictions(clf, found.crops, 3, min_confidence)
    for prediction, box in zip(digits, found.boxes, strict=True):
        prediction.box = box
    return NumberReading("".join(clf.class_names[d.digit] for d in digits), digits, found.size)


def read_number(image, model=None, min_confidence: float = DEFAULT_MIN_CONFIDENCE,
                name: str | None = None) -> NumberReading:
    """Read a handwritten number (digits side by side) from an image, left to right."""
    return read_digits(find_digits(image, name), model, min_confidence)


def draw_boxes(image, reading: NumberReading, name: str | None = None) -> Image.Image:
    """The input image with each digit's box and answer drawn on it (red where unsure)."""
    grey = load_image(image, name)
    canvas = Image.fromarray((grey * 255).astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 300))
    for d in reading.digits:
        if d.box is None:
            continue
        colour = (220, 38, 38) if d.unsure else (37, 99, 235)
        draw.rectangle(d.box, outline=colour, width=width)
        draw.text((d.box[0] + width, max(0, d.box[1] - 12 - width)), f"{d.class_name} {d.confidence:.0%}",
                  fill=colour)
    return canvas
