import io
import re
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from deepdigits.preprocess import (
    BYTES_PER_PIXEL,
    MAX_DECODE_BYTES,
    MAX_PIXELS,
    ImageError,
    _dilate,
    decode_cost,
    ink_map,
    load_image,
    normalise_digit,
    read_image,
    to_mnist,
)
from deepdigits.segment import find_digits


def paper_image(digit: np.ndarray, size: int = 140) -> Image.Image:
    """An MNIST digit drawn in dark ink on white, enlarged, in a wider frame."""
    big = Image.fromarray(255 - digit).resize((size, size), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (size * 2, int(size * 1.5)), 255)
    canvas.paste(big, (size // 3, size // 5))
    return canvas


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_output_is_mnist_shaped(mnist):
    out = to_mnist(paper_image(mnist.x_test[0]))
    assert out.shape == (28, 28) and out.dtype == np.uint8 and out.max() == 255
    rows, cols = np.nonzero(out > 30)
    assert rows.max() - rows.min() <= 21 and cols.max() - cols.min() <= 21  # fits MNIST's 20x20 box
    assert out[0].max() == 0 and out[-1].max() == 0 and out[:, 0].max() == 0  # black border


def test_mnist_digits_come_back_nearly_unchanged(mnist):
    digits = mnist.x_test[:300]
    outs = np.stack([to_mnist(d) for d in digits])
    correlations = [correlation(a, b) for a, b in zip(outs, digits, strict=True)]
    mean_abs = np.abs(outs.astype(int) - digits.astype(int)).mean()
    # measured on 1,000 test digits: mean correlation 0.99999 (min 0.996), mean |difference| 0.10 of 255
    assert np.mean(correlations) > 0.999 and np.min(correlations) > 0.99
    assert mean_abs < 1.0


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_every_format(mnist, fmt):
    reference = to_mnist(paper_image(mnist.x_test[1]))
    image = paper_image(mnist.x_test[1])
    data = encode(image.convert("RGB") if fmt == "JPEG" else image, fmt)
    assert correlation(to_mnist(data), reference) > 0.9


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "I;16", "1"])
def test_every_mode(mnist, mode):
    reference = to_mnist(paper_image(mnist.x_test[2]))
    image = paper_image(mnist.x_test[2])
    if mode == "I;16":
        converted = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
        assert converted.mode == "I;16"
    elif mode == "1":
        converted = image.point(lambda v: 255 if v > 128 else 0).convert("1")
    else:
        converted = image.convert(mode)
    assert correlation(to_mnist(encode(converted, "PNG")), reference) > 0.85


def test_transparent_png_is_composited_on_white(mnist):
    ink = np.asarray(paper_image(mnist.x_test[3]))
    rgba = np.zeros((*ink.shape, 4), np.uint8)  # black ink, alpha = how much ink; the rest transparent
    rgba[..., 3] = 255 - ink
    reference = to_mnist(paper_image(mnist.x_test[3]))
    assert correlation(to_mnist(encode(Image.fromarray(rgba, "RGBA"), "PNG")), reference) > 0.9


def test_exif_orientation_is_applied(mnist):
    upright = paper_image(mnist.x_test[4]).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a phone stores it, with orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", exif=exif.tobytes(), quality=95)
    assert correlation(to_mnist(data), to_mnist(upright)) > 0.9


def test_light_on_dark_and_dark_on_light_agree(mnist):
    dark_ink = paper_image(mnist.x_test[5])
    light_ink = Image.fromarray(255 - np.asarray(dark_ink))
    assert correlation(to_mnist(dark_ink), to_mnist(light_ink)) > 0.95


def test_lighting_gradient_and_noise_are_suppressed(mnist):
    clean = np.asarray(paper_image(mnist.x_test[6]), np.float32) / 255
    _yy, xx = np.mgrid[0 : clean.shape[0], 0 : clean.shape[1]]
    shaded = clean * (0.55 + 0.45 * xx / xx.max()) + np.random.default_rng(0).normal(0, 0.04, clean.shape)
    assert correlation(to_mnist(np.clip(shaded, 0, 1)), to_mnist(clean)) > 0.9


def test_thin_pen_strokes_are_thickened(mnist):
    from scipy import ndimage

    big = np.asarray(Image.fromarray(mnist.x_test[7]).resize((560, 560), Image.Resampling.BICUBIC)) > 128
    skeleton_like = big & ~ndimage.binary_erosion(big, iterations=6)  # a ring: strokes a few px wide at 560px
    out = to_mnist(np.where(skeleton_like, 0.0, 1.0))
    assert (out > 128).sum() > 60  # a visible digit, not a faint hairline


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not an image Pillow can read"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image Pillow can read|damaged or truncated"),
    ],
)
def test_bad_bytes(content, message):
    with pytest.raises(ImageError, match=message):
        to_mnist(content, name="upload.png")


def test_truncated_jpeg_and_png(mnist, tmp_path):
    for fmt in ("JPEG", "PNG"):
        data = encode(paper_image(mnist.x_test[0]).convert("RGB"), fmt)
        path = tmp_path / f"cut.{fmt.lower()}"
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageError, match=rf"{path}: damaged or truncated image"):
            to_mnist(path)


def test_decompression_bomb_is_refused(tmp_path):
    side = int(np.sqrt(MAX_PIXELS)) + 100
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side), 1).save(path)  # tiny file, huge image
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageError, match="over the limit of 40,000,000"):
        load_image(path)


def test_blank_image(tmp_path):
    path = tmp_path / "white.png"
    Image.new("L", (200, 200), 255).save(path)
    with pytest.raises(ImageError, match=r"white.png: no ink found"):
        to_mnist(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        to_mnist(tmp_path / "nope.png")


# --------------------------------------------------------------------------- bounded for hostile input

MEASURE = """
import sys
import numpy as np
from deepdigits.preprocess import ImageError
from deepdigits.segment import find_digits

def peak():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

try:
    find_digits(np.pad(np.ones((20, 20)), 20))  # imports and first-call allocations, before the baseline
except ImageError:
    pass
try:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak so far := the memory in use now
except OSError:
    pass
before = peak()
try:
    answer = f"{len(find_digits(sys.argv[1]).boxes)} digits"
except ImageError as exc:
    answer = str(exc)
print(peak() - before)
print(answer)
"""


def memory_growth(path) -> tuple[int, str]:
    """Peak memory growth in bytes of find_digits(path) in a fresh process (as the server calls it), and its answer.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child of a big pytest process would hide its
    own peak under the parent's.
    """
    done = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    growth, answer = done.stdout.splitlines()
    return int(growth), answer


def test_16_bit_6300_png_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big16.png"
    Image.new("I;16", (6300, 6300)).save(path)  # under MAX_PIXELS; 1 GB a request in the server before
    assert path.stat().st_size < 200_000
    growth, answer = memory_growth(path)
    assert re.fullmatch(rf"{re.escape(str(path))}: a 6300x6300 16-bit image needs about \d+ MB to read, over the "
                        rf"limit of {MAX_DECODE_BYTES // 1_000_000} MB; expected at most [\d.]+ megapixels at this "
                        "depth", answer)
    assert growth < 50_000_000  # 606 MB before (ru_maxrss), 0 now


def test_largest_accepted_image_stays_under_300_mb(tmp_path):
    width = 4400
    height = MAX_DECODE_BYTES // (BYTES_PER_PIXEL["RGBA"] * width)  # RGBA: the most per pixel of the common modes
    assert decode_cost("RGBA", (width, height)) <= MAX_DECODE_BYTES < decode_cost("RGBA", (width, height + 20))
    image = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    ImageDraw.Draw(image).ellipse((1400, 800, 2600, 2600), outline=(0, 0, 0, 255), width=60)
    path = tmp_path / "largest.png"
    image.save(path, compress_level=1)
    growth, answer = memory_growth(path)
    assert answer.endswith("digits")
    assert growth < 300_000_000  # 154 MB measured


@pytest.fixture
def small_budget(monkeypatch):
    from deepdigits import preprocess

    monkeypatch.setattr(preprocess, "MAX_DECODE_BYTES", 1_000_000)  # a 600x400 image is over it


def ring_jpeg(path, orientation: int = 1):
    image = Image.new("RGB", (600, 400), "white")
    ImageDraw.Draw(image).ellipse((240, 80, 360, 320), outline="black", width=14)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif.tobytes())
    return path


def test_jpeg_over_the_budget_is_reduced_while_decoding(tmp_path, small_budget):
    grey, size = read_image(ring_jpeg(tmp_path / "ring.jpg"))
    assert grey.shape == (200, 300) and size == (600, 400)  # decoded at half size, in grey
    grey, size = read_image(ring_jpeg(tmp_path / "turned.jpg", orientation=6))
    assert grey.shape == (300, 200) and size == (400, 600)
    found = find_digits(tmp_path / "ring.jpg")
    assert found.size == (600, 400)
    (box,) = found.boxes  # in the full image's pixels
    assert np.allclose(box, (240, 80, 360, 320), atol=8)


def test_overlay_of_a_reduced_jpeg_has_its_boxes_in_place(tmp_path, small_budget):
    from deepdigits.recognize import draw_boxes, read_number

    path = ring_jpeg(tmp_path / "ring.jpg")
    canvas = np.asarray(draw_boxes(path, read_number(path)))
    assert canvas.shape == (200, 300, 3)
    coloured = np.nonzero(np.ptp(canvas.astype(int), axis=2) > 100)
    assert abs(coloured[1].min() - 120) <= 4 and abs(coloured[1].max() - 180) <= 4  # the box at x 240-360 / 2


def test_other_formats_over_the_budget_are_refused(tmp_path, small_budget):
    path = tmp_path / "ring.png"
    Image.open(ring_jpeg(tmp_path / "ring.jpg")).save(path)
    with pytest.raises(ImageError, match=rf"^{re.escape(str(path))}: a 600x400 RGB image needs about 2 MB to read, "
                                         "over the limit of 1 MB; expected at most 0.1 megapixels at this depth$"):
        to_mnist(path)


def test_dilation_by_a_disk_is_exact_and_fast():
    rng = np.random.default_rng(0)
    for radius in (1, 2, 3, 5, 8, 13, 32):
        image = np.pad(rng.random((60, 70)).astype(np.float32) * (rng.random((60, 70)) > 0.9), radius + 1)
        disk = np.hypot(*np.mgrid[-radius : radius + 1, -radius : radius + 1]) <= radius
        assert np.array_equal(_dilate(image, disk), ndimage.grey_dilation(image, footprint=disk))
    grid = np.zeros((640, 640), np.float32)
    grid[::40], grid[:, ::40] = 1, 1  # thin strokes filling the working size: the widest thickening
    start = time.thread_time()
    normalise_digit(grid)
    assert time.thread_time() - start < 1  # 1.77 s with the disk footprint, 0.08 s now (CPU)


def test_ink_map_of_a_dot_grid_is_fast():
    grid = np.ones((640, 640), np.float32)
    for y in range(0, 640, 8):
        for x in range(0, 640, 8):
            grid[y : y + 4, x : x + 4] = 0  # 6,400 dots
    start = time.thread_time()
    ink_map(grid)
    assert time.thread_time() - start < 1  # 0.05 s measured (CPU)


@pytest.mark.parametrize("size", [(1, 1), (10000, 10), (10, 10000), (1, 500), (500, 1), (2, 2)])
@pytest.mark.parametrize("value", [0, 128, 255])
def test_degenerate_images_raise_without_warnings(size, value):
    data = encode(Image.new("L", size, value), "PNG")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match=r"^flat.png: no ink found: the image looks blank$"):
            to_mnist(data, name="flat.png")
    assert not caught, [str(w.message) for w in caught]


def test_damaged_metadata_gives_the_error_without_pillow_warnings(tmp_path, capsys):
    from deepdigits.cli import main

    path = tmp_path / "garbage.tif"
    path.write_bytes(b"II*\x00" + b"\xff" * 100)  # Pillow warned "Corrupt EXIF data" three times, with its path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match="not an image Pillow can read"):
            to_mnist(path)
        assert main(["predict", str(path)]) == 1
    assert not caught, [str(w.message) for w in caught]
    assert capsys.readouterr().err.splitlines() == [
        f"deepdigits: error: {path}: not an image Pillow can read (PNG, JPEG, GIF, BMP, TIFF or WebP expected)"]


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((5, 5), np.nan), "pixel values must be finite numbers; NaN or infinity found"),
        (np.array([[np.inf, 0.0], [0.0, 1.0]]), "pixel values must be finite numbers; NaN or infinity found"),
        (np.ones((3, 3), complex), "expected pixel values as numbers, got complex128"),
        (np.zeros((0, 5)), r"expected a 2-D greyscale or RGB image, got shape \(0, 5\)"),
        (np.full((4, 4), 1e300), "no ink found"),
    ],
)
def test_hostile_arrays_raise_one_line_without_warnings(array, message):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match=rf"^a: {message}"):
            to_mnist(array, name="a")
    assert not caught, [str(w.message) for w in caught]
