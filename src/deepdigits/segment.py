"""Find the digits of a handwritten number in an image: connected components, merged and split, left to right."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .preprocess import ImageError, ink_map, normalise_digit, read_image

# Bounds on one image, so that no input keeps a core busy: a 640x640 grid of 6,400 dots took 150+ s
# (killed), 1,600 dots 26 s and 400 dots 5.3 s in find_digits before; each is now refused in 0.1 s.
MAX_MARKS = 200  # separate marks (connected components, specks aside) before anything costly is done
MAX_DIGITS = 32  # the number mode is for 2-8 digits; far more is not a handwritten number
TIME_LIMIT = 2.0  # CPU seconds one find_digits call may use; the bounds above keep real images far below


class Deadline:
    """A budget of CPU seconds for one call: ``check()`` raises a one-line ImageError once it is spent.

    The calling thread's CPU time, not the wall clock: other work on a busy machine (or other requests
    in a server) does not use it up, so a good image is never refused for being slow to get a core.
    """

    def __init__(self, seconds: float = TIME_LIMIT) -> None:
        self.seconds = seconds
        self.end = time.thread_time() + seconds

    def check(self) -> None:
        if time.thread_time() > self.end:
            raise ImageError(f"finding the digits took longer than {self.seconds:g} s of CPU time; "
                             f"expected a handwritten number of at most {MAX_DIGITS} digits")


def _merge_broken(boxes: np.ndarray, deadline: Deadline) -> list[list[int]]:
    """Merge boxes (x0, y0, x1, y1, in place) whose columns overlap by more than half of the narrower one.

    Returns the indices each surviving box absorbed. The same merges, in the same order, as rescanning all
    pairs after each merge (the first overlapping pair in index order merges first), but a merge only
    updates the pairs it changes: O(n) numpy work per merge instead of an O(n²) Python rescan.
    """
    n = len(boxes)
    alive = np.ones(n, bool)

    def overlapping(i: int, others: np.ndarray) -> np.ndarray:
        x0, x1 = boxes[others, 0], boxes[others, 2]
        overlap = np.minimum(boxes[i, 2], x1) - np.maximum(boxes[i, 0], x0)
        return overlap > 0.5 * np.minimum(boxes[i, 2] - boxes[i, 0], x1 - x0)

    def first_partner(i: int) -> int:  # the first live box after i that i merges with, or n
        later = np.flatnonzero(alive[i + 1 :]) + i + 1
        hits = later[overlapping(i, later)]
        return int(hits[0]) if hits.size else n

    partner = np.array([first_partner(i) for i in range(n)], dtype=np.int64)
    groups = [[i] for i in range(n)]
    while True:
        deadline.check()
        waiting = np.flatnonzero(partner < n)
        if not waiting.size:
            break
        a = int(waiting[0])
        b = int(partner[a])
        boxes[a, :2] = np.minimum(boxes[a, :2], boxes[b, :2])
        boxes[a, 2:] = np.maximum(boxes[a, 2:], boxes[b, 2:])
        groups[a] += groups[b]
        alive[b], partner[b] = False, n
        # boxes before a had no partner (a was the first that did); only the grown box a can be one now
        earlier = np.flatnonzero(alive[:a])
        partner[earlier[overlapping(a, earlier)]] = a
        for i in np.flatnonzero(partner == b):
            partner[i] = first_partner(int(i))
        partner[a] = first_partner(a)
    return [groups[i] for i in np.flatnonzero(alive)]


def segment_digits(ink: np.ndarray, deadline: Deadline | None = None,
                   ) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Split an ink map into single digits, left to right: ``[(box, ink_crop), ...]`` in ink-map pixels.

    Connected components; parts of one broken digit (overlapping columns) merged; components much wider
    than the digits' height split at the columns with least ink. More than ``MAX_MARKS`` marks or
    ``MAX_DIGITS`` digits, or more than the ``deadline`` (``TIME_LIMIT`` by default), is an ImageError.
    """
    deadline = deadline or Deadline()
    mask = ink > 0.25
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return []
    if count > MAX_MARKS:  # counted before any per-mark work; specks (as ink_map drops them) aside
        areas = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
        marks = int((areas >= max(4.0, 0.04 * areas.max())).sum())
        if marks > MAX_MARKS:
            raise ImageError(f"{marks} separate marks found; expected a handwritten number of at most "
                             f"{MAX_DIGITS} digits")
    slices = ndimage.find_objects(labels)
    boxes = np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices], np.int64)  # x0 y0 x1 y1
    groups = _merge_broken(boxes, deadline)
    boxes = boxes[[group[0] for group in groups]]

    heights = boxes[:, 3] - boxes[:, 1]
    reference = float(np.median(heights))
    widths = boxes[:, 2] - boxes[:, 0]
    counts = np.maximum(1, np.floor(widths / (0.7 * np.maximum(heights, reference)) + 0.3).astype(np.int64))
    if counts.sum() > MAX_DIGITS:  # known before any crop is cut
        raise ImageError(f"{int(counts.sum())} digits found; expected a handwritten number of at most "
                         f"{MAX_DIGITS} digits")
    pieces: list[tuple[tuple[int, int, int, int], np.ndarray]] = []
    for (x0, y0, x1, y1), group, parts in zip(boxes.tolist(), groups, counts.tolist(), strict=True):
        deadline.check()
        own = np.isin(labels[y0:y1, x0:x1], np.asarray(group) + 1)
        crop = np.where(ndimage.binary_dilation(own, iterations=1), ink[y0:y1, x0:x1], 0.0)
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


def find_digits(image, name: str | None = None, time_limit: float = TIME_LIMIT) -> FoundDigits:
    """Cut a handwritten number into MNIST-style digits, left to right; a blank image is an ImageError.

    Bounded for any input: decoded under ``preprocess.MAX_DECODE_BYTES``, at most ``MAX_MARKS`` marks and
    ``MAX_DIGITS`` digits, and ``time_limit`` CPU seconds; past any of them, a one-line ImageError.
    """
    deadline = Deadline(time_limit)
    label = name or (str(image) if isinstance(image, str | os.PathLike) else "image")
    grey, (width, height) = read_image(image, name)
    try:
        deadline.check()
        ink = ink_map(grey)
        del grey  # the full-size copy is not needed past here
        deadline.check()
        pieces = segment_digits(ink, deadline)
        if not pieces:
            raise ImageError("no ink found: the image looks blank")
        crops = []
        for _, crop in pieces:
            deadline.check()
            crops.append(normalise_digit(crop))
    except ImageError as exc:
        raise ImageError(f"{label}: {exc}") from None
    scale = max(width, height) / max(ink.shape)
    boxes = [tuple(round(v * scale) for v in box) for box, _ in pieces]
    return FoundDigits(np.stack(crops), boxes, (width, height))  # type: ignore[arg-type]
