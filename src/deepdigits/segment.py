"""Find the digits of a handwritten number in an image: connected components, merged and split, left to right."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .preprocess import ImageError, ink_map, load_image, normalise_digit


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
