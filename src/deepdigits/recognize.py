"""Recognise real handwriting with a loaded predictor: one digit per image, or a whole number.

An input that is not one digit (blank, a dot or a dash, noise, a scribble, a letter or symbol, several
digits) is answered "not a digit" with a reason: see :mod:`deepdigits.outliers`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import DeepDigitsError
from .outliers import InkMeasures, judge, measure_ink, network_outputs, open_set_of
from .predictor import Predictor, builtin_model
from .preprocess import ImageError, ink_map, load_image, normalise_digit
from .segment import FoundDigits, find_digits

DEFAULT_MIN_CONFIDENCE = 0.5
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp"}
ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray


@dataclass
class DigitPrediction:
    """One recognised digit: the answer, how sure, the top-k, and where it was (for numbers).

    Where the input is not a digit, ``digit`` and ``class_name`` are None, ``not_a_digit`` is True and
    ``reason`` says what it looks like instead; ``probabilities`` and ``top`` are the network's all the same.
    """

    digit: int | None
    confidence: float
    probabilities: list[float]
    top: list[tuple[int, float]]
    unsure: bool
    box: tuple[int, int, int, int] | None = None  # left, top, right, bottom in the input image's pixels
    class_name: str | None = ""
    not_a_digit: bool = False
    reason: str | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["top"] = [{"digit": d, "probability": p} for d, p in self.top]
        if self.box is None:
            out.pop("box")
        return out


@dataclass
class NumberReading:
    """A handwritten number read left to right.

    A piece that is not a digit (a letter, a scribble) reads ``?`` and makes the number unsure; marks much
    smaller than the digits (specks, a decimal point, a minus sign) are left out. Where no piece is a digit
    the reading is not a number: ``not_a_digit`` is True, ``number`` is empty and ``reason`` says why.
    """

    number: str
    digits: list[DigitPrediction] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)  # width, height of the input image
    reason: str | None = None

    @property
    def unsure(self) -> bool:
        return any(d.unsure or d.not_a_digit for d in self.digits)

    @property
    def not_a_digit(self) -> bool:
        return self.reason is not None

    def to_dict(self) -> dict:
        return {"number": self.number, "unsure": self.unsure, "not_a_digit": self.not_a_digit,
                "reason": self.reason, "digits": [d.to_dict() for d in self.digits]}


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


class SeenDigit(np.ndarray):
    """The 28x28 digit the network sees, carrying the ink measures of the image it was cut from.

    A plain ndarray everywhere (stacked, saved, shown); :func:`answer_prepared` reads ``measures`` to
    check the whole image (how much ink, how many pieces), which the 28x28 digit no longer shows.
    """

    measures: InkMeasures | None

    def __array_finalize__(self, obj) -> None:
        self.measures = getattr(obj, "measures", None)


def inspect_image(image: ImageSource, name: str | None = None) -> SeenDigit:
    """``preprocess.to_mnist`` of an image, its ink measured on the way (``.measures``) for the not-a-digit checks."""
    grey = load_image(image, name)
    try:
        ink = ink_map(grey)
        seen = normalise_digit(ink).view(SeenDigit)
    except ImageError as exc:
        label = name or (str(image) if isinstance(image, str | os.PathLike) else "image")
        raise ImageError(f"{label}: {exc}") from None
    seen.measures = measure_ink(ink, grey)
    return seen


def _predictor(predictor: Predictor | None) -> Predictor:
    return builtin_model() if predictor is None else predictor


def predict_arrays(arrays: np.ndarray | list[np.ndarray], predictor: Predictor | None = None, top: int = 3,
                   min_confidence: float = DEFAULT_MIN_CONFIDENCE, *, check: bool = True,
                   several: bool = True) -> list[DigitPrediction]:
    """Recognise images that are already MNIST-style 28x28 (uint8 0-255, or floats in [0, 1]).

    With ``check`` each is first judged by :func:`outliers.judge`: a :class:`SeenDigit` by the ink of its
    whole image, a plain array by its own 28x28 ink; ``several=False`` leaves out the several-digits check.
    """
    model = _predictor(predictor)
    stacked = np.asarray(np.stack(arrays) if isinstance(arrays, list) else arrays)
    if check:
        probabilities, features, logits = network_outputs(model, stacked)
    else:
        probabilities, features, logits = model.predict_proba(stacked), None, None
    if not np.isfinite(probabilities).all():  # weights that overflow: refuse rather than answer NaN
        raise DeepDigitsError(f"{model.card().name}: the model answered non-finite probabilities; "
                              "its weights are unusable")
    reasons: list[str | None] = [None] * len(probabilities)
    if check and len(probabilities):
        images = stacked.reshape(len(probabilities), 28, 28)
        given = [getattr(a, "measures", None) for a in arrays] if isinstance(arrays, list) else [None] * len(images)
        measures = [m or measure_ink(image, image) for m, image in zip(given, images, strict=True)]
        reasons = judge(images, measures, open_set_of(model), features, logits, several=several)
    out = []
    for row, reason in zip(probabilities, reasons, strict=True):
        order = np.argsort(-row)[: max(1, top)]
        best = int(order[0])
        out.append(DigitPrediction(
            digit=None if reason else best,
            confidence=float(row[best]),
            probabilities=[round(float(p), 6) for p in row],
            top=[(int(k), round(float(row[k]), 6)) for k in order],
            unsure=bool(row[best] < min_confidence),
            class_name=None if reason else model.class_names[best],
            not_a_digit=reason is not None,
            reason=reason,
        ))
    return out


def prepare_images(images: Iterable[tuple[str, ImageSource]]) -> tuple[list[tuple[str, np.ndarray]],
                                                                      list[ImageFailure]]:
    """Make each ``(name, image)`` MNIST-like (:func:`inspect_image`). Returns ``(ready, failures)``."""
    ready: list[tuple[str, np.ndarray]] = []
    failures = []
    for name, image in images:
        try:
            ready.append((name, inspect_image(image, name)))
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
    predictions = predict_arrays([array for _, array in ready], predictor, top, min_confidence)
    return [ImageResult(name, p, array) for (name, array), p in zip(ready, predictions, strict=True)]


def predict_digit(image: ImageSource, predictor: Predictor | None = None, top: int = 3,
                  min_confidence: float = DEFAULT_MIN_CONFIDENCE, name: str | None = None) -> DigitPrediction:
    """Recognise the single digit in an image (a path, bytes, PIL image or array), or say it is not one."""
    return predict_arrays([inspect_image(image, name)], predictor, top, min_confidence)[0]


MIN_PIECE_HEIGHT = 0.4  # pieces of a number lower than this share of its tallest are marks, not digits


def read_digits(found: FoundDigits, predictor: Predictor | None = None,
                min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> NumberReading:
    """Recognise the digits :func:`segment.find_digits` cut out, as one number.

    Pieces lower than ``MIN_PIECE_HEIGHT`` of the tallest (specks, a decimal point, a minus sign) are left
    out; a piece the learned check rejects (a letter, a scribble) reads ``?``; no digit at all: not a number.
    """
    model = _predictor(predictor)
    heights = [box[3] - box[1] for box in found.boxes]
    keep = [i for i, h in enumerate(heights) if h >= MIN_PIECE_HEIGHT * max(heights)]
    crops = [found.crops[i] for i in keep]
    boxes = [found.boxes[i] for i in keep]
    # each piece by its own 28x28 ink, the several-digits check left out: the pieces are the digits
    digits = predict_arrays(crops, model, 3, min_confidence, several=False) if crops else []
    for prediction, box in zip(digits, boxes, strict=True):
        prediction.box = box
    if digits and all(d.not_a_digit for d in digits):
        reasons = [d.reason for d in digits]
        return NumberReading("", digits, found.size, reason=max(set(reasons), key=reasons.count))
    return NumberReading("".join("?" if d.class_name is None else d.class_name for d in digits), digits, found.size)


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
        colour = (220, 38, 38) if d.unsure or d.not_a_digit else (37, 99, 235)
        draw.rectangle(box, outline=colour, width=width)
        label = "?" if d.class_name is None else f"{d.class_name} {d.confidence:.0%}"  # ?: not a digit
        draw.text((box[0] + width, max(0, box[1] - 12 - width)), label, fill=colour)
    return canvas
