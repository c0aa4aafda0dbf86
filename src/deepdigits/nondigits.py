"""Synthetic images that are not one digit, drawn on the page's canvas or photographed on paper: for tests and fits."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .synthetic import finish, paper, render_number

# Kinds of input that are not a single digit, and the reason the recogniser should give for each.
KINDS = ("blank", "dot", "dash", "scribble", "letter", "symbol", "noise", "several")
CANVAS = 560  # the page's drawing canvas (web/index.html), its pen 7.5% of the height (web/app.js)
PEN = round(0.075 * CANVAS)
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts", "C:/Windows/Fonts")
# Letters and symbols that do not look like a digit: O o D Q (0), I l i j | ! / \ ( ) [ ] (1), Z z (2),
# S s (5), G b (6), B (8), g q (9) and T (7) are left out, since reading them as that digit is fair.
LETTERS = "ACEFHKLMNPRUVWXYacdefhkmnprtuvwxy"
SYMBOLS = "+*#@&%$?=~<>{}^±×÷§¶€£¥©®♥♦♣♠★☺☻✓✗∞≈≠√πΩλΣ"


@functools.cache
def font_files() -> tuple[str, ...]:
    """TrueType fonts on this machine (sorted; empty when there are none, then Pillow's own font serves)."""
    found: set[str] = set()
    for folder in FONT_DIRS:
        root = Path(folder)
        if root.is_dir():
            found.update(str(p) for p in root.rglob("*") if p.suffix.lower() in (".ttf", ".otf"))
    return tuple(sorted(found))


def _font(size: int, rng: np.random.Generator) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    files = font_files()
    if files:
        return ImageFont.truetype(files[int(rng.integers(len(files)))], size)
    return ImageFont.load_default(size)


def glyph_mask(text: str, height: int, rng: np.random.Generator) -> np.ndarray:
    """``text`` rendered in a random font about ``height`` pixels tall, as ink in [0, 1] cropped to it."""
    ink = np.zeros((height, height), np.float32)
    for _ in range(12):  # a font without the glyph draws its 'missing' box: try another font
        font = _font(height, rng)
        ink = _draw_text(text, font, height)
        if ink.sum() > 2 and not np.array_equal(ink > 0.5, _draw_text("\U0010fffd", font, height) > 0.5):
            break
    rows, cols = np.nonzero(ink > 0.02)
    if not len(rows):
        return np.zeros((height, height), np.float32)
    return ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _draw_text(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, height: int) -> np.ndarray:
    canvas = Image.new("L", (3 * height * max(1, len(text)), 3 * height), 0)
    ImageDraw.Draw(canvas).text((height // 2, height // 2), text, fill=255, font=font)
    return np.asarray(canvas, np.float32) / 255


def _bezier(points: np.ndarray, steps: int = 24) -> np.ndarray:
    """A smooth pen path through ``points`` (Catmull-Rom segments), as many points along it."""
    padded = np.vstack([points[0], points, points[-1]])
    path = []
    t = np.linspace(0, 1, steps, endpoint=False)[:, None]
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1], padded[i], padded[i + 1], padded[i + 2]
        path.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                           + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3))
    path.append(points[-1:])
    return np.vstack(path)


def strokes_mask(kind: str, size: int, pen: int, rng: np.random.Generator) -> np.ndarray:
    """Pen strokes of one kind on a ``size`` square: 'dot', 'dash', 'scribble' or 'smiley' (ink in [0, 1])."""
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    centre = np.array([size / 2, size / 2]) + rng.uniform(-0.2, 0.2, 2) * size

    def line(path: np.ndarray, width: int) -> None:
        coords = [tuple(map(float, p)) for p in path]
        draw.line(coords, fill=255, width=width, joint="curve")
        r = width / 2
        for x, y in (coords[0], coords[-1]):  # round pen ends, as the page's lineCap "round"
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)

    if kind == "dot":
        r = pen / 2 * rng.uniform(0.6, 1.6)
        x, y = centre
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif kind == "dash":
        length = rng.uniform(3, 10) * pen
        angle = np.radians(rng.uniform(-20, 20))
        half = 0.5 * length * np.array([np.cos(angle), np.sin(angle)])
        line(np.array([centre - half, centre + half]), pen)
    elif kind == "scribble":
        n = int(rng.integers(6, 13))
        spread = rng.uniform(0.15, 0.35) * size
        points = centre + rng.normal(0, spread, (n, 2))
        line(_bezier(np.clip(points, pen, size - pen)), pen)
    elif kind == "smiley":
        r = rng.uniform(0.25, 0.4) * size
        x, y = centre
        draw.ellipse((x - r, y - r, x + r, y + r), outline=255, width=pen)
        for dx in (-0.35, 0.35):
            e = pen * 0.7
            draw.ellipse((x + dx * r - e, y - 0.3 * r - e, x + dx * r + e, y - 0.3 * r + e), fill=255)
        draw.arc((x - 0.55 * r, y - 0.4 * r, x + 0.55 * r, y + 0.55 * r), 20, 160, fill=255, width=pen)
    else:
        raise ValueError(f"unknown stroke kind {kind!r}")
    return np.asarray(image, np.float32) / 255


def _ink_shape(kind: str, rng: np.random.Generator, height: int) -> np.ndarray:
    """The ink of one non-digit, cropped, about ``height`` pixels tall."""
    if kind in ("letter", "symbol"):
        text = str(rng.choice(list(LETTERS if kind == "letter" else SYMBOLS)))
        ink = glyph_mask(text, height, rng)
        if rng.random() < 0.5:  # a pen thicker than the font's
            ink = ndimage.grey_dilation(ink, size=int(rng.integers(2, max(3, height // 12))))
        return ndimage.rotate(ink, float(rng.uniform(-10, 10)), reshape=True, order=1).clip(0, 1)
    size = 2 * height
    mask = strokes_mask(kind, size, max(3, round(height * rng.uniform(0.06, 0.14))), rng)
    rows, cols = np.nonzero(mask > 0.02)
    return ndimage.gaussian_filter(mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1], 0.8)


def mnist_like(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A letter, symbol, scribble or smiley as an MNIST image (28x28 uint8, ink in a 20-pixel box, centred): to
    write among digits with :mod:`deepdigits.synthetic`, which takes MNIST images."""
    ink = _ink_shape(kind, rng, 80)
    scale = 20 / max(ink.shape)
    size = (max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale)))
    small = np.asarray(Image.fromarray(np.uint8(np.clip(ink, 0, 1) * 255)).resize(size, Image.Resampling.BOX))
    image = np.zeros((28, 28), np.uint8)
    top, left = (28 - small.shape[0]) // 2, (28 - small.shape[1]) // 2
    image[top : top + small.shape[0], left : left + small.shape[1]] = small
    return image


MARK_KINDS = ("letter", "symbol", "scribble", "smiley")  # what mnist_like draws; the line reader's "?"


def write_mark(digits: list[np.ndarray], kind: str, rng: np.random.Generator) -> int:
    """Put a mark of ``kind`` (:func:`mnist_like`) in place of one of ``digits`` (MNIST images), chosen at random;
    returns its place. Training lines, the combination's fit and the benchmark draw marks alike."""
    where = int(rng.integers(len(digits)))
    digits[where] = mnist_like(kind, rng)
    return where


def _on_paper(ink: np.ndarray, rng: np.random.Generator, jpeg: bool, margin: tuple[float, float]) -> bytes:
    width = max(ink.shape[1] + 4, int(ink.shape[1] * rng.uniform(*margin)))
    height = max(ink.shape[0] + 4, int(ink.shape[0] * rng.uniform(*margin)))
    page = paper(width, height, rng)
    top = int(rng.integers(0, height - ink.shape[0] + 1))
    left = int(rng.integers(0, width - ink.shape[1] + 1))
    colour = rng.uniform(0.05, 0.3)
    region = page[top : top + ink.shape[0], left : left + ink.shape[1]]
    page[top : top + ink.shape[0], left : left + ink.shape[1]] = region * (1 - ink) + colour * ink
    return finish(page, rng, jpeg)


def _png(grey: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(grey * 255, 0, 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def render_drawn(kind: str, rng: np.random.Generator) -> bytes:
    """A non-digit drawn on the page's 560x560 canvas with its pen (black on white, PNG), as the page sends it."""
    if kind in ("letter", "symbol"):
        ink = _ink_shape(kind, rng, int(rng.integers(150, 400)))
        ink = ndimage.grey_dilation(ink, size=PEN // 3)  # the page's pen is wide
        ink = ink[: CANVAS - 20, : CANVAS - 20]
        canvas = np.zeros((CANVAS, CANVAS), np.float32)
        top = int(rng.integers(10, CANVAS - ink.shape[0] - 9))
        left = int(rng.integers(10, CANVAS - ink.shape[1] - 9))
        canvas[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    elif kind in ("dot", "dash", "scribble", "smiley"):
        canvas = strokes_mask(kind, CANVAS, PEN, rng)
    else:
        raise ValueError(f"render_drawn: no drawn kind {kind!r}")
    return _png(1.0 - canvas)


def render_noise(rng: np.random.Generator, size: int = 280) -> bytes:
    """Noise: uniform grey noise, salt and pepper, blotches, or a grid of tiny dots (PNG or JPEG)."""
    style = int(rng.integers(4))
    if style == 0:  # the 280x280 noise image
        grey = rng.uniform(0, 1, (size, size))
    elif style == 1:
        grey = np.where(rng.random((size, size)) < rng.uniform(0.02, 0.2), 0.0, 1.0)
    elif style == 2:  # blotchy texture
        grey = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), rng.uniform(1, 6))
        grey = (grey - grey.min()) / max(np.ptp(grey), 1e-6)
    else:  # a grid of tiny dots
        grey = np.ones((size, size))
        step = int(rng.integers(8, 30))
        offset = int(rng.integers(0, step))
        radius = int(rng.integers(1, 3))
        for y in range(offset, size, step):
            for x in range(offset, size, step):
                grey[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1] = 0.0
    if rng.random() < 0.5:
        return _png(grey)
    return finish(grey, rng, jpeg=True)


def render_blank(rng: np.random.Generator) -> bytes:
    """Blank paper photographed (lighting gradient, sensor noise, JPEG), or paper with a faint speck or two."""
    width, height = int(rng.integers(100, 500)), int(rng.integers(100, 500))
    page = paper(width, height, rng)
    for _ in range(int(rng.integers(0, 3))):  # dust
        y, x = int(rng.integers(height)), int(rng.integers(width))
        page[y : y + 2, x : x + 2] -= rng.uniform(0.05, 0.3)
    return finish(np.clip(page, 0, 1), rng, jpeg=bool(rng.random() < 0.8))


def render_nondigit(kind: str, rng: np.random.Generator, digits: list[np.ndarray] | None = None) -> bytes:
    """One image of ``kind`` (see ``KINDS``), photographed on paper or drawn on the canvas at random.

    'several' needs ``digits`` (two or more MNIST digits); the rest draw their own ink.
    """
    drawn = rng.random() < 0.4
    if kind == "blank":
        return render_blank(rng)
    if kind == "noise":
        return render_noise(rng)
    if kind == "several":
        if not digits or len(digits) < 2:
            raise ValueError("render_nondigit: 'several' needs two or more digits")
        return render_number(digits, rng)
    if kind == "scribble" and rng.random() < 0.2:
        kind = "smiley"
    if drawn:
        return render_drawn(kind, rng)
    height = int(rng.integers(40, 260))
    ink = _ink_shape(kind, rng, height)
    # a dot or a dash is small on the page: the photo is several times its size
    margin = (4.0, 10.0) if kind in ("dot", "dash") else (1.5, 3.5)
    return _on_paper(ink, rng, jpeg=bool(rng.random() < 0.8), margin=margin)
