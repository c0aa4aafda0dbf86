"""Turn real images into what the networks take: MNIST-style 28x28 digits, and (N, 1, 28, 28) tensors.

MNIST digits are light ink on black, size-normalised into a 20x20 box keeping the aspect ratio and
placed in 28x28 by centre of mass. ``to_mnist`` does the same to a photo or scan of a digit.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from .errors import DeepDigitsError

DEFAULT_SCALE = 1.0 / 255.0  # the tutorials' x / 255
MAX_PIXELS = 40_000_000  # larger images are refused: a guard against decompression bombs
WORKING_SIZE = 640  # longest side the image is reduced to before the ink is found
BOX, FIELD = 20, 28  # MNIST's digit box and image size


class ImageError(DeepDigitsError):
    """An input image cannot be read or holds no digit."""


def to_tensor(images: np.ndarray | torch.Tensor, scale: float = DEFAULT_SCALE) -> torch.Tensor:
    """Images as (N, 28, 28), (N, 784), (N, 1, 28, 28) or one (28, 28) -> float32 (N, 1, 28, 28).

    uint8 images are multiplied by ``scale`` (1/255 by default, as the tutorials divide by 255);
    float images are taken as already scaled.
    """
    array = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    given = tuple(array.shape)
    if array.ndim == 2 and array.shape == (28, 28):
        array = array.unsqueeze(0)
    if array.ndim == 2 and array.shape[1] == 784:
        array = array.reshape(-1, 28, 28)
    if array.ndim == 3:
        array = array.unsqueeze(1)
    if array.ndim != 4 or tuple(array.shape[1:]) != (1, 28, 28):
        raise DeepDigitsError(f"images: expected shape (N, 28, 28), (N, 784) or (N, 1, 28, 28), got {given}")
    if array.dtype == torch.uint8:
        return array.to(torch.float32) * scale
    return array.to(torch.float32)


# --------------------------------------------------------------------------- reading images safely


def load_image(source: str | os.PathLike | bytes | Image.Image | np.ndarray, name: str | None = None) -> np.ndarray:
    """Read any image into a float greyscale array in [0, 1] (0 black, 1 white).

    PNG, JPEG (EXIF orientation applied), GIF, BMP, TIFF, WebP; grey, RGB, RGBA and LA (composited on
    white), palette, 16-bit and float images. Bad files raise one-line ``ImageError``s naming the file.
    """
    if isinstance(source, np.ndarray):
        return _array_to_grey(source, name or "array")
    label = name or (f"{len(source)}-byte upload" if isinstance(source, bytes) else str(source))
    if isinstance(source, Image.Image):
        return _pil_to_grey(source, label)
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageError(f"{label}: empty file; expected an image")
            handle = io.BytesIO(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"{label}: no such file")
            if path.stat().st_size == 0:
                raise ImageError(f"{label}: empty file; expected an image")
            handle = open(path, "rb")  # noqa: SIM115 - closed below, after Pillow has read it
        with handle, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise ImageError(
                        f"{label}: {width}x{height} pixels is over the limit of {MAX_PIXELS:,}; "
                        "expected a smaller image"
                    )
                image.load()
                return _pil_to_grey(image, label)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(
            f"{label}: not an image Pillow can read (PNG, JPEG, GIF, BMP, TIFF or WebP expected)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{label}: over the pixel limit of {MAX_PIXELS:,} (possible decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label}: damaged or truncated image ({exc})") from None


def _pil_to_grey(image: Image.Image, label: str) -> np.ndarray:
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_grey(np.asarray(image), label)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if grey.size == 0:
        raise ImageError(f"{label}: image has no pixels")
    return grey


def _array_to_grey(array: np.ndarray, label: str) -> np.ndarray:
    """An array image (grey or RGB/RGBA; 0-1 floats, 8-bit or 16-bit values) -> float grey in [0, 1]."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        array = array[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # luminance
    if array.ndim != 2 or array.size == 0:
        raise ImageError(f"{label}: expected a 2-D greyscale or RGB image, got shape {array.shape}")
    array = array.astype(np.float64)
    peak = float(array.max())
    if array.min() >= 0.0 and peak <= 1.0:
        return array.astype(np.float32)
    top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    return np.clip(array / top, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- finding the ink


def ink_map(grey: np.ndarray) -> np.ndarray:
    """Ink as bright on black, in [0, 1]: polarity decided, background and uneven lighting removed, specks gone.

    ``grey`` is any-size float greyscale; the result is reduced to at most ``WORKING_SIZE`` on its longest side.
    """
    grey = _reduce(grey)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if np.median(border) > np.median(grey[1:-1, 1:-1]) or np.median(border) > 0.5:
        grey = 1.0 - grey  # dark ink on light paper: make it MNIST's light on dark
    # The background (paper, shading, a lighting gradient) varies slowly: take it as a grey opening
    # wider than the strokes, smoothed, and subtract it. A window narrower than a stroke would
    # count the middle of the stroke as background and hollow it out.
    size = max(grey.shape)
    rough = grey - np.median(grey)
    stroke = stroke_width(rough > _otsu(np.clip(rough, 0, 1)))
    window = min(size, max(3, int(max(0.1 * size, 2.5 * stroke)) | 1))
    background = ndimage.grey_opening(grey, size=(window, window))
    background = ndimage.uniform_filter(background, size=window)
    ink = np.clip(grey - background, 0.0, None)
    ink = ndimage.median_filter(ink, size=3) if size > 64 else ink  # speckle noise
    top = float(np.percentile(ink, 99.9))
    if top <= 1e-3:
        return np.zeros_like(ink)
    ink = np.clip(ink / top, 0.0, 1.0)
    threshold = _otsu(ink)
    # Zero what is no brighter than the leftover background noise (median + 3 robust sigmas of the
    # non-ink pixels): a clean MNIST digit loses nothing, a noisy photo loses its grain.
    rest = ink[ink < threshold]
    if rest.size:
        median = float(np.median(rest))
        noise = median + 3 * 1.4826 * float(np.median(np.abs(rest - median)))
        ink = np.where(ink > min(noise, 0.5 * threshold), ink, 0.0)
    return _drop_specks(ink, ink >= threshold)


def _reduce(grey: np.ndarray) -> np.ndarray:
    longest = max(grey.shape)
    if longest <= WORKING_SIZE:
        return grey.astype(np.float32)
    factor = WORKING_SIZE / longest
    size = (max(1, round(grey.shape[1] * factor)), max(1, round(grey.shape[0] * factor)))
    return np.asarray(Image.fromarray(grey.astype(np.float32), mode="F").resize(size, Image.Resampling.BOX))


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of values in [0, 1] (the split that best separates ink from background)."""
    histogram, edges = np.histogram(values, bins=256, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(histogram)
    total = weight[-1]
    if total == 0:
        return 0.5
    mean_low = np.cumsum(histogram * centres) / np.maximum(weight, 1)
    mean_all = (histogram * centres).sum() / total
    weight_high = total - weight
    mean_high = (mean_all * total - mean_low * weight) / np.maximum(weight_high, 1)
    between = weight * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between))])


def _drop_specks(ink: np.ndarray, mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return np.zeros_like(ink)
    areas = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    keep = np.zeros(count + 1, bool)
    keep[1:] = areas >= max(4.0, 0.04 * areas.max())
    # the faint fringe around kept strokes stays; isolated specks go
    grown = ndimage.binary_dilation(keep[labels], iterations=2)
    return np.where(grown, ink, 0.0)


# --------------------------------------------------------------------------- MNIST normalisation


def normalise_digit(ink: np.ndarray) -> np.ndarray:
    """An ink crop (bright on black) -> MNIST's 28x28 uint8: fit in 20x20 keeping aspect, centre of mass centred."""
    rows, cols = np.nonzero(ink > 1 / 255)
    if len(rows) == 0:
        raise ImageError("no ink found: the image looks blank")
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    ink = _thicken(ink)
    height, width = ink.shape
    factor = BOX / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    # Pillow's anti-aliased Lanczos resampling (the identity when the ink already fills 20 pixels)
    small = np.asarray(Image.fromarray(ink.astype(np.float32), mode="F").resize(size, Image.Resampling.LANCZOS))
    small = np.clip(small, 0.0, None)
    # MNIST's centre of mass sits at pixel (14, 14) (measured over its test set: 13.99, 14.00, spread
    # 0.29): whole-pixel placement, no interpolation that would blur thin strokes.
    cy, cx = ndimage.center_of_mass(small) if small.sum() > 0 else (small.shape[0] / 2, small.shape[1] / 2)
    top = int(np.clip(round(FIELD / 2 - cy), 0, FIELD - small.shape[0]))
    left = int(np.clip(round(FIELD / 2 - cx), 0, FIELD - small.shape[1]))
    field = np.zeros((FIELD, FIELD), np.float32)
    field[top : top + small.shape[0], left : left + small.shape[1]] = small
    peak = float(field.max())
    if peak <= 0:
        raise ImageError("no ink found: the image looks blank")
    return np.clip(np.round(field / peak * 255.0), 0, 255).astype(np.uint8)


def stroke_width(mask: np.ndarray) -> float:
    """Typical stroke width of the ink in ``mask``, in pixels (0 if there is none)."""
    area = mask.sum()
    boundary = (mask & ~ndimage.binary_erosion(mask)).sum()
    # a ribbon of length L and width w has area L*w and a boundary of about 2L pixels
    return float(2.0 * area / boundary) if boundary else 0.0


def _thicken(ink: np.ndarray) -> np.ndarray:
    """Widen thin pen strokes to MNIST's proportions (stroke about a tenth of the digit's height)."""
    stroke = stroke_width(ink > 0.3)
    if stroke == 0:
        return ink
    wanted = 0.10 * max(ink.shape)
    if stroke >= 0.75 * wanted:
        return ink
    radius = round((wanted - stroke) / 2)
    if radius < 1:
        return ink
    pad = radius + 1
    padded = np.pad(ink, pad)
    disk = np.hypot(*np.mgrid[-radius : radius + 1, -radius : radius + 1]) <= radius
    return ndimage.grey_dilation(padded, footprint=disk)


def to_mnist(image: str | os.PathLike | bytes | Image.Image | np.ndarray, name: str | None = None) -> np.ndarray:
    """Any image of one digit -> the 28x28 uint8 array an MNIST network expects.

    Greyscale; polarity made MNIST's (light ink on dark); background, uneven lighting and speckle
    suppressed; cropped to the ink; scaled to fit 20x20 keeping the aspect ratio, anti-aliased; placed
    in 28x28 by centre of mass.
    """
    grey = load_image(image, name)
    try:
        return normalise_digit(ink_map(grey))
    except ImageError as exc:
        label = name or (str(image) if isinstance(image, str | os.PathLike) else "image")
        raise ImageError(f"{label}: {exc}") from None


def save_seen(image: str | os.PathLike | bytes | Image.Image | np.ndarray, out: str | os.PathLike,
              zoom: int = 10) -> Path:
    """Save what the network sees of ``image`` (its 28x28 MNIST-style digit), ``zoom`` times enlarged, as PNG."""
    from .atomic import atomic_write

    seen = Image.fromarray(to_mnist(image)).resize((28 * zoom, 28 * zoom), Image.Resampling.NEAREST)
    return atomic_write(out, lambda tmp: seen.save(tmp, format="PNG"))
