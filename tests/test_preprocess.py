import io

import numpy as np
import pytest
from PIL import Image

from deepdigits.preprocess import MAX_PIXELS, ImageError, load_image, to_mnist


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
