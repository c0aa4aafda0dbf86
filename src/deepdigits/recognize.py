"""Recognise real handwriting with a loaded predictor: one digit per image, or a whole number.

An input that is not one digit (blank, a dot or a dash, noise, a scribble, a letter or symbol, several
digits) is answered "not a digit" with a reason: see :mod:`deepdigits.outliers`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .errors import DeepDigitsError
from .outliers import LETTER, InkMeasures, judge, measure_ink, network_outputs, open_set_of
from .predictor import Predictor, builtin_model
from .preprocess import ImageError, ink_map, load_image, normalise_digit
from .segment import FoundDigits, find_digits

if TYPE_CHECKING:
    from .linereader import LineReader, LineReading

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
    return [_prediction(row, model.class_names, top, min_confidence, reason)
            for row, reason in zip(probabilities, reasons, strict=True)]


def _prediction(probabilities: np.ndarray, class_names: tuple[str, ...], top: int = 3,
                min_confidence: float = DEFAULT_MIN_CONFIDENCE, reason: str | None = None,
                box: tuple[int, int, int, int] | None = None) -> DigitPrediction:
    """The answer for one row of class probabilities: the class, its top ``top``, unsure below ``min_confidence``;
    with a ``reason``, not a digit."""
    order = np.argsort(-probabilities)[: max(1, top)]
    best = int(order[0])
    return DigitPrediction(
        digit=None if reason else best,
        confidence=float(probabilities[best]),
        probabilities=[round(float(p), 6) for p in probabilities],
        top=[(int(k), round(float(probabilities[k]), 6)) for k in order],
        unsure=bool(probabilities[best] < min_confidence),
        box=box,
        class_name=None if reason else class_names[best],
        not_a_digit=reason is not None,
        reason=reason,
    )


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
                min_confidence: float = DEFAULT_MIN_CONFIDENCE, line_reader: LineReader | bool | None = True,
                ) -> NumberReading:
    """Recognise the digits :func:`segment.find_digits` cut out, as one number.

    Pieces lower than ``MIN_PIECE_HEIGHT`` of the tallest (specks, a decimal point, a minus sign) are left
    out; a piece the learned check rejects (a letter, a scribble) reads ``?``; no digit at all: not a number.
    The line reader (the built-in one by default; False for none) reads the whole line too, and where the two
    differ :func:`combine` decides.
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
    reading = _reading(digits, found.size)
    if line_reader is True:
        from .linereader import builtin_reader

        line_reader = builtin_reader()
    reader = line_reader or None
    if reader is None or found.ink is None or not digits or tuple(model.class_names) != DIGIT_NAMES:
        return reading
    if reading.not_a_digit:
        return _joined_digits(reading, found, reader, min_confidence)
    return combine(reading, found, reader, min_confidence)


JOINED_SURE = 0.9  # the line reader's probability of its reading, to name digits where every piece was refused


def _joined_digits(reading: NumberReading, found: FoundDigits, reader: LineReader,
                   min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> NumberReading:
    """Every piece refused: digits that touch, cut as one piece, are not one digit either. Where the line reader
    reads more digits than there are pieces, no mark among them, and is sure of it (``JOINED_SURE``), its
    reading; else not a number. Of 3,000 photographed numbers of held-out digits, 3 were refused whole so,
    each one piece the reader read as the right 2 digits at 0.996 or more; a fourth it read wrong at 0.24.
    """
    box = _ink_box(reading, found)
    line = reader.read(found.ink, box)
    if ("?" in line.number or len(line.number) <= len(reading.digits)
            or not line.log_probability > math.log(JOINED_SURE)):
        return reading
    return _reading(_line_digits(line, found, box, min_confidence), reading.size)


DIGIT_NAMES = tuple(str(d) for d in range(10))


def combine(reading: NumberReading, found: FoundDigits, reader: LineReader,
            min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> NumberReading:
    """The segmenter's reading and the line reader's, made one.

    Read alike: the segmenter's. The same count: each digit's probabilities pooled, ``p ∝ p_seg^a p_line^b``
    (weights fit on held-out numbers by :mod:`deepdigits.linetrain`, so the pooled ones stay calibrated).
    A piece the segmenter's model refused as not a digit: with a reader trained on marks (letters, symbols and
    scribbles written among digits, read "?"), the two decide together: refused where the reader reads "?"
    too, pooled into a digit where the reader reads a digit and the segmenter's model would have named that
    digit, "?" where the reader reads "?" at a piece the model took for a digit and is sure of it (its mark
    probability at least the fitted ``mark``) or the model was unsure (below ``min_confidence``). A reader
    without marks never saw a letter: the piece stays refused.
    Another count: the line reader's reading where it finds it more likely than the segmenter's by more than the
    fitted ``margin`` (in log-likelihood), else the segmenter's; with a reader without marks, only where every
    piece the segmenter refused was cut out of ink running on beyond it (digits that touch, cut wrong): a
    letter written apart reads ``?``, where that reader would name it as digits.
    """
    from .linereader import NEVER_MARK

    assert found.ink is not None
    box = _ink_box(reading, found)
    line = reader.read(found.ink, box)
    if line.number == reading.number or not line.number:
        return reading
    weights = reader.document.get("combine") or {}
    marks = bool(reader.document.get("marks"))
    a, b = float(weights.get("segmenter", 1.0)), float(weights.get("line", 1.0))
    digits = reading.digits
    if len(line.number) == len(digits):
        pooled = []
        mark = float(weights.get("mark", NEVER_MARK))
        for digit, named, theirs, sure_mark in zip(digits, line.number, line.probabilities, line.mark_probabilities(),
                                                   strict=True):
            mine = np.clip(np.asarray(digit.probabilities, np.float64), 1e-12, 1.0)
            if digit.not_a_digit and not (marks and named != "?" and int(np.argmax(mine)) == int(named)):
                pooled.append(digit)  # the line reader never saw a letter, or sees one too, or names another digit
                continue
            if named == "?" and not digit.not_a_digit:
                if digit.confidence < min_confidence or sure_mark >= mark:
                    pooled.append(_prediction(mine, DIGIT_NAMES, 3, min_confidence, reason=LETTER, box=digit.box))
                else:
                    pooled.append(digit)
                continue
            log_p = a * np.log(mine) + b * np.log(np.clip(theirs, 1e-12, 1.0))
            p = np.exp(log_p - log_p.max())
            pooled.append(_prediction(p / p.sum(), DIGIT_NAMES, 3, min_confidence, box=digit.box))
        return _reading(pooled, reading.size)
    margin = float(weights.get("margin", math.inf))
    if not marks and keeps_its_count(reading, found):
        return reading  # a letter among digits must not vanish into digits the line reader names
    if not line.log_probability - line.log_likelihood(reading.number) > margin:
        return reading  # (also where the line reader finds its own reading impossible: NaN or -inf)
    return _reading(_line_digits(line, found, box, min_confidence), reading.size)


def _line_digits(line: LineReading, found: FoundDigits, box: tuple[int, int, int, int],
                 min_confidence: float) -> list[DigitPrediction]:
    """The line reader's digits ("?" a mark), each with its probabilities and its box in the input image."""
    # the reader names a digit as its last strokes pass (its spans sit at each digit's right edge, as seen on
    # overlays): a digit runs from where the one before was named to where it is, the last to the ink's end
    ends = [stop for _, stop in line.columns]
    starts = [box[0], *ends[:-1]]
    ends[-1] = box[2]
    boxes = [_column_box(found, (a, b), box) for a, b in zip(starts, ends, strict=True)]
    return [_prediction(p, DIGIT_NAMES, 3, min_confidence, reason=LETTER if named == "?" else None, box=b)
            for p, named, b in zip(line.probabilities, line.number, boxes, strict=True)]


def _reading(digits: list[DigitPrediction], size: tuple[int, int]) -> NumberReading:
    """A number of these digits ("?" where not a digit); where some are given and none is a digit, not a number."""
    if digits and all(d.not_a_digit for d in digits):
        reasons = [d.reason for d in digits]
        return NumberReading("", digits, size, reason=max(set(reasons), key=reasons.count))
    return NumberReading("".join(d.class_name or "?" for d in digits), digits, size)


def keeps_its_count(reading: NumberReading, found: FoundDigits) -> bool:
    """Whether the segmenter's count stands whatever the line reader reads: some piece its model refused as not
    a digit is a mark of its own (a letter written apart), not one cut out of ink that runs on past its sides."""
    refused = [d.box for d in reading.digits if d.not_a_digit]
    if not refused:
        return False
    if found.ink is None or any(box is None for box in refused):
        return True
    labels, _ = ndimage.label(found.ink > 0.25, structure=np.ones((3, 3)))  # the segmenter's ink and neighbours
    slices = ndimage.find_objects(labels)
    for box in refused:
        left, top, right, bottom = (v / found.scale for v in box)  # type: ignore[union-attr]
        inside = labels[max(0, int(top)) : math.ceil(bottom), max(0, int(left)) : math.ceil(right)]
        columns = [slices[label - 1][1] for label in np.unique(inside[inside > 0]).tolist()]
        # 2: the boxes are rounded to input pixels
        if not any(c.start < left - 2 or c.stop > right + 2 for c in columns):
            return True
    return False


def _ink_box(reading: NumberReading, found: FoundDigits) -> tuple[int, int, int, int]:
    """The kept pieces' box in ink-map pixels: the number without the marks left out of it."""
    boxes = np.array([d.box for d in reading.digits if d.box is not None], np.float64) / found.scale
    assert found.ink is not None
    height, width = found.ink.shape
    left, top = np.floor(boxes[:, :2].min(axis=0)).astype(int)
    right, bottom = np.ceil(boxes[:, 2:].max(axis=0)).astype(int)
    return max(0, left), max(0, top), min(width, right), min(height, bottom)


def _column_box(found: FoundDigits, columns: tuple[int, int], box: tuple[int, int, int, int],
                ) -> tuple[int, int, int, int]:
    """A digit the line reader found between ``columns``: its ink's box there, in the input image's pixels."""
    assert found.ink is not None
    left, right = max(box[0], columns[0]), min(box[2], max(columns[1], columns[0] + 1))
    rows = np.flatnonzero(found.ink[box[1] : box[3], left:right].max(axis=1) > 0.25) if right > left else []
    top, bottom = (box[1] + rows[0], box[1] + rows[-1] + 1) if len(rows) else (box[1], box[3])
    return tuple(round(v * found.scale) for v in (left, top, right, bottom))  # type: ignore[return-value]


def read_number(image: ImageSource, predictor: Predictor | None = None,
                min_confidence: float = DEFAULT_MIN_CONFIDENCE, name: str | None = None) -> NumberReading:
    """Read a handwritten number (digits side by side) from an image, left to right.

    The model also decides where touching digits part (``find_digits(..., predictor=...)``).
    """
    model = _predictor(predictor)
    return read_digits(find_digits(image, name, predictor=model), model, min_confidence)


SURE, UNSURE, REJECTED = (37, 99, 235), (217, 119, 6), (220, 38, 38)  # blue, amber, red
FONTS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "/usr/share/fonts/TTF/DejaVuSans-Bold.ttf",
         "/usr/share/fonts/dejavu/DejaVuSans-Bold.ttf", "/Library/Fonts/Arial Bold.ttf",
         "C:/Windows/Fonts/arialbd.ttf")


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A bold sans-serif font ``size`` pixels tall: DejaVu Sans where installed, else Pillow's own."""
    for path in FONTS:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _colour_image(image: ImageSource, name: str | None = None) -> Image.Image:
    """The input as an RGB picture in its own colours (transparency on white, EXIF orientation applied).

    Grey where its colours cannot be had within the decoding budget (a JPEG read reduced, in grey).
    """
    from PIL import ImageOps

    from .preprocess import MAX_DECODE_BYTES, decode_cost

    def on_white(picture: Image.Image) -> Image.Image:
        picture = ImageOps.exif_transpose(picture) or picture
        if picture.mode in ("RGBA", "LA", "PA", "P") and (picture.mode != "P" or "transparency" in picture.info):
            rgba = picture.convert("RGBA")
            white = Image.new("RGB", rgba.size, (255, 255, 255))
            white.paste(rgba, mask=rgba.getchannel("A"))
            return white
        return picture.convert("RGB")

    try:
        if isinstance(image, Image.Image) and image.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            return on_white(image)
        if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] in (3, 4) and image.dtype == np.uint8:
            return on_white(Image.fromarray(image))
        if isinstance(image, bytes | str | os.PathLike):
            import io

            with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as picture:
                deep = picture.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # grey, scaled below
                if not deep and decode_cost(picture.mode, picture.size) <= MAX_DECODE_BYTES:
                    return on_white(picture)
    except (OSError, ValueError, Image.DecompressionBombError):
        pass
    grey = load_image(image, name)  # any other input, or too large: grey, with its one-line errors
    return Image.fromarray((grey * 255).astype(np.uint8)).convert("RGB")


def _label_box(box: list[int], size: tuple[int, int], image_size: tuple[int, int],
               taken: list[tuple[int, int, int, int]] | None = None) -> tuple[int, int]:
    """Where a label of ``size`` goes for a digit's ``box``: above it, else below, else inside it; always
    within the image, and where it can, clear of the labels ``taken`` already (left, top, right, bottom)."""
    width, height = size
    left = min(max(0, box[0]), max(0, image_size[0] - width))
    places = [top for top in (box[1] - height, box[3]) if 0 <= top <= image_size[1] - height]
    places = places or [min(max(0, box[1]), max(0, image_size[1] - height))]

    def clear(top: int) -> bool:
        return all(left + width <= a or c <= left or top + height <= b or d <= top for a, b, c, d in taken or [])

    return left, next((top for top in places if clear(top)), places[0])


def _label_layout(draw: ImageDraw.ImageDraw, texts: list[str], big: int) -> tuple[list, int, int, list[int],
                                                                                  tuple[int, int]]:
    """The fonts, padding, gap, text widths and whole size of a label whose digit is ``big`` pixels tall."""
    parts = [(text, _font(big if k == 0 else max(8, round(big * 0.6)))) for k, text in enumerate(texts)]
    pad, gap = max(2, big // 6), max(2, big // 4)
    widths = [round(draw.textlength(text, font=font)) for text, font in parts]
    # a little more on the right: the last glyph's ink can pass its advance (the % sign does)
    return parts, pad, gap, widths, (sum(widths) + gap * (len(parts) - 1) + 3 * pad, round(big * 1.1) + 2 * pad)


def draw_boxes(image: ImageSource, reading: NumberReading, name: str | None = None) -> Image.Image:
    """The input image, in its own colours, with each digit's box and a label: the digit and, apart, its
    probability, white on the box's colour (blue: sure; amber: unsure; red ``?``: not a digit), sized to the box.
    """
    canvas = _colour_image(image, name)
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(max(canvas.size) / 300))
    # a JPEG too large to decode whole is read reduced (preprocess.MAX_DECODE_BYTES); boxes are in full pixels
    shrink = canvas.size[0] / reading.size[0] if reading.size[0] else 1.0
    taken: list[tuple[int, int, int, int]] = []
    for d in reading.digits:
        if d.box is None:
            continue
        box = [round(v * shrink) for v in d.box]
        colour = REJECTED if d.not_a_digit else UNSURE if d.unsure else SURE
        draw.rectangle(box, outline=colour, width=line)
        # the digit a third of the box's height, the probability smaller and a space apart; narrower than
        # the box allows (so neighbours' labels do not cover each other), at least 10 px
        texts = ["?"] if d.class_name is None else [d.class_name, f"{d.confidence:.0%}"]
        big = max(10, round((box[3] - box[1]) / 3))
        for _ in range(2):
            parts, pad, gap, widths, size = _label_layout(draw, texts, big)
            room = max(box[2] - box[0], 2 * line) + 2 * line
            if size[0] <= room or big == 10:
                break
            big = max(10, int(big * room / size[0]))
        left, top = _label_box(box, size, canvas.size, taken)
        taken.append((left, top, left + size[0], top + size[1]))
        draw.rectangle((left, top, left + size[0] - 1, top + size[1] - 1), fill=colour)
        x, baseline = left + pad, top + pad + round(big * 0.9)
        for (text, font), width in zip(parts, widths, strict=True):
            draw.text((x, baseline), text, font=font, fill=(255, 255, 255), anchor="ls")
            x += width + gap
    canvas.info["labels"] = taken  # where each label went: left, top, right, bottom (for tests and callers)
    return canvas
