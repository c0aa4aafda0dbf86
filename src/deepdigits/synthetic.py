"""Synthetic photographed handwriting made from MNIST digits, for tests and benchmarks: ink on paper, as a photo."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage


def ink_shape(digit: np.ndarray, height: int, stroke: int, angle: float) -> np.ndarray:
    """The digit's ink drawn ``height`` pixels tall, strokes thickened or thinned by ``stroke`` px, rotated."""
    scale = height / 20.0  # MNIST digits fill a 20-pixel box
    size = max(8, round(28 * scale))
    big = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
    mask = big > 0.45
    if stroke > 0:
        mask = ndimage.binary_dilation(mask, iterations=stroke)
    elif stroke < 0:
        thinner = ndimage.binary_erosion(mask, iterations=-stroke)
        mask = thinner if thinner.sum() > 0.3 * mask.sum() else mask
    ink = ndimage.gaussian_filter(mask.astype(np.float32), 0.8)  # pen edges are soft
    if angle:
        ink = ndimage.rotate(ink, angle, reshape=True, order=1)
    rows, cols = np.nonzero(ink > 0.02)
    return np.clip(ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1], 0, 1)


def paper(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Light paper with a lighting gradient across it."""
    brightness = rng.uniform(0.75, 0.95)
    yy, xx = np.mgrid[0:height, 0:width]
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * xx / width + np.sin(direction) * yy / height)
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
    return brightness - rng.uniform(0.1, 0.25) * ramp


def finish(grey: np.ndarray, rng: np.random.Generator, jpeg: bool = True) -> bytes:
    """Add sensor noise, a slight colour cast, and encode as JPEG (or PNG)."""
    grey = np.clip(grey + rng.normal(0, 0.03, grey.shape), 0, 1)
    tint = np.array([1.0, rng.uniform(0.96, 1.0), rng.uniform(0.9, 1.0)])
    rgb = (np.clip(grey[..., None] * tint, 0, 1) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    if jpeg:
        Image.fromarray(rgb).save(buffer, "JPEG", quality=int(rng.integers(55, 90)))
    else:
        Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


def render_digit(digit: np.ndarray, rng: np.random.Generator, jpeg: bool = True) -> bytes:
    """One MNIST digit as a photo: large, off-centre, varied size/stroke/rotation, gradient, noise, JPEG."""
    height = int(rng.integers(60, 260))
    ink = ink_shape(digit, height, stroke=int(rng.integers(-1, 4)) * max(1, height // 80),
                    angle=float(rng.uniform(-10, 10)))
    width_px, height_px = int(ink.shape[1] * rng.uniform(1.6, 3.5)), int(ink.shape[0] * rng.uniform(1.4, 2.5))
    page = paper(width_px, height_px, rng)
    top = int(rng.integers(0, height_px - ink.shape[0] + 1))
    left = int(rng.integers(0, width_px - ink.shape[1] + 1))
    colour = rng.uniform(0.05, 0.3)
    region = page[top : top + ink.shape[0], left : left + ink.shape[1]]
    page[top : top + ink.shape[0], left : left + ink.shape[1]] = region * (1 - ink) + colour * ink
    return finish(page, rng, jpeg)


def render_number(digits: list[np.ndarray], rng: np.random.Generator, jpeg: bool = True) -> bytes:
    """Several MNIST digits written side by side with varied gaps, on one photo."""
    height = int(rng.integers(70, 160))
    stroke = int(rng.integers(0, 3)) * max(1, height // 80)
    shapes = [ink_shape(d, height, stroke, float(rng.uniform(-8, 8))) for d in digits]
    gaps = [int(rng.uniform(0.1, 0.6) * height) for _ in shapes[:-1]]
    margin = int(0.4 * height)
    width_px = sum(s.shape[1] for s in shapes) + sum(gaps) + 2 * margin
    height_px = max(s.shape[0] for s in shapes) + 2 * margin
    page = paper(width_px, height_px, rng)
    colour = rng.uniform(0.05, 0.3)
    x = margin
    for i, shape in enumerate(shapes):
        top = margin + int(rng.integers(0, max(1, height_px - 2 * margin - shape.shape[0] + 1)))
        region = page[top : top + shape.shape[0], x : x + shape.shape[1]]
        page[top : top + shape.shape[0], x : x + shape.shape[1]] = region * (1 - shape) + colour * shape
        x += shape.shape[1] + (gaps[i] if i < len(gaps) else 0)
    return finish(page, rng, jpeg)
