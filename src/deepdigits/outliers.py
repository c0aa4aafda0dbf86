"""Decide when an input is not one digit: cheap checks of its ink, then a learned score on the network's features."""

# Two stages, both measured on generated data (``deepdigits.nondigits``; ``benchmarks/trust.py``):
#
# 1. Cheap checks of the ink map, no model needed: *blank* (too little contrast between ink and paper),
#    *noise* (ink in many small pieces), *a dot or a dash* (one solid round blob; one long flat stroke),
#    *several digits* (two or more digit-sized groups side by side). Their thresholds are ``DEFAULTS``;
#    a bundle's ``open_set.checks`` may override them.
# 2. A learned score, where the bundle has an ``open_set.head`` and the predictor shows its features (a
#    PyTorch network, or an ONNX file exported with them): a logistic regression on the pooled activations
#    of the network's convolutions (``POOLED``), what its last linear layer reads (the penultimate
#    features), its logits and a few measures of the 28x28 digit it saw, fit on MNIST and photographed
#    training digits against generated letters, symbols, scribbles, Fashion-MNIST, noise, dots and dashes;
#    its threshold is chosen on held-out images (``fit_rejection``; ``benchmarks/trust.py --fit``).
#
#    Measured on held-out generated images with the built-in model, rejecting 0.3% of MNIST and 1% of
#    photographed digits, the share of letters / symbols / scribbles still read as a digit: max softmax
#    64 / 59 / 66%, energy (logsumexp) 76 / 73 / 70%, a logistic regression on logit scores, centred logits,
#    a Gaussian distance on the logits and the 28x28 measures 37 / 26 / 35%; a Gaussian (Mahalanobis) on
#    the penultimate features 49 / 49 / 70%; the regression on the penultimate features 16 / 18 / 8% fit on
#    100 of each kind, 2 / 3 / 8% on 550 / 450 / 450. The logits alone cannot tell a confident letter from
#    a digit. Fit on 1,100 / 900 / 900 with the budget of 0.15% of MNIST and 0.5% of photos, the penultimate
#    features let through 6.5 / 4.5 / 12% of the test images of ``benchmarks/trust.py`` (held out: 5.5 /
#    10.5 / 12.4%): the same generator as the fit, other seeds, so not a shift but a weak score. Shipped:
#    with the pooled activations and 1% of photos, 0 / 0.5 / 5.3% of those test images (held out: 0.9 /
#    2.9 / 6.1%); the scribbles still let through mostly look like a 4, 7, 8 or 9.
#
# An exported model (``export.onnx_bytes``) carries the head in its metadata and its inputs as extra graph
# outputs, so ONNX Runtime rejects what the bundle rejects. A bundle without ``open_set``, an ONNX file
# without those outputs, or any other ``Predictor`` that shows no features gets the cheap checks only.

from __future__ import annotations

import contextlib
import functools
import json
import threading
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from .preprocess import stroke_width

BLANK = "blank"
DOT_OR_DASH = "a dot or a dash"
NOISE = "noise"
SCRIBBLE = "a scribble"
LETTER = "a letter or symbol"
PICTURE = "a picture"
SEVERAL = "several digits: use number mode"
REASONS = (BLANK, DOT_OR_DASH, NOISE, SCRIBBLE, LETTER, PICTURE, SEVERAL)
MAX_GROUPED = 24  # pieces beyond which the ink is not grouped into digits (it is noise)

# Cheap-check thresholds, measured on 1,200 photographed MNIST training digits (synthetic.render_digit)
# against 200 generated images of each kind (nondigits.render_nondigit):
DEFAULTS: dict[str, float] = {
    # ink-paper contrast: photographed digits 0.31 at the least, blank paper 0.10 at the most
    "min_contrast": 0.15,
    # ... and of those, grainy ones are noise: photographed blank paper's mean step between neighbours is
    # 0.04 at the most (sensor noise), uniform noise's 1/3
    "noise_grain": 0.1,
    # noise: this many pieces of ink, the largest holding less than this share of it (digits: 3 pieces at most)
    "noise_pieces": 8,
    "noise_largest_share": 0.5,
    # a dot: solid (fill of its box), round (elongation) and thick (stroke over size), no hole.
    # Dots: fill 0.71-1, stroke/size 0.46-0.67; photographed digits: fill 99th percentile 0.74, stroke/size 0.29
    "dot_min_fill": 0.6,
    "dot_max_elongation": 1.6,
    "dot_min_stroke": 0.38,
    # a dash: long (elongation) and within this many degrees of horizontal; MNIST digits are upright
    "dash_min_elongation": 3.0,
    "dash_max_angle": 30.0,
    # several digits: groups of ink whose columns do not overlap, each at least this share of the tallest
    "several_min_height": 0.5,
    "several_min_groups": 2,
}


@dataclass
class InkMeasures:
    """What the cheap checks look at, measured on an ink map (ink bright on black, values in [0, 1])."""

    contrast: float  # ink against paper, in grey levels of [0, 1] (1 for a clean drawing)
    grain: float  # mean grey-level step between neighbouring pixels: photographed paper 0.04 at most
    ink_fraction: float  # share of the image that is ink
    pieces: int  # connected pieces of ink
    largest_share: float  # share of the ink in the largest piece
    groups: int  # digit-sized groups of pieces side by side (pieces whose columns overlap are one group)
    elongation: float  # sqrt of the ratio of the ink's principal moments (1 round, large for a line)
    angle: float  # degrees of the ink's long axis from horizontal (0-90)
    fill: float  # ink over the area of its bounding box
    stroke: float  # stroke width over the longest side of the ink's box
    holes: int  # enclosed background regions (0 in a dot; 1 in a 0, 2 in an 8)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_ink(ink: np.ndarray, grey: np.ndarray | None = None) -> InkMeasures:
    """Measure an ink map from ``preprocess.ink_map`` (``grey``: the greyscale image it came from, for contrast)."""
    ink, grey = _unit(ink), None if grey is None else _unit(grey)
    mask = ink > 0.25  # what segment.segment_digits counts as ink
    area = int(mask.sum())
    if area == 0:
        return InkMeasures(0.0, 0.0, 0.0, 0, 0.0, 0, 1.0, 0.0, 0.0, 0.0, 0)
    contrast, grain = _contrast(grey, mask) if grey is not None else (1.0, 0.0)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:].astype(np.float64)
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    height, width = bottom - top, right - left
    covariance = np.cov(np.vstack([cols, rows]).astype(np.float64)) if area > 1 else np.eye(2)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance + 0.25 * np.eye(2))  # +1/4: a pixel's own extent
    major = eigenvectors[:, 1]
    angle = float(np.degrees(np.arctan2(abs(major[1]), abs(major[0]))))
    crop = mask[top:bottom, left:right]
    return InkMeasures(
        contrast=contrast,
        grain=grain,
        ink_fraction=area / mask.size,
        pieces=int(count),
        largest_share=float(areas.max() / area),
        groups=_groups(labels, areas),
        elongation=float(np.sqrt(eigenvalues[1] / eigenvalues[0])),
        angle=angle,
        fill=area / float(height * width),
        stroke=stroke_width(crop) / max(height, width),
        holes=_holes(crop),
    )


def _unit(image: np.ndarray) -> np.ndarray:
    """An image as float32 in [0, 1]: 8-bit values (or any above 1) divided by 255."""
    image = np.asarray(image)
    scaled = image.dtype == np.uint8 or (image.size and float(image.max()) > 1.0)
    return image.astype(np.float32) / 255.0 if scaled else image.astype(np.float32)


def _contrast(grey: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Median grey of the ink against the median of the rest, and the grain (mean step between neighbours)."""
    if grey.shape != mask.shape:  # nearest pixels of the full image (the ink map may be reduced): no resizing
        rows = (np.arange(mask.shape[0]) * grey.shape[0]) // mask.shape[0]
        cols = (np.arange(mask.shape[1]) * grey.shape[1]) // mask.shape[1]
        grey = grey[np.ix_(rows, cols)]
    step = np.abs(np.diff(grey[:: max(1, grey.shape[0] // 160)], axis=1))
    grain = float(step.mean()) if step.size else 0.0
    if mask.all():
        return 0.0, grain
    ink, paper = grey[mask], grey[~mask]
    # medians of at most 20,000 values each (strided): 0.2 ms instead of 1 ms on a 640-pixel image
    ink, paper = ink[:: max(1, ink.size // 20_000)], paper[:: max(1, paper.size // 20_000)]
    return abs(float(np.median(ink) - np.median(paper))), grain


def _groups(labels: np.ndarray, areas: np.ndarray) -> int:
    """Digit-sized groups: pieces with a tenth of the largest's ink, merged where their columns overlap by half."""
    boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop]
             for s, a in zip(ndimage.find_objects(labels), areas, strict=True) if a >= 0.1 * areas.max()]
    if len(boxes) > MAX_GROUPED:  # noise: merging is quadratic in the pieces, and no number is this long
        return len(boxes)
    merged = True
    while merged:  # segment.segment_digits's rule for the parts of one broken digit
        merged = False
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                overlap = min(boxes[a][2], boxes[b][2]) - max(boxes[a][0], boxes[b][0])
                if overlap > 0.5 * min(boxes[a][2] - boxes[a][0], boxes[b][2] - boxes[b][0]):
                    boxes[a] = [min(boxes[a][0], boxes[b][0]), min(boxes[a][1], boxes[b][1]),
                                max(boxes[a][2], boxes[b][2]), max(boxes[a][3], boxes[b][3])]
                    boxes.pop(b)
                    merged = True
                    break
            if merged:
                break
    tallest = max(b[3] - b[1] for b in boxes)
    return sum(b[3] - b[1] >= DEFAULTS["several_min_height"] * tallest for b in boxes)


def _holes(crop: np.ndarray) -> int:
    background, count = ndimage.label(~crop)  # 4-connected, as holes are counted in digital topology
    edge = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    return int(count - len(set(edge.tolist()) - {0}))


def cheap_reason(m: InkMeasures, checks: dict[str, float] | None = None) -> str | None:
    """The reason an image is not one digit from its ink measures alone, or None when it may be one."""
    c = {**DEFAULTS, **(checks or {})}
    if m.pieces == 0 or m.contrast < c["min_contrast"]:  # nothing written: plain paper, or grainy noise
        return NOISE if m.grain > c["noise_grain"] else BLANK
    if m.pieces >= c["noise_pieces"] and m.largest_share < c["noise_largest_share"]:
        return NOISE
    if m.groups >= c["several_min_groups"]:
        return SEVERAL
    if m.largest_share > 0.9:
        if (m.fill >= c["dot_min_fill"] and m.elongation <= c["dot_max_elongation"]
                and m.stroke >= c["dot_min_stroke"] and m.holes == 0):
            return DOT_OR_DASH
        if m.elongation >= c["dash_min_elongation"] and m.angle <= c["dash_max_angle"]:
            return DOT_OR_DASH
    return None


# --------------------------------------------------------------------------- the learned score


SEEN_FEATURES = ("mass", "on", "outside", "pieces", "holes", "stroke", "height", "width")


def seen_features(seen: np.ndarray) -> np.ndarray:
    """Eight measures of each 28x28 digit the network saw (N, 28, 28) -> (N, 8): see ``SEEN_FEATURES``."""
    seen = np.asarray(seen)
    x = seen.astype(np.float32) / (255.0 if seen.dtype == np.uint8 else 1.0)
    out = np.zeros((len(x), len(SEEN_FEATURES)), np.float64)
    for i, image in enumerate(x):
        mask = image > 0.5
        rows, cols = np.nonzero(mask)
        _, pieces = ndimage.label(mask, structure=np.ones((3, 3)))
        total = float(image.sum())
        out[i] = (image.mean(), mask.mean(), 1.0 - float(image[4:24, 4:24].sum()) / max(total, 1e-6), pieces,
                  _holes(mask), stroke_width(mask),
                  np.ptp(rows) + 1 if len(rows) else 0, np.ptp(cols) + 1 if len(cols) else 0)
    return out


def logit_features(logits: np.ndarray) -> np.ndarray:
    """Centred logits (the 10 the softmax sees), the log of the top softmax and logsumexp (energy) -> (N, 12)."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    return np.column_stack([z - z.mean(axis=1, keepdims=True), top[:, 0] - lse, lse])


_HOOK_LOCK = threading.Lock()


def last_linear(network: Any):
    """The network's last ``torch.nn.Linear`` (whose input the head reads), or None."""
    import torch

    if not isinstance(network, torch.nn.Module):
        return None
    linears = [m for m in network.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1] if linears else None


def network_outputs(predictor: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``predict_proba`` of the images, with the network's features and logits where it shows them.

    Returns ``(probabilities, features, logits)``; the last two are None for a predictor that shows neither.
    Features are the pooled activations of its convolutions (``POOLED``) followed by what its last linear
    layer reads; logits are what that layer writes (before any temperature). A PyTorch network shows them
    in one pass: forward hooks record them while ``predict_proba`` runs. An exported model shows them as
    extra outputs of its graph (``export.OnnxClassifier.predict_with_features``).
    """
    with_features = getattr(predictor, "predict_with_features", None)
    if callable(with_features):
        return with_features(images)
    network = getattr(predictor, "network", None)
    if last_linear(network) is None:
        return predictor.predict_proba(images), None, None
    with _HOOK_LOCK, _recording(network) as passes:  # a hook sees every forward pass: one call at a time
        probabilities = predictor.predict_proba(images)
    if not passes or sum(len(f) for f, _ in passes) != len(probabilities):
        return probabilities, None, None
    features = np.concatenate([f.detach().float().numpy() for f, _ in passes]).astype(np.float64)
    return probabilities, features, np.concatenate([z.detach().float().numpy() for _, z in passes]).astype(np.float64)


# What the head reads of a convolution's activations, for each ReLU module with a (N, C, H, W) output: each
# channel's mean and maximum over the positions. Measured on held-out generated images, built-in model,
# letters / symbols / scribbles let through at the same budget (0.15% of MNIST, 0.5% of photos): the last
# linear layer's input alone 5.5 / 10.5 / 12.4%, with the whole image's ink measures 5.5 / 11.7 / 12.5%,
# with the pooled activations 1.9 / 4.8 / 8.8% (means only 4.1 / 7.6 / 11.4%; the last three ReLUs only
# 4.6 / 8.5 / 12.5%).
POOLED = "relu-mean-max"


@contextlib.contextmanager
def _recording(network: Any):
    """Forward hooks recording, for each pass of ``network``, ``(features, logits)`` as torch tensors."""
    import torch

    passes: list = []
    pooled: list = []

    def relu(_module, _inputs, output) -> None:
        if output.dim() == 4:
            pooled.extend([output.mean((2, 3)), output.amax((2, 3))])

    def linear(_module, inputs, output) -> None:
        passes.append((torch.cat([*pooled, inputs[0].flatten(1)], 1), output))
        pooled.clear()

    handles = [m.register_forward_hook(relu) for m in network.modules() if isinstance(m, torch.nn.ReLU)]
    handles.append(last_linear(network).register_forward_hook(linear))
    try:
        yield passes
    finally:
        for handle in handles:
            handle.remove()


def forward_with_features(network: Any, images: Any) -> tuple[Any, Any | None]:
    """``(logits, features)`` of a PyTorch network in one pass, features as ``network_outputs`` gives them.

    For graphs that must show the head's inputs (``export.onnx_bytes`` traces through this); features is
    None where the network has no linear layer.
    """
    if last_linear(network) is None:
        return network(images), None
    with _recording(network) as passes:
        logits = network(images)
    return logits, passes[-1][0] if passes else None


def open_set_document(text: str | None, label: str) -> dict | None:
    """An ``open_set`` stored as JSON text (an exported model's metadata), checked as a bundle's is.

    None where there is none; a ``DeepDigitsError`` naming ``label`` where it is not a valid ``open_set``.
    """
    if not text:
        return None
    from pydantic import ValidationError

    from .errors import DeepDigitsError
    from .schema import OpenSet as OpenSetSchema
    from .schema import error_line

    try:
        return OpenSetSchema.model_validate(json.loads(text)).model_dump(exclude_unset=True)
    except (ValueError, RecursionError) as exc:
        detail = error_line(exc) if isinstance(exc, ValidationError) else "not JSON"
        raise DeepDigitsError(f"{label}: metadata 'deepdigits.open_set': {detail}") from None


@dataclass
class OpenSet:
    """A bundle's ``open_set``: cheap-check thresholds, and the learned head with its reasons where fit."""

    checks: dict[str, float]
    head: dict | None = None  # mean, scale, weights, bias, threshold over head_inputs(...)
    reasons: dict | None = None  # classes, mean, scale, weights (classes x features), bias over reason_inputs(...)
    fit: dict | None = None  # how it was fit and what it measured

    @classmethod
    def from_dict(cls, document: dict | None) -> OpenSet:
        document = document or {}
        return cls({**DEFAULTS, **(document.get("checks") or {})}, document.get("head"), document.get("reasons"),
                   document.get("fit"))

    def to_dict(self) -> dict:
        out: dict = {"version": 1, "checks": dict(self.checks)}
        for key in ("head", "reasons", "fit"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def head_inputs(seen: np.ndarray, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """What the head reads: the seen digit's measures, the logit features and the penultimate features."""
    return np.column_stack([seen_features(seen), logit_features(logits), features])


def reason_inputs(seen: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """What the reason model reads: the seen digit's measures and the logit features."""
    return np.column_stack([seen_features(seen), logit_features(logits)])


def _linear(x: np.ndarray, part: dict) -> np.ndarray:
    scaled = (x - np.asarray(part["mean"])) / np.asarray(part["scale"])
    return scaled @ np.asarray(part["weights"], dtype=np.float64).T + np.asarray(part["bias"], dtype=np.float64)


def head_scores(open_set: OpenSet, seen: np.ndarray, features: np.ndarray, logits: np.ndarray) -> np.ndarray | None:
    """The learned not-a-digit score of each image (higher: less like a digit), or None if it does not apply."""
    head = open_set.head
    if head is None:
        return None
    width = len(head["weights"]) - len(SEEN_FEATURES) - 12
    if POOLED not in str(head.get("inputs")):  # a head fit before it read the pooled activations: the last layer's
        features = features[:, features.shape[1] - width:] if 0 < width <= features.shape[1] else features
    if features.shape[1] != width:
        return None  # fit on another network's features
    return _linear(head_inputs(seen, features, logits), head)


def judge(seen: np.ndarray, measures: list[InkMeasures | None], open_set: OpenSet,
          features: np.ndarray | None = None, logits: np.ndarray | None = None,
          several: bool = True) -> list[str | None]:
    """For each image: why it is not one digit, or None.

    ``several=False`` (the pieces of a number) skips the several-digits check and holds the head to the
    bundle's ``number_threshold`` where it has one: a piece cut from a number is less like MNIST than a
    digit alone (see ``piece_threshold``).
    """
    reasons: list[str | None] = []
    for m in measures:
        reason = None if m is None else cheap_reason(m, open_set.checks)
        reasons.append(None if reason == SEVERAL and not several else reason)
    if features is None or logits is None:
        return reasons
    scores = head_scores(open_set, seen, features, logits)
    if scores is None:
        return reasons
    threshold = float(open_set.head["threshold"])
    if not several:
        threshold = max(threshold, _number_threshold(open_set.head))
    flagged = [i for i, r in enumerate(reasons) if r is None and scores[i] > threshold]
    if flagged:
        named = _reason_names(open_set, seen[flagged], logits[flagged], several)
        for i, name in zip(flagged, named, strict=True):
            reasons[i] = name
    return reasons


def _number_threshold(head: dict) -> float:
    """The head's ``number_threshold`` (checked by the bundle schema; ONNX metadata too): finite, else -inf."""
    value = head.get("number_threshold")
    if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value):
        return float(value)
    return -np.inf


def piece_threshold(predictor: Any, open_set: dict, pieces: np.ndarray, budget: float = 0.005) -> dict:
    """Set ``open_set.head.number_threshold``: the score that rejects ``budget`` of ``pieces``.

    ``pieces`` are the 28x28 digits ``segment.find_digits`` cut from photographed numbers of training digits.
    Measured (benchmarks/recognition.py, clean 2-8 digit numbers of MNIST test digits, the pooled head): with
    the single-digit threshold 13 of 300 numbers had a piece read '?' (275 exact), against 7 (280 exact)
    with the previous head; a budget of 0.2% (threshold 9.6 against 1.9) let the letters of "PKR" read
    as a number. Never give it test images.
    """
    _, features, logits = network_outputs(predictor, pieces)
    document = json.loads(json.dumps(open_set))
    head = document["head"]
    scores = head_scores(OpenSet.from_dict(document), pieces, features, logits)
    measures = [measure_ink(piece, piece) for piece in pieces]
    passing = np.array([cheap_reason(m) in (None, SEVERAL) for m in measures])
    head["number_threshold"] = max(float(head["threshold"]), float(np.quantile(scores[passing], 1.0 - budget)))
    at_threshold = float(np.mean(scores[passing] > head["threshold"]))
    by_budget = {str(b): round(float(np.quantile(scores[passing], 1.0 - b)), 4) for b in (0.002, 0.005, 0.01)}
    document["fit"] = {**(document.get("fit") or {}), "number_pieces": len(pieces), "number_budget": budget,
                       "number_pieces_rejected_at_threshold": round(at_threshold, 4),
                       "number_thresholds_by_budget": by_budget}
    return document


def _reason_names(open_set: OpenSet, seen: np.ndarray, logits: np.ndarray, several: bool) -> list[str]:
    part = open_set.reasons
    if part is None:
        return [LETTER] * len(seen)
    scores = _linear(reason_inputs(seen, logits), part)
    classes = list(part["classes"])
    if not several and SEVERAL in classes:
        scores[:, classes.index(SEVERAL)] = -np.inf
    return [classes[int(k)] for k in scores.argmax(axis=1)]


@functools.lru_cache(maxsize=1)
def _builtin_open_set() -> dict | None:
    from .predictor import BUILTIN_MODEL

    try:
        return json.loads((BUILTIN_MODEL / "model.json").read_text(encoding="utf-8")).get("open_set")
    except (OSError, ValueError):
        return None


def open_set_of(predictor: Any) -> OpenSet:
    """The predictor's ``open_set``: its attribute, its ``extra`` (a Classifier being saved), the built-in bundle's."""
    found = getattr(predictor, "open_set", None)
    if not isinstance(found, dict):
        found = (getattr(predictor, "extra", None) or {}).get("open_set")
    if not isinstance(found, dict):
        from .predictor import builtin_model

        if builtin_model.cache_info().currsize and predictor is builtin_model():
            found = _builtin_open_set()
    return OpenSet.from_dict(found if isinstance(found, dict) else None)


# --------------------------------------------------------------------------- fitting


def _rounded(values: np.ndarray) -> list:
    return [float(f"{v:.6g}") for v in np.asarray(values, dtype=np.float64).ravel()]


def fit_rejection(predictor: Any, seen: np.ndarray, kinds: list[str], measures: list[InkMeasures | None], *,
                  budgets: dict[str, float] | None = None, regularisation: float = 0.1, seed: int = 0,
                  kind_weights: dict[str, float] | None = None) -> dict:
    """Fit a bundle's ``open_set`` on 28x28 images the network saw, and measure it on a held-out half.

    ``kinds`` names each image: ``"digit:SOURCE"`` for a digit (say ``digit:mnist``, ``digit:photo``),
    else the reason it is not one (``REASONS``). ``measures`` are their ink measures (None for arrays
    given as 28x28). Half the images (at random) fit a logistic regression on ``head_inputs``; the
    other half sets its threshold: the highest score that rejects at most ``budgets[SOURCE]`` of each
    source's digits that pass the cheap checks (default 0.15% of MNIST, 1% of photos). Never give it test images.
    """
    from sklearn.linear_model import LogisticRegression

    # MNIST's test writers are not its training writers: a threshold rejecting 0.3% of held-out training
    # digits (1% of photographed ones) rejected 0.5% of the test set (0.6% with the cheap checks). Photos:
    # 0.5% of held-out ones rejected 0.8% of test photos (target 2%); 1% lets through 1.9 -> 0.9% of held-out
    # letters, 4.8 -> 2.9% of symbols, 8.8 -> 6.1% of scribbles (pooled-activation head)
    budgets = budgets or {"mnist": 0.0015, "photo": 0.01}
    kinds_array = np.asarray(kinds)
    is_digit = np.char.startswith(kinds_array.astype(str), "digit:")
    _, features, logits = network_outputs(predictor, seen)
    if features is None or logits is None:
        raise ValueError("fit_rejection needs a PyTorch network whose last layer is linear")
    x = head_inputs(seen, features, logits)
    fit_half = np.random.default_rng(seed).random(len(x)) < 0.5
    held_out = ~fit_half
    mean, scale = x[fit_half].mean(axis=0), x[fit_half].std(axis=0) + 1e-6
    model = LogisticRegression(C=regularisation, max_iter=5000, class_weight="balanced")
    # kind_weights: each kind's images count this many times in the fit (on top of balancing the two classes)
    weights = np.array([(kind_weights or {}).get(str(k), 1.0) for k in kinds_array[fit_half]])
    model.fit((x[fit_half] - mean) / scale, (~is_digit[fit_half]).astype(int), sample_weight=weights)
    head = {"inputs": f"seen-measures+logit-features+{POOLED}+last-linear-input", "mean": _rounded(mean),
            "scale": _rounded(scale), "weights": _rounded(model.coef_[0]), "bias": float(model.intercept_[0])}
    scores = _linear(x, head)
    cheap = np.array([m is None or cheap_reason(m) is None for m in measures])
    thresholds = {}
    for source, budget in budgets.items():
        chosen = held_out & cheap & (kinds_array == f"digit:{source}")
        if chosen.any():
            thresholds[source] = float(np.quantile(scores[chosen], 1.0 - budget))
    head["threshold"] = max(thresholds.values()) if thresholds else 0.0

    negatives = fit_half & ~is_digit
    r = reason_inputs(seen, logits)
    r_mean, r_scale = r[negatives].mean(axis=0), r[negatives].std(axis=0) + 1e-6
    namer = LogisticRegression(C=1.0, max_iter=5000).fit((r[negatives] - r_mean) / r_scale, kinds_array[negatives])
    reasons = {"classes": [str(c) for c in namer.classes_], "mean": _rounded(r_mean), "scale": _rounded(r_scale),
               "weights": [_rounded(row) for row in namer.coef_], "bias": _rounded(namer.intercept_)}
    open_set = OpenSet(dict(DEFAULTS), head, reasons)

    # what it does on the held-out half, by kind: the share answered "not a digit", and with the right reason
    said = judge(seen[held_out], [m for m, h in zip(measures, held_out, strict=True) if h], open_set,
                 features[held_out], logits[held_out])
    measured: dict[str, dict] = {}
    for kind in sorted(set(kinds_array[held_out].tolist())):
        rows = [i for i, k in enumerate(kinds_array[held_out]) if k == kind]
        rejected = [said[i] is not None for i in rows]
        entry = {"n": len(rows), "rejected": round(float(np.mean(rejected)), 4)}
        if not kind.startswith("digit:"):
            entry["right_reason"] = round(float(np.mean([said[i] == kind for i in rows])), 4)
        measured[kind] = entry
    open_set.fit = {"images": len(x), "fit_on": int(fit_half.sum()), "held_out": int(held_out.sum()),
                    "budgets": budgets, "thresholds": thresholds, "regularisation": regularisation, "seed": seed,
                    **({"kind_weights": kind_weights} if kind_weights else {}),
                    "held_out_rates": measured}
    return open_set.to_dict()
