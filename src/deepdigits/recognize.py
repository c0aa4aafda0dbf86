"""Recognise real handwriting with a loaded predictor: one digit per image, or a whole number."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import DeepDigitsError
from .predictor import Predictor, builtin_model
from .preprocess import load_image, to_mnist
from .segment import FoundDigits, find_digits

DEFAULT_MIN_CONFIDENCE = 0.5
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp"}
ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray


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


@dataclass
class ImageResult:
    """One image's answer from :func:`predict_images`, with the 28x28 digit the network saw."""

    name: str
    prediction: DigitPrediction
    seen: np.ndarray

    def to_dict(self) -> dict:
        return {"file": self.name, **self.prediction.to_dict()}


@dataclass
class ImageFailure:
    """An image :func:`predict_images` could not answer for, and why (one line that names it)."""

    name: str
    message: str


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files as given; folders -> the images inside (sorted); globs -> their matches (sorted, or as given if none)."""
    import glob

    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(str(p) for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(c in item for c in "*?[") and not path.exists():
            files.extend(sorted(glob.glob(item, recursive=True)) or [item])
        else:
            files.append(item)
    return files


def _predictor(predictor: Predictor | None) -> Predictor:
    return builtin_model() if predictor is None else predictor


def predict_arrays(arrays: np.ndarray, predictor: Predictor | None = None, top: int = 3,
                   min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> list[DigitPrediction]:
    """Recognise images that are already MNIST-style 28x28 (uint8 0-255, or floats in [0, 1])."""
    model = _predictor(predictor)
    probabilities = model.predict_proba(np.asarray(arrays))
    if not np.isfinite(probabilities).all():  # weights that overflow: refuse rather than answer NaN
        raise DeepDigitsError(f"{model.card().name}: the model answered non-finite probabilities; "
                              "its weights are unusable")
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
            class_name=model.class_names[best],
        ))
    return out


def prepare_images(images: Iterable[tuple[str, ImageSource]]) -> tuple[list[tuple[str, np.ndarray]],
                                                                      list[ImageFailure]]:
    """Make each ``(name, image)`` MNIST-like with ``preprocess.to_mnist``. Returns ``(ready, failures)``."""
    ready, failures = [], []
    for name, image in images:
        try:
            ready.append((name, to_mnist(image, name)))
        except DeepDigitsError as exc:
            message = str(exc)
            failures.append(ImageFailure(name, message if message.startswith(name) else f"{name}: {message}"))
    return ready, failures


def predict_images(images: Iterable[tuple[str, ImageSource]], predictor: Predictor | None = None, top: int = 3,
                   min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> tuple[list[ImageResult], list[ImageFailure]]:
    """Recognise the single digit in each ``(name, image)``; images that cannot be read become failures."""
    ready, failures = prepare_images(images)
    return answer_prepared(ready, predictor, top, min_confidence), failures


def answer_prepared(ready: list[tuple[str, np.ndarray]], predictor: Predictor | None = None, top: int = 3,
                    min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> list[ImageResult]:
    """The second half of :func:`predict_images`: ``(name, 28x28 array)`` pairs through the predictor at once."""
    if not ready:
        return []
    arrays = np.stack([array for _, array in ready])
    predictions = predict_arrays(arrays, predictor, top, min_confidence)
    return [ImageResult(name, p, array) for (name, array), p in zip(ready, predictions, strict=True)]


def predict_digit(image: ImageSource, predictor: Predictor | None = None, top: int = 3,
                  min_confidence: float = DEFAULT_MIN_CONFIDENCE, name: str | None = None) -> DigitPrediction:
    """Recognise the single digit in an image (a path, bytes, PIL image or array)."""
    return predict_arrays(to_mnist(image, name)[None], predictor, top, min_confidence)[0]


def read_digits(found: FoundDigits, predictor: Predictor | None = None,
                min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> NumberReading:
    """Recognise the digits :func:`segment.find_digits` cut out, as one number."""
    model = _predictor(predictor)
    digits = predict_arrays(found.crops, model, 3, min_confidence)
    for prediction, box in zip(digits, found.boxes, strict=True):
        prediction.box = box
    return NumberReading("".join(model.class_names[d.digit] for d in digits), digits, found.size)


def read_number(image: ImageSource, predictor: Predictor | None = None,
                min_confidence: float = DEFAULT_MIN_CONFIDENCE, name: str | None = None) -> NumberReading:
    """Read a handwritten number (digits side by side) from an image, left to right."""
    return read_digits(find_digits(image, name), predictor, min_confidence)


def draw_boxes(image: ImageSource, reading: NumberReading, name: str | None = None) -> Image.Image:
    """The input image with each digit's box and answer drawn on it (red where unsure)."""
    grey = load_image(image, name)
    canvas = Image.fromarray((grey * 255).astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 300))
    # a JPEG too large to decode whole is read reduced (preprocess.MAX_DECODE_BYTES); boxes are in full pixels
    shrink = canvas.size[0] / reading.size[0] if reading.size[0] else 1.0
    for d in reading.digits:
        if d.box is None:
            continue
        box = [round(v * shrink) for v in d.box]
        colour = (220, 38, 38) if d.unsure else (37, 99, 235)
        draw.rectangle(box, outline=colour, width=width)
        draw.text((box[0] + width, max(0, box[1] - 12 - width)), f"{d.class_name} {d.confidence:.0%}",
                  fill=colour)
    return canvas
