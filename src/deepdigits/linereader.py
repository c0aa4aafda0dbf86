"""Read a whole handwritten number at once: a small convolutional network over the line, decoded by CTC.

The segmenter (:mod:`deepdigits.segment`) cuts a number into digits and the digit model reads each one; where
digits touch, a wrong cut makes a wrong digit or a wrong count. The line reader looks at the whole line and
says how many digits it holds and which, without cutting (Graves et al. 2006, "Connectionist Temporal
Classification"; the network is a CRNN-style stack of convolutions, Shi et al. 2015, without the recurrence).
A reader may hold several such networks trained apart (``members``): each reads the line, and the number read
is the one most likely under their mixture (the mean of their calibrated probabilities), scored whole, since
two CTC networks need not name a digit at the same step. :func:`recognize.read_number` combines it with the
segmenter. Trained by :mod:`deepdigits.linetrain` on numbers written
from MNIST training digits; shipped in ``builtin/line-reader``. Weights are safetensors, the document JSON,
both checked on load.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from .errors import BundleError

FORMAT = "deepdigits-line-reader"
FORMAT_VERSION = 1
DOCUMENT_FILE, WEIGHTS_FILE = "reader.json", "reader.safetensors"
BUILTIN_READER = Path(__file__).resolve().parent / "builtin" / "line-reader"
LINE_HEIGHT = 32  # the network's input height; the ink fills the middle INK_HEIGHT rows
INK_HEIGHT = 28
MAX_LINE_WIDTH = 512  # pixels at LINE_HEIGHT: 8 digits are about 200; longer lines are squeezed to this
STRIDE = 4  # input columns per output step
BLANK = 0  # CTC's "no digit here" class; digit d is class d + 1
MARK = 11  # in a reader trained with marks: a letter, symbol or scribble written among the digits, read "?"
NEVER_MARK = 1.01  # a mark level no probability reaches: the reader's "?" never outweighs a sure digit
MAX_MEMBERS = 4  # networks in one reader
# readings longer than this take their digits' distributions from one network (``_surest``), not from changing
# each digit in turn: for a line of 64 strokes read as 64 digits that took 428 ms on one thread (two networks),
# against 11 ms for one network; numbers are 2-8 digits (``segment.MAX_DIGITS`` refuses more than 32 pieces)
MAX_CHANGED_DIGITS = 16


class LineNet(nn.Module):
    """(n, 1, 32, W) ink in [0, 1] -> (n, classes, W/4) logits at every fourth column: blank, the ten digits and,
    with ``marks``, a mark that is not a digit."""

    def __init__(self, channels: tuple[int, int, int] = (32, 64, 128), context: int = 192,
                 marks: bool = False) -> None:
        super().__init__()

        def conv(i: int, o: int, stride: int | tuple[int, int] = 1) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        a, b, c = channels
        # strided convolutions from the first layer: the same reading with full-resolution layers and pooling
        # took 4-8x the time a training step (37-75 ms against 263-652 ms, batch 64 of 32x160, one thread)
        self.features = nn.Sequential(*conv(1, a, 2), *conv(a, b, 2), *conv(b, b), *conv(b, c, (2, 1)),
                                      *conv(c, c, (2, 1)))
        self.context = nn.Sequential(
            nn.Conv1d(2 * c, context, 3, padding=1, bias=False), nn.BatchNorm1d(context), nn.ReLU(inplace=True),
            nn.Conv1d(context, context, 5, padding=2, bias=False), nn.BatchNorm1d(context), nn.ReLU(inplace=True))
        self.out = nn.Conv1d(context, 12 if marks else 11, 1)

    def forward(self, lines: torch.Tensor) -> torch.Tensor:
        features = self.features(lines)
        n, c, h, w = features.shape
        return self.out(self.context(features.reshape(n, c * h, w)))


def line_image(ink: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """An ink map (bright on black) -> the reader's uint8 input: the ink's box scaled to 28 rows in 32.

    ``box`` (left, top, right, bottom in ink-map pixels) limits it to the number; by default all the ink.
    """
    if box is not None:
        ink = ink[box[1] : box[3], box[0] : box[2]]
    rows = np.flatnonzero(ink.max(axis=1) > 0.25) if ink.size else np.zeros(0, np.intp)
    if len(rows) == 0:
        return np.zeros((LINE_HEIGHT, 2 * STRIDE), np.uint8)
    cols = np.flatnonzero(ink.max(axis=0) > 0.25)
    ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = INK_HEIGHT / ink.shape[0]
    width = max(1, min(MAX_LINE_WIDTH - 4, round(ink.shape[1] * scale)))
    small = np.asarray(Image.fromarray(ink.astype(np.float32), mode="F").resize((width, INK_HEIGHT),
                                                                                  Image.Resampling.BOX))
    line = np.zeros((LINE_HEIGHT, width + 4), np.float32)
    margin = (LINE_HEIGHT - INK_HEIGHT) // 2
    line[margin : margin + INK_HEIGHT, 2 : 2 + width] = np.clip(small, 0.0, 1.0)
    peak = float(line.max())
    return np.round(line / peak * 255).astype(np.uint8) if peak > 0 else line.astype(np.uint8)


def greedy_decode(log_probs: np.ndarray) -> tuple[list[int], list[tuple[int, int]]]:
    """CTC's best path: the digits (10 for a mark), and the output steps ``[start, stop)`` each was read over."""
    best = log_probs.argmax(axis=1)
    digits: list[int] = []
    spans: list[tuple[int, int]] = []
    previous = BLANK
    for step, label in enumerate(best.tolist()):
        if label != BLANK and label == previous:
            spans[-1] = (spans[-1][0], step + 1)
        elif label != BLANK:
            digits.append(label - 1)
            spans.append((step, step + 1))
        previous = label
    return digits, spans


@dataclass
class LineReading:
    """What the line reader read: the digits, each digit's probabilities, and where on the line it was."""

    number: str  # digits, and "?" for a mark that is not one (readers trained with marks)
    probabilities: np.ndarray  # (digits, 10): each digit's distribution over 0-9, calibrated
    columns: list[tuple[int, int]]  # each digit's columns [start, stop) in the ink map given to ``read``
    log_probability: float  # log P(number | line) summed over CTC's alignments, calibrated
    # (steps, classes) read from, or (networks, steps, classes) for several: scores other numbers without rerunning
    log_probs: torch.Tensor | None = None
    marks: np.ndarray | None = None  # (digits,) each one's probability of being a mark

    def log_likelihood(self, number: str) -> float:
        """log P(``number`` | the line read), as ``log_probability`` is for the number read."""
        if self.log_probs is None:
            raise ValueError("this reading keeps no log-probabilities to score another number with")
        return LineReader.score(self.log_probs, number)

    def mark_probabilities(self) -> np.ndarray:
        """``marks``, or zeros where the reading has none (a reader trained without marks)."""
        return self.marks if self.marks is not None else np.zeros(len(self.number))


class _Combine(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    segmenter: Annotated[float, Field(ge=0.0, le=10.0)]
    line: Annotated[float, Field(ge=0.0, le=10.0)]
    margin: Annotated[float, Field(ge=-100.0, le=100.0)]
    mark: Annotated[float, Field(ge=0.0, le=NEVER_MARK)] = NEVER_MARK  # a mark's probability outweighing a digit


class _Member(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    file: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}\.safetensors$")]  # beside reader.json
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    temperature: Annotated[float, Field(gt=0.05, lt=20.0)]
    training: dict = {}  # how it was trained, and how it read held-out lines: as the first's are described
    held_out: dict = {}


class _Document(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    format: Literal["deepdigits-line-reader"]
    format_version: Literal[1]
    weights: Annotated[dict[str, str], Field(max_length=4)]
    channels: Annotated[list[Annotated[int, Field(ge=1, le=1024)]], Field(min_length=3, max_length=3)]
    context: Annotated[int, Field(ge=1, le=4096)]
    temperature: Annotated[float, Field(gt=0.05, lt=20.0)]
    marks: bool = False  # trained to read letters, symbols and scribbles among the digits as "?"
    combine: _Combine | None = None  # how recognize.combine weighs the two readers (fit on held-out numbers)
    # further networks of the same shape, trained apart, read with the first (its weights and temperature above)
    members: Annotated[list[_Member], Field(max_length=MAX_MEMBERS - 1)] = []


class LineReader:
    """One or more trained :class:`LineNet` with their calibration: ``read`` an ink map, ``log_likelihood`` of a
    number."""

    def __init__(self, net: LineNet, document: dict, members: list[tuple[LineNet, float]] | None = None) -> None:
        self.net = net.eval()
        self.document = document
        self.temperature = float(document["temperature"])
        # every network with its temperature, the first included
        self.members = [(net, self.temperature)] + [(other.eval(), float(t)) for other, t in members or []]

    @classmethod
    def load(cls, folder: str | os.PathLike) -> LineReader:
        """Load from a folder holding ``reader.json`` and its safetensors files, all checked."""
        from .bundle import _read_json

        folder = Path(folder)
        path = folder / DOCUMENT_FILE
        checked = check_document(_read_json(path), path)
        first = cls._network(folder, checked, checked["weights"].get("file", WEIGHTS_FILE),
                             checked["weights"].get("sha256"))
        members = [(cls._network(folder, checked, m["file"], m["sha256"]), m["temperature"])
                   for m in checked["members"]]
        return cls(first, checked, members)

    @staticmethod
    def _network(folder: Path, checked: dict, name: str, sha256: str | None) -> LineNet:
        """One network of the reader from its safetensors file beside reader.json, checked."""
        from .bundle import load_weights

        state = load_weights(folder, name, sha256)
        net = LineNet(tuple(checked["channels"]), checked["context"], checked["marks"])  # type: ignore[arg-type]
        try:
            net.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError:
            raise BundleError(f"{folder / name}: tensors do not fit the network "
                              f"{folder / DOCUMENT_FILE} describes") from None
        return net

    def log_probs(self, line: np.ndarray) -> torch.Tensor:
        """Calibrated log-probabilities (steps, classes) of one :func:`line_image`, by the first network."""
        return _log_probs(line, self.members[:1])[0]

    def member_log_probs(self, line: np.ndarray) -> torch.Tensor:
        """Calibrated log-probabilities (networks, steps, classes) of one :func:`line_image`, by each network."""
        return _log_probs(line, self.members)

    def read(self, ink: np.ndarray, box: tuple[int, int, int, int] | None = None) -> LineReading:
        """Read the number in ``ink`` (an ink map; ``box`` limits it to the number's part)."""
        line = line_image(ink, box)
        log_probs = self.member_log_probs(line)
        if len(log_probs) > 1:
            return self._read_together(ink, box, line, log_probs)
        log_probs = log_probs[0]
        digits, spans = greedy_decode(log_probs.numpy())
        number = _number(digits)
        probabilities, marks = _surest(log_probs, spans)
        return LineReading(number, probabilities, self._columns(ink, box, line, spans),
                           self.score(log_probs, number), log_probs, marks)

    def _read_together(self, ink: np.ndarray, box: tuple[int, int, int, int] | None, line: np.ndarray,
                       log_probs: torch.Tensor) -> LineReading:
        """Several networks: of the numbers each reads (best path), the one likeliest under their mixture; each
        digit's distribution, and its chance of being a mark, from the mixture's likelihoods of the number with
        that digit changed (the others kept), since each network names a digit at its own steps."""
        paths = [greedy_decode(member.numpy()) for member in log_probs]
        # each number read, by the first network that read it: its steps
        readings = {_number(digits): (k, spans) for k, (digits, spans) in reversed(list(enumerate(paths)))}
        candidates = sorted(readings)
        scores = self.scores(log_probs, candidates)
        number = candidates[int(np.argmax(scores))]
        reader, spans = readings[number]
        if len(number) > MAX_CHANGED_DIGITS:
            probabilities, marks = _surest(log_probs[reader], spans)
        else:
            symbols = _symbols(log_probs.shape[2])
            changed = [number[:k] + symbol + number[k + 1 :] for k in range(len(number)) for symbol in symbols]
            table = torch.from_numpy(self.scores(log_probs, changed)).reshape(len(number), len(symbols))
            probabilities = torch.softmax(table[:, :10], dim=1).numpy()
            marks = (torch.softmax(table, dim=1)[:, 10].numpy() if len(symbols) > 10
                     else np.zeros(len(number), np.float64))
        return LineReading(number, probabilities, self._columns(ink, box, line, spans), float(np.max(scores)),
                           log_probs, marks)

    def log_likelihood(self, ink: np.ndarray, number: str, box: tuple[int, int, int, int] | None = None) -> float:
        """log P(``number`` | the line) under the reader, summed over CTC's alignments (calibrated)."""
        return self.score(self.member_log_probs(line_image(ink, box)), number)

    @staticmethod
    def score(log_probs: torch.Tensor, number: str) -> float:
        """log P(``number``) under CTC for a line's log-probabilities (steps, classes), or under the mixture of
        several networks' (networks, steps, classes); "?" is a mark, impossible (-inf) for a reader trained
        without them, as is anything but digits."""
        return float(LineReader.scores(log_probs, [number])[0])

    @staticmethod
    def scores(log_probs: torch.Tensor, numbers: list[str]) -> np.ndarray:
        """:meth:`score` of each of ``numbers``, in one CTC pass over every network."""
        stacked = log_probs.double() if log_probs.dim() == 3 else log_probs.double()[None]
        networks, steps, classes = stacked.shape
        known = _symbols(classes)
        out = np.full(len(numbers), -math.inf)
        valid = [k for k, number in enumerate(numbers) if all(c in known for c in number)]
        if not valid:
            return out
        longest = max(1, *(len(numbers[k]) for k in valid))
        targets = torch.zeros((len(valid), longest), dtype=torch.long)
        for row, k in enumerate(valid):
            targets[row, : len(numbers[k])] = torch.tensor([MARK if c == "?" else int(c) + 1 for c in numbers[k]])
        lengths = torch.tensor([len(numbers[k]) for k in valid])
        every = stacked.repeat_interleave(len(valid), dim=0).permute(1, 0, 2)  # (steps, networks x numbers, classes)
        loss = F.ctc_loss(every, targets.repeat(networks, 1), torch.full((networks * len(valid),), steps),
                          lengths.repeat(networks), blank=BLANK, reduction="none", zero_infinity=False)
        mixed = torch.logsumexp(-loss.reshape(networks, len(valid)), dim=0) - math.log(networks)
        out[valid] = mixed.numpy()
        return out

    @staticmethod
    def _columns(ink: np.ndarray, box: tuple[int, int, int, int] | None, line: np.ndarray,
                 spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Map output steps back to ink-map columns (approximate: each step covers ``STRIDE`` line columns)."""
        left = box[0] if box else 0
        region = ink[box[1] : box[3], box[0] : box[2]] if box else ink
        rows = np.flatnonzero(region.max(axis=1) > 0.25) if region.size else []
        cols = np.flatnonzero(region.max(axis=0) > 0.25) if region.size else []
        if len(rows) == 0 or len(cols) == 0:
            return [(left, left) for _ in spans]
        scale = (rows[-1] + 1 - rows[0]) / INK_HEIGHT
        origin = left + cols[0]
        inner = line.shape[1] - 4
        squeeze = (cols[-1] + 1 - cols[0]) / (inner * scale) if inner else 1.0
        out = []
        for start, stop in spans:
            a = origin + (start * STRIDE - 2) * scale * squeeze
            b = origin + (stop * STRIDE - 2) * scale * squeeze
            out.append((max(left, round(a)), max(left, round(b))))
        return out


def _surest(log_probs: torch.Tensor, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Each digit read over ``spans`` of one network's (steps, classes): its distribution over the ten digits
    (blank and mark left out) and its chance of being a mark, at the step it was surest at."""
    probabilities = np.zeros((len(spans), 10), np.float64)
    marks = np.zeros(len(spans), np.float64)
    for k, (start, stop) in enumerate(spans):
        step = start + int(log_probs[start:stop, 1:].max(dim=1).values.argmax())
        probabilities[k] = torch.softmax(log_probs[step, 1:11].double(), dim=0).numpy()
        if log_probs.shape[1] > MARK:
            marks[k] = float(log_probs[step, MARK].exp())
    return probabilities, marks


def _log_probs(line: np.ndarray, members: list[tuple[LineNet, float]]) -> torch.Tensor:
    """Calibrated log-probabilities (networks, steps, classes) of one :func:`line_image` by ``members``."""
    x = torch.from_numpy(line.astype(np.float32) / 255.0)[None, None]
    with torch.no_grad():
        return torch.stack([F.log_softmax(net(x)[0].T / temperature, dim=1) for net, temperature in members])


def _symbols(classes: int) -> str:
    """What a reader of ``classes`` outputs can read: the ten digits, and "?" where it was trained on marks."""
    return "0123456789?" if classes > MARK else "0123456789"


def _number(digits: list[int]) -> str:
    """Decoded classes as text: the digits, "?" for a mark."""
    return "".join("?" if d == MARK - 1 else str(d) for d in digits)


def check_document(document: object, path: Path) -> dict:
    """A reader.json's content checked against its schema (defaults filled in); one BundleError line naming the
    field where it is not."""
    try:
        return _Document.model_validate(document).model_dump()
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "document"
        raise BundleError(f"{path}: field {where!r}: {error['msg'][:160]}") from None


@functools.lru_cache(maxsize=1)
def builtin_reader() -> LineReader | None:
    """The line reader shipped with the package, loaded once; None where it is not installed."""
    if not (BUILTIN_READER / DOCUMENT_FILE).is_file():
        return None
    return LineReader.load(BUILTIN_READER)
